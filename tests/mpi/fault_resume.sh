#!/usr/bin/env bash
# Exact resume and surviving killed ranks, end to end under mpirun:
#  - an uninterrupted 30-step run (W=2, ep=2) is the reference;
#  - a rank killed after a random step, relaunched by scripts/supervise.sh with
#    --auto-resume, ends with the same loss curve and the same final checkpoint bytes;
#  - a rank killed in the middle of a checkpoint write: same, and the earlier
#    checkpoints stay valid;
#  - stopping at step 10 and resuming at another layout (W=1) gives the same result;
#  - a corrupt newest checkpoint is skipped by --auto-resume and refused by --resume-from.
# usage: fault_resume.sh <moetune binary> <scripts dir> <scratch dir>
set -euo pipefail
moetune=$1 scripts=$2 dir=$3
rm -rf "$dir" && mkdir -p "$dir"
trap 'rm -rf "$dir"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
"$moetune" gen-data --out "$dir/data.jsonl" --docs 300 --vocab 64 --min-len 8 --max-len 40 > /dev/null
cat > "$dir/run.json" <<JSON
{"model": {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "n_routed_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 64},
 "data": {"train": "data.jsonl", "seq_len": 32},
 "train": {"steps": 30, "micro_batch_size": 2, "global_batch_size": 8, "seed": 3, "save_every": 5},
 "optim": {"lr": 3e-3, "warmup_steps": 3}}
JSON
train() { local np=$1; shift; mpirun -np "$np" --oversubscribe -x MOETUNE_FAULT "$moetune" train --config "$dir/run.json" --peak-gflops 10 --quiet "$@"; }
final() { cat "$1"/step-00000030/model-*.safetensors "$1"/step-00000030/optimizer-*.safetensors | sha256sum | cut -d' ' -f1; }
curve() { grep -o '"loss":[^,]*' "$1/metrics.jsonl" | sha256sum | cut -d' ' -f1; }
same() { [[ $(final "$dir/ref") == $(final "$1") && $(curve "$dir/ref") == $(curve "$1") ]] || { echo "FAIL: $2"; exit 1; }; echo "ok: $2"; }
export MOETUNE_FAULT=""

train 2 --out "$dir/ref" --set parallel.ep=2

# The fault step is random but printed, and reproducible: FAULT_SEED=<n> replays a run.
seed=${FAULT_SEED:-$(( $(od -An -N2 -tu2 /dev/urandom) ))}
RANDOM=$seed
step=$((RANDOM % 25 + 3))
echo "fault_resume.sh: FAULT_SEED=$seed -> rank 1 is killed after step $step"
MOETUNE_FAULT="rank=1,step=$step,when=after-step,once=$dir/fired1" \
  bash "$scripts/supervise.sh" --max-restarts 2 -- \
  mpirun -np 2 --oversubscribe -x MOETUNE_FAULT "$moetune" train --config "$dir/run.json" --peak-gflops 10 --quiet \
  --out "$dir/kill" --set parallel.ep=2 --auto-resume
[[ -f $dir/fired1 ]] || { echo "FAIL: the fault did not fire"; exit 1; }
same "$dir/kill" "rank 1 killed after step $step, supervised relaunch"

MOETUNE_FAULT="rank=0,step=20,when=in-save,once=$dir/fired2" \
  bash "$scripts/supervise.sh" --max-restarts 2 -- \
  mpirun -np 2 --oversubscribe -x MOETUNE_FAULT "$moetune" train --config "$dir/run.json" --peak-gflops 10 --quiet \
  --out "$dir/save" --set parallel.ep=2 --auto-resume
[[ -f $dir/fired2 ]] || { echo "FAIL: the in-save fault did not fire"; exit 1; }
same "$dir/save" "rank 0 killed while writing checkpoint 20, supervised relaunch"
for s in 5 10 15; do  # the checkpoints before the fault are intact (resuming at their own last step only verifies them)
  ck=$(printf '%s/save/step-%08d' "$dir" "$s")
  train 1 --out "$dir/verify" --resume-from "$ck" --set train.steps=$s --set optim.warmup_steps=1 > /dev/null \
    || { echo "FAIL: checkpoint $ck damaged"; exit 1; }
done
echo "ok: checkpoints 5, 10, 15 written before the fault verify and load"

# Stop at step 10 (rank killed, no supervisor), resume on one rank (another layout).
MOETUNE_FAULT="rank=0,step=10,when=after-step,once=$dir/fired3" train 2 --out "$dir/split" --set parallel.ep=2 \
  > /dev/null 2>&1 && { echo "FAIL: the run was not killed"; exit 1; }
MOETUNE_FAULT="" train 1 --out "$dir/split" --auto-resume
same "$dir/split" "stopped at step 10 at (W=2, ep=2), resumed at (W=1, ep=1)"

# Corrupt the newest checkpoint: --auto-resume skips it, --resume-from refuses it.
cp -r "$dir/ref" "$dir/corrupt"
f=$(ls "$dir"/corrupt/step-00000030/model-*.safetensors | head -1)
printf '\x01' | dd of="$f" bs=1 seek=200 conv=notrunc status=none
if out=$(train 1 --out "$dir/x" --resume-from "$dir/corrupt/step-00000030" 2>&1); then
  echo "FAIL: a corrupt checkpoint was loaded"; exit 1
fi
grep -q "SHA-256 differs" <<<"$out" || { echo "FAIL: unclear message: $out"; exit 1; }
echo "ok: --resume-from a corrupt checkpoint: $(grep '^error' <<<"$out")"
out=$(train 1 --out "$dir/corrupt" --auto-resume 2>&1)
grep -q "skipping checkpoint .*step-00000030" <<<"$out" || { echo "FAIL: corrupt checkpoint not skipped: $out"; exit 1; }
echo "ok: --auto-resume skipped the corrupt step-00000030 and resumed from step-00000025"
# A non-finite step is skipped on every rank, counted, and training goes on.
MOETUNE_FAULT="rank=1,step=7,when=nan" train 2 --out "$dir/nan" --set parallel.ep=2
grep -q '"skipped":true,"skipped_total":1,"step":7' "$dir/nan/metrics.jsonl" || { echo "FAIL: step 7 not skipped"; exit 1; }
[[ $(grep -c '"skipped":true' "$dir/nan/metrics.jsonl") == 1 ]] || { echo "FAIL: more than one skipped step"; exit 1; }
grep -q '"loss":nan\|"loss":null' "$dir/nan/step-00000030/trainer_state.json" && { echo "FAIL: NaN got in"; exit 1; }
echo "ok: a non-finite step (7) was skipped and counted; the run finished"
# With max_consecutive_skips=1 the first non-finite step stops the run, naming the last good checkpoint.
if out=$(MOETUNE_FAULT="rank=0,step=12,when=nan" train 2 --out "$dir/nanstop" --set train.max_consecutive_skips=1 2>&1); then
  echo "FAIL: the run did not stop"; exit 1
fi
grep -q "consecutive non-finite steps.*step-00000010" <<<"$out" || { echo "FAIL: unclear message: $out"; exit 1; }
echo "ok: $(grep '^error' <<<"$out")"

# Disk full while writing a checkpoint: a clear error, and the existing checkpoint of
# that step is left intact. The output directory is a small tmpfs that holds the two
# last checkpoints and little more (skipped with a notice where mounting is not allowed).
full="$dir/full"
mkdir -p "$full"
need=$(du -sk "$dir/ref/step-00000025" "$dir/ref/step-00000030" | awk '{s += $1} END {print s}')
if mount -t tmpfs -o size=$((need + 64))k tmpfs "$full" 2>/dev/null; then
  cp -r "$dir/ref/step-00000025" "$dir/ref/step-00000030" "$full/"
  if out=$(train 1 --out "$full" --resume-from "$full/step-00000025" 2>&1); then
    umount "$full"; echo "FAIL: writing to a full file system succeeded"; exit 1
  fi
  ok=1
  grep -q "^error: .*step-00000030.*saving the checkpoint failed" <<<"$out" || ok=0
  [[ $(final "$dir/ref") == $(cat "$full"/step-00000030/model-*.safetensors "$full"/step-00000030/optimizer-*.safetensors | sha256sum | cut -d' ' -f1) ]] || ok=0
  ls "$full" | grep -q tmp && ok=0   # no half-written directory left behind
  umount "$full"
  [[ $ok == 1 ]] || { echo "FAIL: disk full: $out"; exit 1; }
  echo "ok: disk full: $(grep '^error' <<<"$out" | cut -c1-200)..."
else
  echo "skipped: cannot mount a tmpfs here (disk-full check needs root)"
fi
echo "fault_resume: all checks passed"
