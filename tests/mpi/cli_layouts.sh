#!/usr/bin/env bash
# End-to-end layout invariance of `moetune train` under mpirun: 20 training steps of
# the same config and global batch at (W, ep) in {(1,1), (2,1), (2,2), (4,1), (4,2),
# (4,4)} (and ZeRO-1 at (4,2)) must give identical loss curves and byte-identical
# final checkpoints, and so must Muon at six layouts (with a resume at another layout)
# and the whole DeepSeek-V4 shape with Muon at (1,1), (2,2), (4,2), (4,4) with ZeRO-1 off
# and on; parallel.reduction = "fp32" must repeat its bytes on one layout;
# impossible layouts must fail fast with one message and exit 1.
# usage: cli_layouts.sh <moetune binary> <scratch dir>
set -euo pipefail
moetune=$1
dir=$2
rm -rf "$dir" && mkdir -p "$dir"
trap 'rm -rf "$dir"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
run() { mpirun -np "$1" --oversubscribe "$moetune" "${@:2}"; }

"$moetune" gen-data --out "$dir/data.jsonl" --docs 300 --vocab 64 --min-len 8 --max-len 40 > /dev/null
cat > "$dir/run.json" <<JSON
{"model": {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "n_routed_experts": 4, "num_experts_per_tok": 2,
           "max_position_embeddings": 64, "aux_loss_coeff": 0.01},
 "data": {"train": "data.jsonl", "seq_len": 32},
 "train": {"steps": 20, "micro_batch_size": 2, "global_batch_size": 16, "seed": 5, "save_every": 10},
 "optim": {"lr": 3e-3, "warmup_steps": 2}}
JSON
ref=""
for layout in "1 1 0" "2 1 0" "2 2 0" "4 1 0" "4 2 0" "4 4 0" "4 2 1"; do
  set -- $layout
  out="$dir/run_$1_$2_$3"
  run "$1" train --config "$dir/run.json" --out "$out" --set parallel.ep="$2" --set parallel.zero_stage="$3" \
      --peak-gflops 10 --quiet
  curve=$(grep -o '"loss":[^,]*' "$out/metrics.jsonl" | tr '\n' ' ')
  hash=$(cat "$out"/step-00000020/model-*.safetensors "$out"/step-00000020/optimizer-*.safetensors | sha256sum | cut -d' ' -f1)
  echo "W=$1 ep=$2 zero=$3 final $(grep -o '"loss":[^,]*' "$out/metrics.jsonl" | tail -1) sha256 $hash"
  if [[ -z $ref ]]; then
    ref_curve=$curve ref=$hash
  else
    [[ $curve == "$ref_curve" ]] || { echo "FAIL: loss curve differs at W=$1 ep=$2 zero=$3"; exit 1; }
    [[ $hash == "$ref" ]] || { echo "FAIL: checkpoint differs at W=$1 ep=$2 zero=$3"; exit 1; }
  fi
done

# optim.name = "muon" (Muon for the matrices, each expert's on the rank that owns it; under
# ZeRO-1 whole matrices per shard): the same invariance, and a resume at another layout
# from the ZeRO-1 run's step-10 checkpoint ends in the same bytes.
ref=""
for layout in "1 1 0" "2 2 0" "4 2 0" "4 2 1" "4 4 1" "2 1 1"; do
  set -- $layout
  out="$dir/muon_$1_$2_$3"
  run "$1" train --config "$dir/run.json" --out "$out" --set parallel.ep="$2" --set parallel.zero_stage="$3" \
      --set optim.name=muon --peak-gflops 10 --quiet
  curve=$(grep -o '"loss":[^,]*' "$out/metrics.jsonl" | tr '\n' ' ')
  hash=$(cat "$out"/step-00000020/model-*.safetensors "$out"/step-00000020/optimizer-*.safetensors | sha256sum | cut -d' ' -f1)
  echo "muon W=$1 ep=$2 zero=$3 final $(grep -o '"loss":[^,]*' "$out/metrics.jsonl" | tail -1) sha256 $hash"
  if [[ -z $ref ]]; then
    ref_curve=$curve ref=$hash
  else
    [[ $curve == "$ref_curve" ]] || { echo "FAIL: muon loss curve differs at W=$1 ep=$2 zero=$3"; exit 1; }
    [[ $hash == "$ref" ]] || { echo "FAIL: muon checkpoint differs at W=$1 ep=$2 zero=$3"; exit 1; }
  fi
done
run 2 train --config "$dir/run.json" --out "$dir/muon_resumed" --set parallel.ep=2 --set optim.name=muon \
    --resume-from "$dir/muon_4_2_1/step-00000010" --peak-gflops 10 --quiet
hash=$(cat "$dir"/muon_resumed/step-00000020/model-*.safetensors "$dir"/muon_resumed/step-00000020/optimizer-*.safetensors | sha256sum | cut -d' ' -f1)
[[ $hash == "$ref" ]] || { echo "FAIL: muon run resumed at W=2 ep=2 from W=4 ep=2 ZeRO-1 differs"; exit 1; }
echo "muon: resumed at another layout, same final checkpoint"
if out=$("$moetune" train --config "$dir/run.json" --out "$dir/muon_switch" --resume-from "$dir/muon_1_1_0/step-00000010" \
    --peak-gflops 10 --quiet 2>&1); then
  echo "FAIL: resuming a Muon checkpoint with AdamW was accepted"; exit 1
fi
grep -q "optim.name" <<<"$out" || { echo "FAIL: the optimizer switch error does not name optim.name: $out"; exit 1; }

# The whole DeepSeek-V4 shape (MODEL.md section 12) with Muon: V4 attention (sinks, a
# sliding window shorter than the rows, grouped output projection), no dense layer,
# layer 0 hash-routed (its tid2eid table travels in the checkpoint), sqrtsoftplus,
# clamped experts, mHC with two streams and the MTP block (its experts sharded like any);
# at (1,1), (2,2), (4,2), (4,4), ZeRO-1 off and on: the same loss curve and bytes.
v4=(--set model.q_lora_rank=16 --set model.qk_rope_head_dim=4 --set model.o_groups=2 --set model.o_lora_rank=8
    --set model.attention_type=v4 --set model.sliding_window=16 --set model.first_k_dense_replace=0
    --set model.num_hash_layers=1 --set model.scoring_func=sqrtsoftplus --set model.swiglu_limit=0.5
    --set model.n_shared_experts=1 --set model.hc_mult=2 --set model.num_nextn_predict_layers=1
    --set optim.name=muon --set train.steps=10)
ref=""
for layout in "1 1 0" "1 1 1" "2 2 0" "2 2 1" "4 2 0" "4 2 1" "4 4 0" "4 4 1"; do
  set -- $layout
  out="$dir/v4_$1_$2_$3"
  run "$1" train --config "$dir/run.json" --out "$out" --set parallel.ep="$2" --set parallel.zero_stage="$3" \
      "${v4[@]}" --peak-gflops 10 --quiet
  curve=$(grep -o '"loss":[^,]*' "$out/metrics.jsonl" | tr '\n' ' ')
  mtp=$(grep -o '"mtp_loss":[^,]*' "$out/metrics.jsonl" | tr '\n' ' ')
  hash=$(cat "$out"/step-00000010/model-*.safetensors "$out"/step-00000010/optimizer-*.safetensors | sha256sum | cut -d' ' -f1)
  grep -q '"model.layers.0.mlp.gate.tid2eid":{"dtype":"I32","shape":\[64,2\]' "$out"/step-00000010/model-00001-*.safetensors ||
    { echo "FAIL: no I32 (64, 2) tid2eid in the V4 checkpoint"; exit 1; }
  grep -q '"mtp.0.self_attn.sinks"' "$out"/step-00000010/model-00001-*.safetensors ||
    { echo "FAIL: no MTP block with V4 attention in the V4 checkpoint"; exit 1; }
  [[ -n $mtp ]] || { echo "FAIL: no mtp_loss in metrics.jsonl"; exit 1; }
  echo "V4+Muon W=$1 ep=$2 zero=$3 final $(grep -o '"loss":[^,]*' "$out/metrics.jsonl" | tail -1) sha256 $hash"
  if [[ -z $ref ]]; then
    ref_curve=$curve ref_mtp=$mtp ref=$hash
  else
    [[ $curve == "$ref_curve" ]] || { echo "FAIL: V4 loss curve differs at W=$1 ep=$2 zero=$3"; exit 1; }
    [[ $mtp == "$ref_mtp" ]] || { echo "FAIL: V4 MTP loss curve differs at W=$1 ep=$2 zero=$3"; exit 1; }
    [[ $hash == "$ref" ]] || { echo "FAIL: V4 checkpoint differs at W=$1 ep=$2 zero=$3"; exit 1; }
  fi
done

# parallel.reduction = "fp32": deterministic for a given layout (two runs, the same bytes).
for rep in 1 2; do
  run 2 train --config "$dir/run.json" --out "$dir/fp32_$rep" --set parallel.ep=2 --set parallel.reduction=fp32 \
      --set train.steps=6 --set train.save_every=6 --peak-gflops 10 --quiet
done
h1=$(cat "$dir"/fp32_1/step-00000006/model-*.safetensors | sha256sum | cut -d' ' -f1)
h2=$(cat "$dir"/fp32_2/step-00000006/model-*.safetensors | sha256sum | cut -d' ' -f1)
[[ $h1 == "$h2" ]] || { echo "FAIL: parallel.reduction=fp32 gave different bytes on the same layout"; exit 1; }
echo "fp32 reduction: the same bytes twice at W=2 ep=2"

# Bad layouts: non-zero exit, one message naming the key, within seconds.
check_bad() {
  local np=$1 key=$2
  shift 2
  local start=$SECONDS
  if out=$(timeout 60 mpirun -np "$np" --oversubscribe "$moetune" train --config "$dir/run.json" --out "$dir/bad" "$@" 2>&1); then
    echo "FAIL: accepted: -np $np $*"; exit 1
  fi
  local n
  n=$(grep -c "^error: .*$key" <<<"$out" || true)
  [[ $n == 1 ]] || { echo "FAIL: expected one 'error: ... $key' line for -np $np $*, got $n:"; echo "$out"; exit 1; }
  (( SECONDS - start < 30 )) || { echo "FAIL: took $((SECONDS - start)) s"; exit 1; }
  echo "rejected -np $np $*: $(grep '^error' <<<"$out")"
}
check_bad 2 parallel.ep --set parallel.ep=3                  # W not divisible by ep
check_bad 4 parallel.ep --set parallel.ep=4 --set model.n_routed_experts=6 --set model.num_experts_per_tok=2  # E % ep
check_bad 4 train.global_batch_size --set train.global_batch_size=4   # more ranks than micro-batches
check_bad 2 data.jsonl --set data.train=/nonexistent/data.jsonl
echo "cli_layouts: all layouts identical, bad layouts rejected"
