#!/usr/bin/env bash
# `moetune bench` under mpirun and scripts/bench_sweep.sh: at -np 2 with experts split
# over both ranks (ep 2) the JSON has every phase, all-to-all bytes and tokens/s > 0;
# a two-point sweep writes its table; bad sweep arguments exit 1 naming --sweep.
# Speed is never asserted. usage: bench_cli.sh <moetune binary> <scripts dir> <scratch dir>
set -euo pipefail
moetune=$1
scripts=$2
dir=$3
rm -rf "$dir" && mkdir -p "$dir"
trap 'rm -rf "$dir"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
fail() { echo "FAIL: $*"; exit 1; }
cat > "$dir/run.json" <<JSON
{"model": {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
           "max_position_embeddings": 64},
 "data": {"seq_len": 32},
 "train": {"micro_batch_size": 2, "global_batch_size": 8}}
JSON

mpirun -np 2 --oversubscribe "$moetune" bench --config "$dir/run.json" --ep 2 --steps 2 --warmup 1 \
    --json "$dir/ep2.json" > "$dir/ep2.txt"
cat "$dir/ep2.txt"
for p in embedding attention dense_ffn router dispatch experts combine shared_expert lm_head_loss \
         embedding_bwd attention_bwd dense_ffn_bwd router_bwd dispatch_bwd experts_bwd combine_bwd \
         shared_expert_bwd lm_head_loss_bwd grad_accum grad_reduce optimizer; do
  grep -q "\"$p\": {" "$dir/ep2.json" || fail "phase $p missing from the JSON"
done
tps=$(grep -m1 '"tokens_per_s":' "$dir/ep2.json" | tr -dc '0-9.e+-')
awk -v t="$tps" 'BEGIN { exit !(t > 0) }' || fail "tokens_per_s = $tps"
bytes=$(grep -m1 '"dispatch_bytes":' "$dir/ep2.json" | tr -dc '0-9.e+-')
awk -v b="$bytes" 'BEGIN { exit !(b > 0) }' || fail "no all-to-all bytes at ep 2 ($bytes)"
grep -q '"world_size": 2' "$dir/ep2.json" || fail "layout not in the JSON"
grep -q 'W=2 ep=2' "$dir/ep2.txt" || fail "table does not name the layout"

# A bad layout fails on every rank with one message.
set +e
out=$(mpirun -np 2 --oversubscribe "$moetune" bench --config "$dir/run.json" --ep 3 2>&1)
code=$?
set -e
[[ $code -eq 1 ]] || fail "--ep 3 at 2 ranks: exit $code"
[[ $(grep -c '^error:' <<< "$out") -eq 1 ]] || fail "--ep 3: expected one error line, got: $out"

# Sweep: two points, the table and CSV have one row each.
STEPS=1 WARMUP=0 MOETUNE=$moetune bash "$scripts/bench_sweep.sh" --config "$dir/run.json" --out "$dir/sweep" \
    --sweep ranks=1,2 threads=1 > "$dir/sweep.txt"
cat "$dir/sweep.txt"
[[ $(wc -l < "$dir/sweep/sweep.csv") -eq 3 ]] || fail "sweep.csv should have a header and 2 rows"
grep -q '^| ranks |' "$dir/sweep/sweep.md" || fail "no markdown table"
for bad in "--sweep colour=1,2" "--sweep ranks=0" "--sweep ranks" "--sweep"; do
  set +e
  out=$(MOETUNE=$moetune bash "$scripts/bench_sweep.sh" --config "$dir/run.json" --out "$dir/bad" $bad 2>&1)
  code=$?
  set -e
  [[ $code -eq 1 ]] || fail "$bad: exit $code"
  grep -q -- '--sweep' <<< "$out" || fail "$bad: message does not name --sweep: $out"
done
echo "bench_cli: OK"
