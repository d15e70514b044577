#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine for moetune and builds it (Release, ./build).
# Idempotent: installs only the packages that are missing (apt-get update only then),
# and re-running the build is incremental.
#
# usage: scripts/setup.sh [--no-torch] [--no-build] [--build-dir DIR]
#   --no-torch     do not install python3-torch (the PyTorch reference tests need it)
#   --no-build     install packages only
#   --build-dir D  build directory (default: build)
set -euo pipefail

with_torch=1
do_build=1
build_dir=build
while [[ $# -gt 0 ]]; do
  case "$1" in
    --no-torch) with_torch=0 ;;
    --no-build) do_build=0 ;;
    --build-dir) build_dir="${2:?--build-dir needs a directory}"; shift ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: unknown option '$1' (try --help)" >&2; exit 2 ;;
  esac
  shift
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."

packages=(cmake g++ make libeigen3-dev libopenmpi-dev openmpi-bin libgtest-dev libbenchmark-dev
          nlohmann-json3-dev libcli11-dev python3 python3-numpy libopenblas0-pthread)
if [[ $with_torch == 1 ]]; then packages+=(python3-torch); fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "setup.sh: all ${#packages[@]} packages already installed"
else
  sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "setup.sh: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
    sudo=(sudo)
  fi
  echo "setup.sh: installing ${missing[*]}"
  echo "+ apt-get update"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
  echo "+ apt-get install -y --no-install-recommends ${missing[*]}"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

# Optional: the tokenizer cross-check (tests/tokenizer/parity.sh) needs python3-regex.
# A machine without it still builds and passes the rest of the suite.
if ! dpkg-query -W -f='${Status}' python3-regex 2>/dev/null | grep -q "install ok installed"; then
  if [[ $(id -u) -eq 0 ]] || command -v sudo >/dev/null; then
    s=(); [[ $(id -u) -ne 0 ]] && s=(sudo)
    inst=("${s[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-regex)
    "${inst[@]}" || { "${s[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update && "${inst[@]}"; } ||
      echo "setup.sh: note: python3-regex not installed; the tokenizer_python_parity test will be skipped"
  fi
fi

if [[ $do_build == 1 ]]; then
  echo "+ cmake -S . -B $build_dir -DCMAKE_BUILD_TYPE=Release"
  cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release
  echo "+ cmake --build $build_dir -j$(nproc)"
  cmake --build "$build_dir" -j"$(nproc)"
  echo "setup.sh: built into $build_dir (tests: ctest --test-dir $build_dir --output-on-failure)"
fi
