// The run configuration of `moetune train --config run.json`: four optional sections
// "model" (ModelConfig, MODEL.md section 1), "data", "train" and "optim", parsed
// strictly (unknown sections/keys, wrong types and invalid values throw
// moetune::Error naming the file and the dotted key), overridable with
// `--set section.key=value`. Every key is listed in docs/config.md and by
// describe_config_keys().
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "moe/config.hpp"
#include "optim/adamw.hpp"
#include "optim/optimizer.hpp"
#include "optim/schedule.hpp"
#include "train/data.hpp"

namespace moetune {

struct TrainConfig {
  int64_t steps = 100;              // optimizer steps
  int micro_batch_size = 8;         // rows per micro-batch (on each rank)
  int grad_accum_steps = 1;         // micro-batches per optimizer step (on each rank)
  uint64_t seed = 1234;             // initialisation and data shuffling
  int log_every = 1;                // log every N steps
  int64_t save_every = 0;           // checkpoint every N steps; 0 = no periodic checkpoints
  int keep_checkpoints = 0;         // keep only the newest N step checkpoints; 0 = keep all
  int64_t eval_every = 0;           // validation loss every N steps (and after the last); 0 = after the last
  int max_consecutive_skips = 10;   // stop after this many non-finite steps in a row
  std::string precision = "float";  // "float" | "double"
  int threads = 0;                  // OpenMP threads; 0 = OpenMP's default
  int64_t global_batch_size = 0;    // rows per optimizer step over all ranks; 0 = micro * accum * ranks

  // Micro-batches in the global batch for `ranks` ranks (global_batch_size / micro_batch_size, or
  // grad_accum_steps * ranks). Throws moetune::Error naming the key if it does not divide.
  int micro_batches(int ranks) const;
};

struct ParallelConfig {
  int ep = 1;          // expert-parallel group size (divides the number of ranks and n_routed_experts)
  int zero_stage = 0;  // 1: shard AdamW moments of replicated tensors over their data-parallel group
  std::string reduction = "exact";  // "exact" (int128, layout-invariant) | "fp32" (docs/parallel.md)
  bool overlap_a2a = true;          // shared expert / router backward while tokens are in flight (ep > 1)
};

struct OptimConfig {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1, max_grad_norm = 1.0;
  std::string schedule = "cosine";  // "constant" | "linear" | "cosine"
  int64_t warmup_steps = 0;
  double min_lr_ratio = 0.1;
  std::string name = "adamw";      // "adamw" | "muon" (MODEL.md section 12; docs/config.md)
  double muon_lr = 0;              // peak learning rate of the Muon matrices; 0 = lr
  double muon_momentum = 0.95;     // Muon's mu, in [0, 1)
  double muon_weight_decay = 0.1;  // decoupled weight decay of the Muon matrices
};

// `moetune rl` (docs/rl.md; MODEL.md sections 10-11). Names follow TRL's GRPOConfig
// where TRL has the key.
struct RlConfig {
  int prompts_per_step = 8;            // B: prompts per RL step
  int num_generations = 8;             // G: completions per prompt (the group)
  int max_new_tokens = 32;             // completion length limit (truncated beyond)
  double temperature = 1.0;            // sampling temperature (0 = greedy)
  int top_k = 0;                       // 0 = off
  double top_p = 1.0;                  // 1 = off
  int generation_batch_size = 32;      // completions decoded together
  std::string scale_rewards = "group"; // "group" | "batch" | "none"
  std::string loss_type = "token_mean";  // "token_mean" | "seq_mean_token_mean" | "seq_mean_token_sum_norm"
  std::string importance_sampling_level = "token";  // "token" | "sequence" (GSPO)
  double epsilon = 0.2;                // clip low
  double epsilon_high = 0.0;           // clip high; 0 = epsilon
  double beta = 0.0;                   // k3 KL to the frozen reference; 0 = no reference held
  int mu = 1;                          // passes over each batch of completions (TRL num_iterations)
  int minibatches = 1;                 // optimizer steps per pass
  bool dynamic_sampling = false;       // drop groups whose rewards are all equal
  bool mask_truncated = false;         // truncated completions get no loss tokens
  std::string router_replay = "none";  // "none" | "rollout" (R3) | "old" (R2)
  std::string reward = "math";         // comma-separated reward functions: math, exact, format, command
  std::string reward_weights;          // comma-separated weights, one per reward; "" = all 1
  std::string reward_command;          // the program of the "command" reward (sh -c)
  double reward_timeout = 60;          // seconds a reward program may take per batch
  int64_t eval_every = 0;              // pass@1 on --valid-prompts every N steps (and after the last); 0 = last only
  int eval_samples = 0;                // also pass@k with this many samples per valid prompt; 0 = greedy only
  double epsilon_hi() const { return epsilon_high > 0 ? epsilon_high : epsilon; }
};

struct RunConfig {
  ModelConfig model = ModelConfig::from_json(nlohmann::json::object());  // defaults, derived values resolved
  DataConfig data;
  TrainConfig train;
  OptimConfig optim;
  ParallelConfig parallel;
  RlConfig rl;

  // Reads a JSON file; `data.train` is resolved relative to the file's directory.
  static RunConfig from_file(const std::string& path);
  // Parses a JSON object; errors name `where` and the dotted key ("run.json: key
  // 'train.steps': must be positive, got 0"). A relative data.train is joined to
  // base_dir when base_dir is non-empty. Validates the result.
  static RunConfig from_json(const nlohmann::json& j, const std::string& where, const std::string& base_dir = "");
  // Applies one "section.key=value" override, e.g. "train.steps=10", "optim.lr=3e-4",
  // "data.packing=false", "model.hidden_size=64". The value is read as JSON, or as a
  // plain string when it is not JSON (or the key is a string key). Checks the value on
  // its own (type, range); constraints between keys are left to validate(), which the
  // caller runs after the last override. Errors name "--set <assignment>" and the key.
  // model.* keys go through ModelConfig::set: derived model keys (head_dim,
  // intermediate_size, ...) keep the values they were resolved to.
  void set(const std::string& assignment);
  nlohmann::json to_json() const;
  // Every check, including those between keys (warmup_steps <= steps, seq_len <=
  // model.max_position_embeddings, pad_id < model.vocab_size).
  void validate(const std::string& where) const;

  ScheduleConfig schedule_config() const {
    ScheduleConfig s;
    s.kind = optim.schedule;
    s.lr = optim.lr;
    s.warmup_steps = optim.warmup_steps;
    s.total_steps = train.steps;
    s.min_lr_ratio = optim.min_lr_ratio;
    return s;
  }
  AdamWConfig adamw_config() const {
    AdamWConfig a;
    a.beta1 = optim.beta1;
    a.beta2 = optim.beta2;
    a.eps = optim.eps;
    a.weight_decay = optim.weight_decay;
    return a;
  }
  OptimizerConfig optimizer_config() const {
    OptimizerConfig o;
    o.name = optim.name;
    o.adamw = adamw_config();
    o.muon.momentum = optim.muon_momentum;
    o.muon.weight_decay = optim.muon_weight_decay;
    o.muon.lr_ratio = optim.muon_lr > 0 ? optim.muon_lr / optim.lr : 1.0;
    return o;
  }
};

// Help text for `moetune train --help-config`: every key of every section with its
// default and meaning.
std::string describe_config_keys();

}  // namespace moetune
