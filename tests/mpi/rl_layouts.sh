#!/usr/bin/env bash
# End-to-end checks of `moetune rl`, `generate` and `eval` under mpirun:
#  - layout invariance: 3 RL steps at (W, ep) in {(1,1), (2,1), (2,2), (4,2), (4,4)} and
#    ZeRO-1 at (4,2) give the same metrics (timings aside) and byte-identical
#    checkpoints; also with routing replay R3 and R2, GSPO, a KL penalty (beta > 0)
#    and mu = minibatches = 2;
#  - on-policy sanity: with mu = minibatches = 1 every ratio is exactly 1 and nothing
#    is clipped;
#  - greedy `generate` output is identical at every layout;
#  - exact resume: a run stopped after step 2 and resumed (at another layout) ends with
#    the bytes of one that never stopped;
#  - bad input (no answers, empty prompt file, prompts longer than the context, G < 2
#    with group scaling, a crashing or garbled reward program) fails on every rank with
#    one message naming the file/line/key/command, exit 1, no hang.
# usage: rl_layouts.sh <moetune binary> <scratch dir>
set -euo pipefail
moetune=$1
dir=$2
rm -rf "$dir" && mkdir -p "$dir"
trap 'rm -rf "$dir"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
run() { timeout 120 mpirun -np "$1" --oversubscribe "$moetune" "${@:2}"; }

# A small model on the byte tokenizer, a few steps of SFT so that completions end.
"$moetune" gen-data --task arith --digits 1 --ops + --sft 400 --train-prompts 40 --test-prompts 8 \
    --out "$dir/data" > /dev/null
cat > "$dir/run.json" <<JSON
{"model": {"vocab_size": 263, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "n_routed_experts": 4, "num_experts_per_tok": 2,
           "moe_intermediate_size": 16, "intermediate_size": 64, "max_position_embeddings": 64,
           "initializer_range": 0.1},
 "data": {"seq_len": 64},
 "train": {"steps": 3, "micro_batch_size": 2, "seed": 7, "save_every": 1},
 "optim": {"lr": 1e-3, "warmup_steps": 0, "weight_decay": 0.01},
 "rl": {"prompts_per_step": 4, "num_generations": 4, "max_new_tokens": 6, "generation_batch_size": 4,
        "reward": "math,command", "reward_weights": "1,0.5",
        "reward_command": "while read -r l; do echo \$(( \${#l} % 3 )); done"}}
JSON
"$moetune" init --config "$dir/run.json" --out "$dir/base" --tokenizer byte > /dev/null
"$moetune" sft --init-from "$dir/base" --data "$dir/data/sft.jsonl" --out "$dir/sft" --config "$dir/run.json" \
    --set train.steps=10 --set train.save_every=0 --peak-gflops 10 --quiet
sft=$dir/sft/step-00000010

strip() { sed -E 's/"(time\/[a-z_]+|gen_tokens_per_s|train_tokens_per_s|mfu_update)":[^,}]*,?//g' "$1"; }
hash_ckpt() { cat "$1"/model*.safetensors "$1"/optimizer*.safetensors | sha256sum | cut -d' ' -f1; }

check_layouts() {  # name, then extra --set arguments
  local name=$1
  shift
  local ref_m="" ref_h=""
  for layout in "1 1 0" "2 1 0" "2 2 0" "4 2 0" "4 4 0" "4 2 1"; do
    set -- $layout "${@}"
    local W=$1 ep=$2 z=$3
    shift 3
    local out="$dir/rl_${name}_${W}_${ep}_${z}"
    run "$W" rl --init-from "$sft" --prompts "$dir/data/train_prompts.jsonl" --out "$out" --config "$dir/run.json" \
        --set parallel.ep="$ep" --set parallel.zero_stage="$z" "$@" --peak-gflops 10 --quiet
    local m h
    m=$(strip "$out/metrics.jsonl")
    h=$(hash_ckpt "$out/step-00000003")
    echo "rl $name W=$W ep=$ep zero=$z: $(grep -o '"reward":[^,]*' "$out/metrics.jsonl" | tr '\n' ' ')sha256 ${h:0:16}"
    if [[ -z $ref_h ]]; then
      ref_m=$m ref_h=$h
    else
      [[ $m == "$ref_m" ]] || { echo "FAIL: $name: metrics differ at W=$W ep=$ep zero=$z"; diff <(echo "$ref_m") <(echo "$m") | head; exit 1; }
      [[ $h == "$ref_h" ]] || { echo "FAIL: $name: checkpoint differs at W=$W ep=$ep zero=$z"; exit 1; }
    fi
  done
}

check_layouts live
check_layouts r3 --set rl.router_replay=rollout --set rl.importance_sampling_level=sequence --set rl.mu=2
check_layouts r2kl --set rl.router_replay=old --set rl.beta=0.05 --set rl.mu=2 --set rl.minibatches=2 \
    --set rl.loss_type=seq_mean_token_mean

# On-policy: the first (and only) update of each step sees ratio 1 exactly.
for f in "$dir"/rl_live_1_1_0/metrics.jsonl "$dir"/rl_live_4_4_0/metrics.jsonl; do
  n=$(grep -c "\"ratio_max\":1.0," "$f" || true); m=$(grep -c "\"ratio_min\":1.0," "$f" || true); c=$(grep -c "\"clip_ratio/region_mean\":0.0," "$f" || true)
  [[ $n == 3 && $m == 3 && $c == 3 ]] || { echo "FAIL: on-policy ratios not exactly 1 in $f"; cat "$f"; exit 1; }
done
# Something was learned from: gradients were not all zero.
grep -q '"grad_norm":0.0,' "$dir/rl_live_1_1_0/metrics.jsonl" && { echo "FAIL: zero gradient"; exit 1; }
echo "on-policy: ratio exactly 1, no clipping, at (1,1) and (4,4)"

# DeepSeek-V4 attention (MODEL.md section 12: shared kv head, sinks, sliding window 8 <
# seq_len): the same model otherwise; RL at (1,1) and (2,2) gives the same bytes, and
# on-policy ratios are exactly 1 (the KV-cache decode equals the forward).
sed -e 's/"initializer_range": 0.1}/"initializer_range": 0.1, "attention_type": "v4", "q_lora_rank": 16,\
           "qk_rope_head_dim": 4, "sliding_window": 8, "o_groups": 2, "o_lora_rank": 8}/' \
    "$dir/run.json" > "$dir/run_v4.json"
grep -q '"attention_type": "v4"' "$dir/run_v4.json" || { echo "FAIL: run_v4.json"; exit 1; }
"$moetune" init --config "$dir/run_v4.json" --out "$dir/base_v4" --tokenizer byte > /dev/null
"$moetune" sft --init-from "$dir/base_v4" --data "$dir/data/sft.jsonl" --out "$dir/sft_v4" \
    --config "$dir/run_v4.json" --set train.steps=10 --set train.save_every=0 --peak-gflops 10 --quiet
ref_h=""
for layout in "1 1" "2 2"; do
  set -- $layout
  out="$dir/rl_v4attn_$1_$2"
  run "$1" rl --init-from "$dir/sft_v4/step-00000010" --prompts "$dir/data/train_prompts.jsonl" --out "$out" \
      --config "$dir/run_v4.json" --set parallel.ep="$2" --peak-gflops 10 --quiet
  h=$(hash_ckpt "$out/step-00000003")
  if [[ -z $ref_h ]]; then ref_h=$h; else [[ $h == "$ref_h" ]] || { echo "FAIL: v4 attention: checkpoint differs at W=$1 ep=$2"; exit 1; }; fi
  n=$(grep -c "\"ratio_max\":1.0," "$out/metrics.jsonl" || true); m=$(grep -c "\"ratio_min\":1.0," "$out/metrics.jsonl" || true)
  [[ $n == 3 && $m == 3 ]] || { echo "FAIL: v4 attention: on-policy ratios not exactly 1"; cat "$out/metrics.jsonl"; exit 1; }
done
echo "v4 attention: RL identical at (1,1) and (2,2), on-policy ratios exactly 1"

# Batch invariance (MODEL.md section 13): the rollout's decode steps computed pi_old's
# logits bit for bit, so its routing and log-probabilities match the update's forward
# exactly, at every layout and in every mode.
for f in "$dir"/rl_*/metrics.jsonl; do
  for key in routing_mismatch logprob_mismatch_mean logprob_mismatch_max; do
    n=$(grep -c "\"$key\":0.0," "$f" || true); t=$(grep -c . "$f")
    [[ $n == "$t" ]] || { echo "FAIL: $key not exactly 0 in $f"; grep -o "\"$key\":[^,]*" "$f"; exit 1; }
  done
done
echo "rollout = pi_old: routing and log-probabilities identical in every run"

# Greedy generation: identical completions at every layout.
ref=""
for layout in "1 1" "2 1" "2 2" "4 4"; do
  set -- $layout
  run "$1" generate --ckpt "$sft" --prompts "$dir/data/test_prompts.jsonl" --temperature 0 --max-new-tokens 6 \
      --batch-size 3 --ep "$2" --out "$dir/gen_$1_$2.jsonl" --quiet
  h=$(sha256sum < "$dir/gen_$1_$2.jsonl")
  if [[ -z $ref ]]; then ref=$h; else [[ $h == "$ref" ]] || { echo "FAIL: generate differs at W=$1 ep=$2"; exit 1; }; fi
done
[[ $(wc -l < "$dir/gen_1_1.jsonl") == 8 ]] || { echo "FAIL: generate wrote $(wc -l < "$dir/gen_1_1.jsonl") lines"; exit 1; }
run 2 eval --ckpt "$sft" --prompts "$dir/data/test_prompts.jsonl" --samples 4 --max-new-tokens 6 --ep 2 \
    --json "$dir/eval.json" > "$dir/eval.out"
grep -q '"pass@4"' "$dir/eval.json" || { echo "FAIL: eval json"; cat "$dir/eval.out"; exit 1; }
echo "generate: greedy completions identical at 4 layouts; eval: $(tail -1 "$dir/eval.out")"

# Exact resume: a run whose step 3 was lost resumes from its step-2 checkpoint, at
# another layout, and ends with the same bytes and metrics.
cp -r "$dir/rl_live_2_2_0" "$dir/res"
rm -rf "$dir/res/step-00000003"
run 4 rl --auto-resume --prompts "$dir/data/train_prompts.jsonl" --out "$dir/res" --config "$dir/run.json" \
    --set parallel.ep=4 --peak-gflops 10 --quiet
[[ $(hash_ckpt "$dir/res/step-00000003") == $(hash_ckpt "$dir/rl_live_1_1_0/step-00000003") ]] ||
  { echo "FAIL: resumed run differs"; exit 1; }
[[ $(strip "$dir/res/metrics.jsonl") == $(strip "$dir/rl_live_1_1_0/metrics.jsonl") ]] ||
  { echo "FAIL: resumed metrics differ"; exit 1; }
echo "resume: step 3 lost at W=2 ep=2, resumed from step 2 at W=4 ep=4: identical bytes and metrics"

# Bad input: one message on stderr naming what is wrong, exit 1, no hang.
check_bad() {
  local what=$1
  shift
  local start=$SECONDS out
  if out=$(run 2 rl --init-from "$sft" --out "$dir/bad" --config "$dir/run.json" --set parallel.ep=2 "$@" 2>&1); then
    echo "FAIL: accepted: $*"; exit 1
  fi
  grep -q "error: .*$what" <<<"$out" || { echo "FAIL: no 'error: ... $what' for $*:"; echo "$out"; exit 1; }
  (( SECONDS - start < 60 )) || { echo "FAIL: took $((SECONDS - start)) s"; exit 1; }
  echo "rejected ($*): $(grep -m1 '^error' <<<"$out" | cut -c1-160)"
}
printf '{"prompt": "1+1="}\n' > "$dir/noanswer.jsonl"
: > "$dir/empty.jsonl"
python_free_long=$(printf 'x%.0s' $(seq 1 80))
printf '{"prompt": "%s", "answer": "1"}\n' "$python_free_long" > "$dir/long.jsonl"
P=$dir/data/train_prompts.jsonl
check_bad "noanswer.jsonl:1" --prompts "$dir/noanswer.jsonl"
check_bad "empty.jsonl: no prompts" --prompts "$dir/empty.jsonl"
check_bad "long.jsonl:1" --prompts "$dir/long.jsonl"
check_bad "rl.num_generations" --prompts "$P" --set rl.num_generations=1
check_bad "exit_7" --prompts "$P" --set "rl.reward_command=sh -c 'read x; exit 7' exit_7"
check_bad "not_a_number" --prompts "$P" --set "rl.reward_command=sh -c 'while read x; do echo oops; done' not_a_number"
check_bad "rl.reward" --prompts "$P" --set rl.reward=bogus
check_bad "rl.router_replay" --prompts "$P" --set rl.router_replay=sometimes
[[ -d $dir/bad/step-00000001 ]] && { echo "FAIL: a failed run wrote a checkpoint"; exit 1; }
echo "rl_layouts: all checks passed"
