#!/usr/bin/env bash
# Runs moetune's libFuzzer harnesses (fuzz/fuzz_<name>.cpp) one after the other.
# See docs/hardening.md, section "Fuzzing".
set -uo pipefail

usage() {
  cat <<'EOF'
usage: scripts/fuzz.sh [SECONDS] [NAME...]

Builds the "fuzz" preset (clang++, libFuzzer + ASan + UBSan, in build-fuzz/) if needed,
then runs each harness NAME (default: all of fuzz/fuzz_*.cpp) for SECONDS seconds
(default 600), one at a time, with
  -max_total_time=SECONDS -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=10
  -print_final_stats=1 and the dictionary fuzz/json.dict (fuzz/token_file.dict for
  token_file).
Working corpus:  build-fuzz/corpus/<name>/  (seeded from tests/corpus/fuzz/<name>/, kept
                 between runs; never inside the source tree)
Crash inputs:    build-fuzz/artifacts/<name>/  (crash-*, leak-*, timeout-*, oom-*)
Logs:            build-fuzz/logs/<name>.log
Prints one line per harness: seconds run, executions (libFuzzer's
stat::number_of_executed_units), corpus size, crashes. libFuzzer stops a harness at its
first crash; fix the parser, copy the input into tests/corpus/fuzz/<name>/ (the
fuzz_replay_<name> ctest replays it) and run the harness again.
Exits 1 if any harness found a crash, 2 on a usage or build error.

Environment: JOBS (build parallelism, default 2), FUZZ_ARGS (extra libFuzzer flags).
Run long sessions under `nice -n 19` on a shared machine.
Harnesses:
EOF
  for f in "$ROOT"/fuzz/fuzz_*.cpp; do n=$(basename "$f" .cpp); echo "  ${n#fuzz_}"; done
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=$ROOT/build-fuzz
SECS=600
NAMES=()
for a in "$@"; do
  case $a in
    -h | --help) usage; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $a (see --help)" >&2; exit 2 ;;
  esac
done
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
  SECS=$1
  shift
fi
NAMES=("$@")
if [[ ${#NAMES[@]} -eq 0 ]]; then
  for f in "$ROOT"/fuzz/fuzz_*.cpp; do n=$(basename "$f" .cpp); NAMES+=("${n#fuzz_}"); done
fi
for n in "${NAMES[@]}"; do
  if [[ ! -f $ROOT/fuzz/fuzz_$n.cpp ]]; then
    echo "fuzz.sh: no harness '$n' (fuzz/fuzz_$n.cpp); see --help" >&2
    exit 2
  fi
done

# Configure and build (only the harnesses asked for).
if [[ ! -f $BUILD/CMakeCache.txt ]]; then
  (cd "$ROOT" && CXX=clang++ cmake --preset fuzz) || { echo "fuzz.sh: configure failed" >&2; exit 2; }
fi
targets=()
for n in "${NAMES[@]}"; do targets+=(--target "fuzz_$n"); done
cmake --build "$BUILD" -j"${JOBS:-2}" "${targets[@]}" || { echo "fuzz.sh: build failed" >&2; exit 2; }

mkdir -p "$BUILD/logs"
export OMP_NUM_THREADS=1
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
results=()
found=0
for n in "${NAMES[@]}"; do
  corpus=$BUILD/corpus/$n
  art=$BUILD/artifacts/$n
  log=$BUILD/logs/$n.log
  mkdir -p "$corpus" "$art"
  if [[ -d $ROOT/tests/corpus/fuzz/$n ]]; then cp -n "$ROOT"/tests/corpus/fuzz/"$n"/* "$corpus"/ 2>/dev/null; fi
  dict=$ROOT/fuzz/json.dict
  [[ $n == token_file ]] && dict=$ROOT/fuzz/token_file.dict
  # Rebuild right before the run, so that a parser fixed while earlier harnesses ran is
  # fuzzed in its fixed form (a failed rebuild keeps the previous binary).
  cmake --build "$BUILD" -j"${JOBS:-2}" --target "fuzz_$n" >"$BUILD/logs/$n.build.log" 2>&1 ||
    echo "   warning: rebuilding fuzz_$n failed (see $BUILD/logs/$n.build.log); running the previous binary"
  before=$(ls "$art" | grep -v '^slow-unit-' | sort)
  echo "== fuzz_$n: ${SECS} s (log $log)"
  t0=$(date +%s)
  # shellcheck disable=SC2086
  "$BUILD/fuzz/fuzz_$n" -max_total_time="$SECS" -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=10 \
    -print_final_stats=1 -dict="$dict" -artifact_prefix="$art/" ${FUZZ_ARGS:-} "$corpus" >"$log" 2>&1
  rc=$?
  t1=$(date +%s)
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$')
  [[ -z $execs ]] && execs=$(grep -o '^#[0-9]*' "$log" | tail -1 | tr -d '#')
  new=$(comm -13 <(echo "$before") <(ls "$art" | grep -v '^slow-unit-' | sort) | grep -c . || true)
  if [[ $rc -ne 0 && $new -eq 0 ]]; then new=1; fi  # died without leaving an input: still a failure
  [[ $new -gt 0 ]] && found=1
  size=$(ls "$corpus" | wc -l)
  results+=("$(printf '%-18s %8s %14s %8s %8s' "$n" "$((t1 - t0))" "${execs:-?}" "$size" "$new")")
  if [[ $new -gt 0 ]]; then
    echo "   crash: $(comm -13 <(echo "$before") <(ls "$art" | grep -v '^slow-unit-' | sort) | sed "s|^|$art/|" | tr '\n' ' ')"
    grep -m1 -E 'ERROR: (AddressSanitizer|libFuzzer|LeakSanitizer)|runtime error|invariant violated|terminate called' \
      "$log" | sed 's/^/   /'
  fi
done
echo
printf '%-18s %8s %14s %8s %8s\n' harness seconds executions corpus crashes
for r in "${results[@]}"; do echo "$r"; done
exit $found
