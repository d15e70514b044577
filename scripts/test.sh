#!/usr/bin/env bash
# The whole test suite: install what is missing (PyTorch included, for the parity
# check against tests/reference/), build, and run every test with ctest.
#
# usage: scripts/test.sh [--sanitize LIST] [--with-sanitize] [ctest arguments...]
#   (none)              the Release build in ./build, every ctest entry
#   --sanitize LIST     instead: build ./build-sanitize with -fsanitize=LIST (the
#                       "sanitize" preset for address,undefined; the "tsan" preset for
#                       thread) and run the whole suite, MPI tests included, under it
#                       (thread: the unit tests)
#   --with-sanitize     the Release suite, then the address,undefined suite (.ci/run)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Open MPI refuses root without these; tests pin their own thread counts.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

sanitize=""
also_sanitize=0
case "${1:-}" in
  --sanitize) sanitize=${2:?--sanitize needs a list, e.g. address,undefined}; shift 2 ;;
  --with-sanitize) also_sanitize=1; shift ;;
  -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac

# Runs the suite of a sanitizer build: $1 = the -fsanitize list.
sanitized_suite() {
  local list=$1 preset dir select=()
  shift
  case "$list" in
    address,undefined|undefined,address) preset=sanitize dir=build-sanitize ;;
    # TSan: the unit tests only (label "unit"), built by clang against LLVM's OpenMP
    # runtime, which tells TSan about its barriers (GCC's libgomp does not, and TSan
    # then reports races on correct OpenMP loops). Open MPI is not instrumented.
    thread) preset=tsan dir=build-tsan select=(-L unit) ;;
    *) echo "test.sh: --sanitize takes address,undefined or thread, not '$list'" >&2; exit 2 ;;
  esac
  echo "+ cmake --preset $preset && cmake --build $dir -j$(nproc)"
  cmake --preset "$preset" > /dev/null
  cmake --build "$dir" -j"$(nproc)"
  # Every report aborts the process (the build sets -fno-sanitize-recover); leaks are
  # checked, with the suppressions of third-party libraries in tests/sanitizers/.
  export ASAN_OPTIONS="abort_on_error=1:detect_leaks=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1"
  export LSAN_OPTIONS="suppressions=$PWD/tests/sanitizers/lsan.supp:print_suppressions=0"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:suppressions=$PWD/tests/sanitizers/ubsan.supp"
  export TSAN_OPTIONS="halt_on_error=1:ignore_noninstrumented_modules=1:suppressions=$PWD/tests/sanitizers/tsan.supp"
  # Instrumented code runs several times slower: the presets scale every test's timeout
  # (MOETUNE_TIMEOUT_SCALE).
  ctest --test-dir "$dir" --output-on-failure -j2 "${select[@]}" "$@"
}

scripts/setup.sh
if [[ -n $sanitize ]]; then
  sanitized_suite "$sanitize" "$@"
  exit 0
fi
ctest --test-dir build --output-on-failure -j2 "$@"
if ((also_sanitize)); then sanitized_suite address,undefined "$@"; fi
