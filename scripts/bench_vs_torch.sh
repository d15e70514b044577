#!/usr/bin/env bash
# moetune vs PyTorch training throughput on this machine, same model and shapes.
#
#   scripts/bench_vs_torch.sh [CONFIG]          (default examples/small.json)
#
# Builds nothing: expects ./build/moetune (override with MOETUNE=/path/to/moetune) and
# Debian's PyTorch in /usr/bin/python3 (override with TORCH_PYTHON=...). For 1 and 2
# threads (THREADS="1 2" to change), runs REPS (default 3) interleaved repetitions of
#   moetune train --set train.steps=STEPS --set train.threads=N   (median tok/s of steps 2..STEPS)
#   bench/torch_peer.py --threads N --steps STEPS-1 --warmup 1      (median tok/s of the timed steps)
# with OMP_NUM_THREADS=N for both, and prints the median over repetitions of each and
# their ratio. Extra arguments for torch_peer.py can be given in PEER_ARGS, e.g.
# PEER_ARGS="--blas-core env --malloc default" for stock PyTorch settings, and extra
# run-config overrides for moetune in MOETUNE_SETS, e.g. MOETUNE_SETS="parallel.reduction=fp32".
# Timings on a shared machine are noisy: compare ratios taken from the same run.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONFIG=${1:-$ROOT/examples/small.json}
MOETUNE=${MOETUNE:-$ROOT/build/moetune}
TORCH_PYTHON=${TORCH_PYTHON:-/usr/bin/python3}
THREADS=${THREADS:-"1 2"}
REPS=${REPS:-3}
STEPS=${STEPS:-20}
PEER_ARGS=${PEER_ARGS:-}
MOETUNE_SETS=${MOETUNE_SETS:-}
SETS=()
for kv in $MOETUNE_SETS; do SETS+=(--set "$kv"); done

[[ -f $CONFIG ]] || { echo "error: config $CONFIG not found" >&2; exit 1; }
[[ -x $MOETUNE ]] || { echo "error: $MOETUNE not found or not executable (build it, or set MOETUNE=...)" >&2; exit 1; }
"$TORCH_PYTHON" -c 'import torch' 2>/dev/null || { echo "error: $TORCH_PYTHON cannot import torch" >&2; exit 1; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/bench_vs_torch.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

# Synthetic data with the vocabulary of the config (the values do not change the speed).
VOCAB=$("$TORCH_PYTHON" -c 'import json,sys; c=json.load(open(sys.argv[1])); print(c.get("model",c).get("vocab_size",512))' "$CONFIG")
"$MOETUNE" gen-data --out "$TMP/data.jsonl" --vocab "$VOCAB" --docs 4000 >/dev/null

median() { "$TORCH_PYTHON" -c 'import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }

run_moetune() {  # threads -> median tokens/s over steps 2..STEPS
  local n=$1 out=$TMP/run-moetune
  rm -rf "$out"
  OMP_NUM_THREADS=$n "$MOETUNE" train --config "$CONFIG" --out "$out" --set train.steps="$STEPS" \
    --set train.threads="$n" --set data.train="$TMP/data.jsonl" --set train.save_every=0 \
    --set optim.schedule=constant --set optim.warmup_steps=0 "${SETS[@]}" \
    --peak-gflops 100 --quiet >/dev/null
  "$TORCH_PYTHON" -c '
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(statistics.median(r["tokens_per_s"] for r in rows if r["step"] >= 2))' "$out/metrics.jsonl"
}

run_torch() {  # threads -> median tokens/s of the timed steps
  local n=$1
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=$n "$TORCH_PYTHON" "$ROOT/bench/torch_peer.py" --config "$CONFIG" --threads "$n" \
    --steps $((STEPS - 1)) --warmup 1 $PEER_ARGS 2>/dev/null |
    "$TORCH_PYTHON" -c '
import json, sys
for line in sys.stdin:
    if line.startswith("{"):
        j = json.loads(line)
        print(j["tokens_per_s_median"], "|", j["openblas_coretype"], "|", j["blas"], "|", j["torch_version"])'
}

echo "config: $CONFIG; moetune: $MOETUNE; $REPS interleaved repetitions of $STEPS steps; PEER_ARGS='$PEER_ARGS'; MOETUNE_SETS='$MOETUNE_SETS'"
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p')"
declare -A M T
INFO=""
for n in $THREADS; do
  ms=() ts=()
  for ((r = 1; r <= REPS; ++r)); do
    m=$(run_moetune "$n")
    tline=$(run_torch "$n")
    t=${tline%% |*}
    INFO=${tline#* | }
    ms+=("$m") ts+=("$t")
    printf '  threads %d rep %d: moetune %8.0f tok/s   pytorch %8.0f tok/s\n' "$n" "$r" "$m" "$t"
  done
  M[$n]=$(median "${ms[@]}")
  T[$n]=$(median "${ts[@]}")
done
echo "pytorch: OPENBLAS_CORETYPE | BLAS | version = $INFO"
echo
printf '%-8s %16s %16s %14s\n' threads "moetune tok/s" "pytorch tok/s" "moetune/torch"
for n in $THREADS; do
  printf '%-8s %16.0f %16.0f %14.2f\n' "$n" "${M[$n]}" "${T[$n]}" \
    "$("$TORCH_PYTHON" -c 'import sys; print(float(sys.argv[1]) / float(sys.argv[2]))' "${M[$n]}" "${T[$n]}")"
done
