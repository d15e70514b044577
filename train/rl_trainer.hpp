// `moetune rl`: RL post-training with verifiable rewards (MODEL.md sections 10-11).
// One RL step: B prompts -> G completions each (KV-cache decoding, experts through the
// all-to-all stage) -> rewards (rank 0) -> advantages -> pi_old (and reference)
// log-probabilities by a full forward -> mu * minibatches optimizer steps of the
// GRPO-family loss through the same exact-reduction training step as `train`/`sft`.
#pragma once
#include <string>

#include "train/reward.hpp"
#include "train/run_config.hpp"

namespace moetune {

struct RlOptions {
  std::string out_dir;
  std::string init_from;      // the SFT checkpoint: the policy's start and the frozen reference
  std::string prompts;        // training prompt file (JSONL)
  std::string valid_prompts;  // optional held-out prompt file for pass@1 every rl.eval_every steps
  std::string resume_from;
  bool auto_resume = false;
  bool progress = true;
  double peak_gflops = 0;
};

struct RlSummary {
  int64_t steps = 0;
  double first_reward = 0, last_reward = 0;
  double final_valid_pass1 = -1;  // -1: no valid prompts
  std::string final_checkpoint;
};

RlSummary run_rl(const RunConfig& rc, const RlOptions& opt);

// The reward functions of rl.reward / rl.reward_weights / rl.reward_command /
// rl.reward_timeout_s (comma-separated lists). Throws moetune::Error naming the key.
RewardSpec reward_spec_of(const RlConfig& rl);

}  // namespace moetune
