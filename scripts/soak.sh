#!/usr/bin/env bash
# Soak: a long supervised run under mpirun with injected faults, compared at the end
# with an uninterrupted run of the same job.
#
#   train (default)  `moetune train` for --steps (1500) at -np 2, ep=2. In each window of
#                    --every (100) steps one fault: a random rank is SIGKILLed after a
#                    random step (2 in 3) or in the middle of writing a checkpoint (1 in 3).
#                    Three steps get a non-finite gradient on one rank (the update is
#                    skipped everywhere; the reference run gets the same three). Once, the
#                    file system of the output directory fills up (a tmpfs mounted for the
#                    run, when this user may mount one), so that a checkpoint write fails
#                    with ENOSPC; space is freed before the relaunch.
#   --rl             the same for `moetune rl` on the arithmetic task (kills and the full
#                    disk; RL has no NaN injection), default 300 steps, a fault every 50.
#
# scripts/supervise.sh relaunches the job with --auto-resume after every fault. The fault
# schedule comes from --seed (printed; random by default): the same seed gives the same
# faults. At the end a summary: steps, faults injected by kind, restarts, skipped steps,
# lost (recomputed) steps, and whether the final checkpoint's SHA-256 and the loss curve
# equal the uninterrupted run's. Exit status 1 if they differ or a fault did not fire.
#
# usage: scripts/soak.sh [--steps N] [--every K] [--seed S] [--np W] [--ep E] [--rl]
#                        [--moetune BIN] [--dir DIR] [--keep]
#   --dir DIR   work directory (default: a new /tmp/moetune-soak.XXXXXX, removed at the
#               end unless --keep)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts=$PWD/scripts

mode=train steps="" every="" seed="" np=2 ep=2 moetune=$PWD/build/moetune dir="" keep=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --steps) steps=${2:?}; shift 2 ;;
    --every) every=${2:?}; shift 2 ;;
    --seed) seed=${2:?}; shift 2 ;;
    --np) np=${2:?}; shift 2 ;;
    --ep) ep=${2:?}; shift 2 ;;
    --rl) mode=rl; shift ;;
    --moetune) moetune=$(realpath "${2:?}"); shift 2 ;;
    --dir) dir=${2:?}; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "soak.sh: unknown option '$1' (try --help)" >&2; exit 2 ;;
  esac
done
[[ -x $moetune ]] || { echo "soak.sh: $moetune is not an executable (build first: scripts/setup.sh)" >&2; exit 2; }
if [[ $mode == train ]]; then steps=${steps:-1500} every=${every:-100}; else steps=${steps:-300} every=${every:-50}; fi
save_every=$([[ $mode == train ]] && echo 20 || echo 5)
for v in steps every np ep; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "soak.sh: --$v must be a positive integer, not '${!v}'" >&2; exit 2; }
done
((every >= 10 && steps >= 2 * every)) || { echo "soak.sh: need --every >= 10 and --steps >= 2 x --every" >&2; exit 2; }
seed=${seed:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}
[[ $seed =~ ^[0-9]+$ ]] || { echo "soak.sh: --seed must be a non-negative integer" >&2; exit 2; }
RANDOM=$seed

dir=${dir:-$(mktemp -d /tmp/moetune-soak.XXXXXX)}
mkdir -p "$dir"
dir=$(realpath "$dir")
run=$dir/run  # the faulty run's output; a tmpfs when it can be mounted
mounted=0
cleanup() {
  if ((mounted)); then umount "$run" 2>/dev/null || true; fi
  if ((keep == 0)); then rm -rf "$dir"; fi
}
trap cleanup EXIT
rm -rf "$dir/ref" "$dir/fired" "$dir/done" "$run" && mkdir -p "$dir/fired" "$run"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
echo "soak.sh: $mode, $steps steps at -np $np ep=$ep, a fault every ~$every steps, seed $seed" \
     "(rerun with --seed $seed for the same faults); work directory $dir"

# ---- the job -----------------------------------------------------------------------------
if [[ $mode == train ]]; then
  "$moetune" gen-data --out "$dir/data.jsonl" --docs 2000 --vocab 64 --min-len 8 --max-len 40 --seed 5 > /dev/null
  cat > "$dir/run.json" <<JSON
{"model": {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "n_routed_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 64},
 "data": {"train": "data.jsonl", "seq_len": 32},
 "train": {"steps": $steps, "micro_batch_size": 2, "global_batch_size": 8, "seed": 3,
           "save_every": $save_every, "keep_checkpoints": 3},
 "optim": {"lr": 1e-3, "warmup_steps": 20}}
JSON
  job=("$moetune" train --config "$dir/run.json" --peak-gflops 10 --quiet --set parallel.ep="$ep")
else
  "$moetune" gen-data --task arith --digits 1 --ops + --sft 400 --train-prompts 64 --test-prompts 8 \
      --out "$dir/data" > /dev/null
  cat > "$dir/run.json" <<JSON
{"model": {"vocab_size": 263, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "n_routed_experts": 4, "num_experts_per_tok": 2,
           "moe_intermediate_size": 16, "intermediate_size": 64, "max_position_embeddings": 64,
           "initializer_range": 0.1},
 "data": {"seq_len": 64},
 "train": {"steps": $steps, "micro_batch_size": 4, "seed": 7, "save_every": $save_every, "keep_checkpoints": 3},
 "optim": {"lr": 1e-3, "warmup_steps": 0, "weight_decay": 0.01},
 "rl": {"prompts_per_step": 4, "num_generations": 4, "max_new_tokens": 6, "generation_batch_size": 8}}
JSON
  "$moetune" init --config "$dir/run.json" --out "$dir/base" --tokenizer byte > /dev/null
  "$moetune" sft --init-from "$dir/base" --data "$dir/data/sft.jsonl" --out "$dir/sft" --config "$dir/run.json" \
      --set train.steps=20 --set train.save_every=0 --peak-gflops 10 --quiet > /dev/null
  job=("$moetune" rl --init-from "$dir/sft/step-00000020" --prompts "$dir/data/train_prompts.jsonl"
       --config "$dir/run.json" --peak-gflops 10 --quiet --set parallel.ep="$ep")
fi

# ---- the fault schedule --------------------------------------------------------------------
declare -A used
kills=()
windows=$((steps / every))
full_window=$((windows / 2))  # this window's fault is the full disk, not a kill
for ((k = 0; k < windows; ++k)); do
  ((k != full_window)) || continue
  s=$((k * every + 1 + RANDOM % every))
  ((s < steps)) || s=$((steps - 1))
  rank=$((RANDOM % np))
  when=after-step
  if ((RANDOM % 3 == 0)); then
    t=$(((s + save_every - 1) / save_every * save_every))
    if ((t < steps)) && [[ -z ${used[$t]:-} ]]; then s=$t when=in-save; fi
  fi
  [[ -z ${used[$s]:-} ]] || continue  # one fault per step
  used[$s]=1
  kills+=("rank=$rank,step=$s,when=$when,once=$dir/fired/$when-$s")
done
nans=()
if [[ $mode == train ]]; then
  while ((${#nans[@]} < 3)); do
    s=$((2 + RANDOM % (steps - 2)))
    [[ -z ${used[$s]:-} ]] || continue
    used[$s]=1
    nans+=("rank=$((RANDOM % np)),step=$s,when=nan")
  done
fi
# Early enough in its window that the next checkpoint write (within save_every steps)
# comes before the next window's kill.
span=$((every - 2 * save_every))
full_at=$((full_window * every + 1 + RANDOM % (span > 1 ? span : 1)))
join() { local IFS=';'; echo "$*"; }
echo "soak.sh: faults: ${#kills[@]} kills ($(join "${kills[@]%%,once=*}" | sed 's/;/; /g'))"
((${#nans[@]} == 0)) || echo "soak.sh: non-finite gradients: $(join "${nans[@]}" | sed 's/;/; /g')"

# ---- the uninterrupted reference (the same non-finite steps) ---------------------------------
t0=$(date +%s)
MOETUNE_FAULT=$(join "${nans[@]}") mpirun -np "$np" --oversubscribe -x MOETUNE_FAULT "${job[@]}" --out "$dir/ref" \
  > "$dir/ref.log" 2>&1 || { echo "soak.sh: the reference run failed; see $dir/ref.log" >&2; tail -5 "$dir/ref.log" >&2; exit 1; }
t1=$(date +%s)
echo "soak.sh: reference run done in $((t1 - t0)) s"

# ---- the faulty run ------------------------------------------------------------------------
filler=$run/filler
if [[ $(id -u) -eq 0 ]] && mount -t tmpfs -o size=64m moetune-soak "$run" 2>/dev/null; then
  mounted=1
  echo "soak.sh: the run's output is a 64 MiB tmpfs; it fills up after step $full_at"
else
  echo "soak.sh: cannot mount a tmpfs here (needs root): no full-disk fault"
fi
last_step() { grep -o '"step":[0-9]*' "$run/metrics.jsonl" 2>/dev/null | tail -n1 | cut -d: -f2; }
# Before each relaunch: note where the job got to and where it will resume; free space.
cat > "$dir/before_restart.sh" <<HOOK
last=\$(grep -o '"step":[0-9]*' "$run/metrics.jsonl" 2>/dev/null | tail -n1 | cut -d: -f2)
ck=0
for d in "$run"/step-*; do
  [[ -f \$d/manifest.json && \$d != *.tmp* ]] || continue
  s=\${d##*/step-}; s=\$((10#\$s)); ((s > ck)) && ck=\$s
done
echo "\$SUPERVISE_RC \${last:-0} \$ck" >> "$dir/restarts.log"
rm -f "$filler"
HOOK
: > "$dir/restarts.log"
if ((mounted)); then
  (  # fill the disk once the run has passed step full_at
    while [[ ! -f $dir/done ]]; do
      if (($(last_step || echo 0) >= full_at)); then
        dd if=/dev/zero of="$filler" bs=64k 2>/dev/null || true
        echo "$(last_step)" > "$dir/fired/disk-full"
        exit 0
      fi
      sleep 0.2
    done
  ) &
  watcher=$!
fi
MOETUNE_FAULT=$(join "${nans[@]}" "${kills[@]}") bash "$scripts/supervise.sh" --max-restarts $((windows + 10)) \
  --delay 0 --before-restart "bash $dir/before_restart.sh" -- \
  mpirun -np "$np" --oversubscribe -x MOETUNE_FAULT "${job[@]}" --out "$run" --auto-resume \
  > "$dir/soak.log" 2>&1 || { touch "$dir/done"; echo "soak.sh: the supervised run failed; see $dir/soak.log" >&2;
                              tail -5 "$dir/soak.log" >&2; exit 1; }
touch "$dir/done"
if ((mounted)); then wait "$watcher" 2>/dev/null || true; fi
t2=$(date +%s)

# ---- the verdict ---------------------------------------------------------------------------
final() { cat "$1"/step-$(printf '%08d' "$steps")/model*.safetensors "$1"/step-$(printf '%08d' "$steps")/optimizer*.safetensors | sha256sum | cut -d' ' -f1; }
if [[ $mode == train ]]; then
  curve() { grep -o '"loss":[^,]*' "$1/metrics.jsonl" | sha256sum | cut -d' ' -f1; }
else  # every RL metric but the timings
  curve() { sed -E 's/"(time\/[a-z_+]+|gen_tokens_per_s|train_tokens_per_s|mfu_update)":[^,}]*,?//g' "$1/metrics.jsonl" | sha256sum | cut -d' ' -f1; }
fi
ref_hash=$(final "$dir/ref") run_hash=$(final "$run")
fired_kills=$(ls "$dir/fired" | grep -c -E '^(after-step|in-save)-' || true)
fired_save=$(ls "$dir/fired" | grep -c '^in-save-' || true)
fired_full=$([[ -f $dir/fired/disk-full ]] && echo 1 || echo 0)
enospc=$(grep -c -i 'no space left' "$dir/soak.log" || true)
skipped=$(grep -c '"skipped":true' "$run/metrics.jsonl" || true)
ref_skipped=$(grep -c '"skipped":true' "$dir/ref/metrics.jsonl" || true)
restarts=$(wc -l < "$dir/restarts.log")
lost=$(awk '{ if ($2 > $3) l += $2 - $3 } END { print l + 0 }' "$dir/restarts.log")
rows=$(grep -c '"step"' "$run/metrics.jsonl")
full_ok=$((fired_full > 0 && enospc > 0 ? 1 : 0))
faults=$((fired_kills + (skipped == ${#nans[@]} ? skipped : 0) + full_ok))
ok=1
echo
echo "soak summary ($mode, seed $seed, -np $np ep=$ep, $(getconf _NPROCESSORS_ONLN) cores, $(date -u +%F))"
printf '  %-40s %s\n' "steps" "$steps (metrics rows: $rows)" \
  "faults injected" "$faults" \
  "  SIGKILL after a step" "$((fired_kills - fired_save)) of $(printf '%s\n' "${kills[@]}" | grep -c after-step || true) scheduled" \
  "  SIGKILL inside a checkpoint write" "$fired_save of $(printf '%s\n' "${kills[@]}" | grep -c in-save || true) scheduled" \
  "  non-finite gradient steps" "${#nans[@]} (skipped steps: $skipped; reference: $ref_skipped)" \
  "  full disk (a save fails: ENOSPC)" "$full_ok (after step $full_at; error lines naming it: $enospc)" \
  "restarts" "$restarts" \
  "lost (recomputed) steps" "$lost" \
  "wall time" "reference $((t1 - t0)) s, faulty run $((t2 - t1)) s" \
  "final checkpoint SHA-256" "$run_hash" \
  "  uninterrupted run" "$ref_hash"
if [[ $run_hash == "$ref_hash" ]]; then echo "  checkpoint: MATCH"; else echo "  checkpoint: DIFFERENT"; ok=0; fi
if [[ $(curve "$run") == $(curve "$dir/ref") ]]; then echo "  loss curve: MATCH"; else echo "  loss curve: DIFFERENT"; ok=0; fi
((fired_kills == ${#kills[@]})) || { echo "  not every scheduled kill fired"; ok=0; }
((skipped == ref_skipped && skipped == ${#nans[@]})) || { echo "  skipped steps differ from the injected ones"; ok=0; }
if ((mounted && !full_ok)); then echo "  the full disk did not make a save fail"; ok=0; fi
((ok)) && echo "soak.sh: PASS" || { echo "soak.sh: FAIL (logs in $dir; rerun with --seed $seed --keep)"; keep=1; exit 1; }
