// Parsing, overriding, validation and help text of the run configuration (run_config.hpp).
// The data, train and optim sections are driven by one table of keys; the model
// section is delegated to ModelConfig, with its messages re-keyed as "model.<key>".
#include "train/run_config.hpp"

#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <sstream>
#include <type_traits>
#include <vector>

#include "io/json_parse.hpp"
#include "moe/error.hpp"
#include "tokenizer/byte_level.hpp"

namespace moetune {
namespace {

using json = nlohmann::json;

[[noreturn]] void fail(const std::string& where, const std::string& key, const std::string& msg) {
  throw Error(where + ": key '" + key + "': " + msg);
}

// A value for a message. A --set value that is not JSON becomes a string as given,
// possibly not UTF-8, which plain dump() refuses (it throws): show U+FFFD instead.
std::string shown(const json& v) { return v.dump(-1, ' ', false, json::error_handler_t::replace); }

std::string num(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

// One key of the data/train/optim sections.
struct KeyDef {
  std::string section, name;
  bool is_string;
  std::string help;
  std::function<void(RunConfig&, const json&, const std::string& where)> read;
  std::function<json(const RunConfig&)> write;
  // Checks of this key alone (range, allowed values); may be empty.
  std::function<void(const RunConfig&, const std::string& where)> check;
  std::string dotted() const { return section + "." + name; }
};

// Reads v into a member of type M, with type checks naming the dotted key.
template <class M>
void read_value(M& out, const json& v, const std::string& where, const std::string& key) {
  if constexpr (std::is_same_v<M, bool>) {
    if (!v.is_boolean()) fail(where, key, "expected true or false, got " + shown(v));
    out = v.get<bool>();
  } else if constexpr (std::is_same_v<M, std::string>) {
    if (!v.is_string()) fail(where, key, "expected a string, got " + shown(v));
    out = v.get<std::string>();
  } else if constexpr (std::is_floating_point_v<M>) {
    if (!v.is_number()) fail(where, key, "expected a number, got " + shown(v));
    out = v.get<M>();
  } else if constexpr (std::is_unsigned_v<M>) {
    if (!v.is_number_unsigned() && !(v.is_number_integer() && v.get<int64_t>() >= 0))
      fail(where, key, "expected a non-negative integer, got " + shown(v));
    out = v.get<M>();
  } else {
    static_assert(std::is_integral_v<M> && std::is_signed_v<M>);
    if (!v.is_number_integer()) fail(where, key, "expected an integer, got " + shown(v));
    if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(std::numeric_limits<M>::max()))
      fail(where, key, "integer " + shown(v) + " is too large");
    const int64_t x = v.get<int64_t>();
    if (x < int64_t(std::numeric_limits<M>::min()) || x > int64_t(std::numeric_limits<M>::max()))
      fail(where, key, "integer " + shown(v) + " is out of range");
    out = M(x);
  }
}

template <class S, class M>
KeyDef key(
    const char* section, S RunConfig::*sec, const char* name, M S::*mem, std::string help,
    std::type_identity_t<std::function<void(const M&, const std::string& where, const std::string& key)>> check = {}) {
  KeyDef k;
  k.section = section;
  k.name = name;
  k.is_string = std::is_same_v<M, std::string>;
  k.help = std::move(help);
  const std::string dotted = std::string(section) + "." + name;
  k.read = [=](RunConfig& c, const json& v, const std::string& where) { read_value(c.*sec.*mem, v, where, dotted); };
  k.write = [=](const RunConfig& c) { return json(c.*sec.*mem); };
  if (check) k.check = [=](const RunConfig& c, const std::string& where) { check(c.*sec.*mem, where, dotted); };
  return k;
}

// Reusable single-key checks.
template <class M>
auto positive() {
  return [](const M& v, const std::string& w, const std::string& k) {
    if (!(v > 0)) fail(w, k, "must be positive, got " + num(double(v)));
  };
}
template <class M>
auto non_negative() {
  return [](const M& v, const std::string& w, const std::string& k) {
    if (!(v >= 0)) fail(w, k, "must be >= 0, got " + num(double(v)));
  };
}
auto one_of(std::vector<std::string> allowed) {
  return [=](const std::string& v, const std::string& w, const std::string& k) {
    std::string list;
    for (const auto& a : allowed) {
      if (v == a) return;
      list += (list.empty() ? "\"" : ", \"") + a + "\"";
    }
    fail(w, k, "must be one of " + list + ", got \"" + v + "\"");
  };
}
auto half_open_unit(const double& v, const std::string& w, const std::string& k) {
  if (!(v >= 0 && v < 1)) fail(w, k, "must be in [0, 1), got " + num(v));
}

const std::vector<KeyDef>& keys() {
  using D = DataConfig;
  using T = TrainConfig;
  using O = OptimConfig;
  using P = ParallelConfig;
  using R = RlConfig;
  static const std::vector<KeyDef> k = {
      key("data", &RunConfig::data, "train", &D::train_path,
          "training data: JSONL, or a token file of moetune data prepare (data.format); a relative path in a "
          "config file is relative to that file's directory, one given with --set is relative to the working "
          "directory"),
      key("data", &RunConfig::data, "valid", &D::valid_path,
          "optional held-out data in the same data.format (JSONL, or a token file for \"bin\"); its loss is reported every train.eval_every steps and at the "
          "end as valid_loss in metrics.jsonl; \"\" = none. Relative paths resolve like data.train"),
      key("data", &RunConfig::data, "seq_len", &D::seq_len,
          "tokens per batch row; at most model.max_position_embeddings", positive<int>()),
      key("data", &RunConfig::data, "packing", &D::packing,
          "true: pack whole documents into rows (attention and targets never cross documents); false: one "
          "document per row, padded"),
      key("data", &RunConfig::data, "shuffle", &D::shuffle,
          "permute the documents each epoch (deterministic in train.seed and the epoch)"),
      key("data", &RunConfig::data, "format", &D::format,
          "\"tokens\": JSONL of token ids (docs/data.md); \"sft\": JSONL of chats {\"messages\": [...]}, "
          "{\"prompt\", \"completion\"} or token ids, rendered with the chat template and the run's tokenizer, "
          "loss only on assistant/completion tokens (docs/sft.md); \"bin\": a token file written by moetune "
          "data prepare, read by memory map, loss on every token (continued pre-training)",
          one_of({"tokens", "sft", "bin"})),
      key("data", &RunConfig::data, "tokenizer", &D::tokenizer,
          "the run's tokenizer, saved as tokenizer.json in every checkpoint (docs/tokenizer.md): \"byte\", a "
          "tokenizer.json, or a checkpoint directory; \"\" = the tokenizer of the checkpoint the run starts "
          "from, else the byte tokenizer for data.format sft/bin, else none. Relative paths resolve like "
          "data.train"),
      key("data", &RunConfig::data, "overlong", &D::overlong,
          "documents longer than seq_len: \"truncate\" (keep the first seq_len tokens; counted), \"error\", "
          "\"split\" (cut into seq_len-token pieces overlapping by one token, so every target is trained "
          "once; counted; for data.format tokens/bin) or \"skip\" (drop the sample; counted; data.format sft)",
          one_of({"truncate", "error", "split", "skip"})),
      key("data", &RunConfig::data, "pad_id", &D::pad_id,
          "input token id of padding, in [0, model.vocab_size); padding labels are always -100",
          non_negative<int32_t>()),

      key("train", &RunConfig::train, "steps", &T::steps, "optimizer steps", positive<int64_t>()),
      key("train", &RunConfig::train, "micro_batch_size", &T::micro_batch_size, "rows per micro-batch on each rank",
          positive<int>()),
      key("train", &RunConfig::train, "grad_accum_steps", &T::grad_accum_steps,
          "micro-batches per optimizer step on each rank; global batch = micro_batch_size * grad_accum_steps * "
          "ranks rows",
          positive<int>()),
      key("train", &RunConfig::train, "seed", &T::seed,
          "seed of the initialisation and of the data shuffle (a non-negative integer)"),
      key("train", &RunConfig::train, "log_every", &T::log_every, "log every N steps", positive<int>()),
      key("train", &RunConfig::train, "save_every", &T::save_every,
          "write a checkpoint every N steps; 0 = no periodic checkpoints", non_negative<int64_t>()),
      key("train", &RunConfig::train, "eval_every", &T::eval_every,
          "compute the validation loss (data.valid) every N steps and after the last; 0 = only after the last",
          non_negative<int64_t>()),
      key("train", &RunConfig::train, "keep_checkpoints", &T::keep_checkpoints,
          "keep only the newest N step checkpoints in the output directory (older ones are removed after a new "
          "one is complete); 0 = keep all",
          non_negative<int>()),
      key("train", &RunConfig::train, "max_consecutive_skips", &T::max_consecutive_skips,
          "a step whose loss or gradient is not finite is skipped (weights, AdamW state and routing bias "
          "untouched) and counted; this many in a row stop the run with an error, keeping the last good "
          "checkpoint",
          positive<int>()),
      key("train", &RunConfig::train, "precision", &T::precision,
          "arithmetic of parameters, activations and optimizer state: \"float\" or \"double\"",
          one_of({"float", "double"})),
      key("train", &RunConfig::train, "threads", &T::threads, "OpenMP threads per rank; 0 = OpenMP's default",
          non_negative<int>()),
      key("train", &RunConfig::train, "global_batch_size", &T::global_batch_size,
          "rows per optimizer step over all ranks (a multiple of micro_batch_size * ranks); 0 = "
          "micro_batch_size * grad_accum_steps * ranks. Set it to keep the same global batch at every layout",
          non_negative<int64_t>()),
      key("parallel", &RunConfig::parallel, "ep", &P::ep,
          "expert-parallel group size: divides the number of ranks and model.n_routed_experts; 1 = pure data "
          "parallelism",
          positive<int>()),
      key("parallel", &RunConfig::parallel, "zero_stage", &P::zero_stage,
          "1 = shard the optimizer state (AdamW moments, Muon momentum: whole matrices per rank) of replicated "
          "tensors over the ranks that replicate them (ZeRO-1); 0 = off",
          [](const int& v, const std::string& w, const std::string& k) {
            if (v != 0 && v != 1) fail(w, k, "must be 0 or 1, got " + std::to_string(v));
          }),
      key("parallel", &RunConfig::parallel, "reduction", &P::reduction,
          "how gradients are summed over micro-batches and ranks: \"exact\" = int128 fixed point, the same bits "
          "at every layout and thread count; \"fp32\" = in the parameters' precision, all-reduced in rank order: "
          "faster and deterministic for a given layout, but the bits depend on the layout (docs/parallel.md)",
          one_of({"exact", "fp32"})),
      key("parallel", &RunConfig::parallel, "overlap_a2a", &P::overlap_a2a,
          "at ep > 1, compute what does not need the experts (the shared expert, the router backward) while the "
          "all-to-all exchanges are in flight (MPI_Ialltoallv); false = blocking exchanges. The same bits either "
          "way (docs/parallel.md)"),

      key("rl", &RunConfig::rl, "prompts_per_step", &R::prompts_per_step, "B: prompts per RL step",
          positive<int>()),
      key("rl", &RunConfig::rl, "num_generations", &R::num_generations,
          "G: completions sampled per prompt (the group of the advantage)", positive<int>()),
      key("rl", &RunConfig::rl, "max_new_tokens", &R::max_new_tokens,
          "longest completion; one that reaches it without <|end|>/<|eos|> is truncated", positive<int>()),
      key("rl", &RunConfig::rl, "temperature", &R::temperature,
          "sampling temperature of the rollouts; 0 = greedy. Log-probabilities are of log_softmax(z / "
          "temperature) (1 when 0)",
          non_negative<double>()),
      key("rl", &RunConfig::rl, "top_k", &R::top_k, "keep the k most likely tokens when sampling; 0 = off",
          non_negative<int>()),
      key("rl", &RunConfig::rl, "top_p", &R::top_p, "nucleus sampling: keep the smallest set with probability >= p; 1 = off",
          [](const double& v, const std::string& w, const std::string& k) {
            if (!(v > 0 && v <= 1)) fail(w, k, "must be in (0, 1], got " + num(v));
          }),
      key("rl", &RunConfig::rl, "generation_batch_size", &R::generation_batch_size,
          "completions decoded together (one KV cache); the chunks are shared out over the ranks",
          positive<int>()),
      key("rl", &RunConfig::rl, "scale_rewards", &R::scale_rewards,
          "advantage: (r - group mean) / (std + 1e-4) with the std of the \"group\" or of the whole \"batch\", "
          "or \"none\" (r - group mean, Dr. GRPO)",
          one_of({"group", "batch", "none"})),
      key("rl", &RunConfig::rl, "loss_type", &R::loss_type,
          "aggregation of the per-token loss: \"token_mean\" (DAPO), \"seq_mean_token_mean\" (GRPO), "
          "\"seq_mean_token_sum_norm\" (Dr. GRPO: sum / (completions * max_new_tokens))",
          one_of({"token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"})),
      key("rl", &RunConfig::rl, "importance_sampling_level", &R::importance_sampling_level,
          "\"token\": ratio per token; \"sequence\": one ratio per completion, exp(mean log-ratio) (GSPO)",
          one_of({"token", "sequence"})),
      key("rl", &RunConfig::rl, "epsilon", &R::epsilon, "clip range below: ratio >= 1 - epsilon", positive<double>()),
      key("rl", &RunConfig::rl, "epsilon_high", &R::epsilon_high,
          "clip range above: ratio <= 1 + epsilon_high (clip-higher, DAPO); 0 = rl.epsilon", non_negative<double>()),
      key("rl", &RunConfig::rl, "beta", &R::beta,
          "weight of the k3 KL penalty to the frozen reference model (the --init-from checkpoint); 0 = no "
          "reference is held",
          non_negative<double>()),
      key("rl", &RunConfig::rl, "mu", &R::mu,
          "passes over each step's completions (TRL num_iterations); 1 with rl.minibatches 1 = on-policy",
          positive<int>()),
      key("rl", &RunConfig::rl, "minibatches", &R::minibatches,
          "optimizer steps per pass: the completions cut into this many equal slices", positive<int>()),
      key("rl", &RunConfig::rl, "dynamic_sampling", &R::dynamic_sampling,
          "drop the groups whose rewards are all equal before the update (DAPO); counted in the metrics"),
      key("rl", &RunConfig::rl, "mask_truncated", &R::mask_truncated,
          "truncated completions get no loss tokens (TRL mask_truncated_completions)"),
      key("rl", &RunConfig::rl, "router_replay", &R::router_replay,
          "expert selection in the update: \"none\" (live), \"rollout\" (R3: the rollout's decode steps), "
          "\"old\" (R2: the pi_old forward); the weights are always recomputed from the live scores",
          one_of({"none", "rollout", "old"})),
      key("rl", &RunConfig::rl, "reward", &R::reward,
          "reward functions, comma-separated: math (final number equals the answer), exact (trimmed text equals "
          "the answer), format (stopped and has an answer), command (rl.reward_command) (docs/rewards.md)"),
      key("rl", &RunConfig::rl, "reward_weights", &R::reward_weights,
          "comma-separated weights of rl.reward, in order (TRL reward_weights); \"\" = 1 each"),
      key("rl", &RunConfig::rl, "reward_command", &R::reward_command,
          "a program scoring completions: one JSON object per line on its stdin, one number per line on its "
          "stdout (docs/rewards.md)"),
      key("rl", &RunConfig::rl, "reward_timeout_s", &R::reward_timeout,
          "seconds the reward program may take to answer one completion (per line)", positive<double>()),
      key("rl", &RunConfig::rl, "eval_every", &R::eval_every,
          "evaluate on --valid-prompts every N steps and after the last; 0 = after the last only",
          non_negative<int64_t>()),
      key("rl", &RunConfig::rl, "eval_samples", &R::eval_samples,
          "samples per valid prompt for pass@k (at rl.temperature); 0 = greedy pass@1 only", non_negative<int>()),

      key("optim", &RunConfig::optim, "lr", &O::lr, "peak learning rate (after warmup)", positive<double>()),
      key("optim", &RunConfig::optim, "beta1", &O::beta1, "AdamW beta1, in [0, 1)", half_open_unit),
      key("optim", &RunConfig::optim, "beta2", &O::beta2, "AdamW beta2, in [0, 1)", half_open_unit),
      key("optim", &RunConfig::optim, "eps", &O::eps, "AdamW epsilon", positive<double>()),
      key("optim", &RunConfig::optim, "weight_decay", &O::weight_decay,
          "decoupled weight decay of rank-2 tensors (not RMSNorm weights)", non_negative<double>()),
      key("optim", &RunConfig::optim, "max_grad_norm", &O::max_grad_norm,
          "clip gradients to this global L2 norm; <= 0 turns clipping off",
          [](const double& v, const std::string& w, const std::string& k) {
            if (v != v) fail(w, k, "must be a number, got NaN");
          }),
      key("optim", &RunConfig::optim, "schedule", &O::schedule,
          "learning-rate schedule after warmup: \"constant\", \"linear\" or \"cosine\"",
          one_of({"constant", "linear", "cosine"})),
      key("optim", &RunConfig::optim, "warmup_steps", &O::warmup_steps,
          "linear warmup from 0 over this many steps; at most train.steps", non_negative<int64_t>()),
      key("optim", &RunConfig::optim, "min_lr_ratio", &O::min_lr_ratio,
          "linear and cosine decay end at min_lr_ratio * lr, in [0, 1]",
          [](const double& v, const std::string& w, const std::string& k) {
            if (!(v >= 0 && v <= 1)) fail(w, k, "must be in [0, 1], got " + num(v));
          }),
      key("optim", &RunConfig::optim, "name", &O::name,
          "the optimizer: \"adamw\" (every tensor) or \"muon\" (Muon for every rank-2 matrix except the "
          "embedding and the LM head, router and experts included; AdamW with the keys above for the rest; "
          "MODEL.md section 12). A run resumes only with the optimizer its checkpoint was written with",
          one_of({"adamw", "muon"})),
      key("optim", &RunConfig::optim, "muon_lr", &O::muon_lr,
          "peak learning rate of the Muon matrices, on the same schedule as optim.lr (scaled by muon_lr / lr); "
          "0 = optim.lr. The update is scaled by 0.18 * sqrt(max(rows, cols)), so AdamW's learning rate is "
          "the natural one",
          [](const double& v, const std::string& w, const std::string& k) {
            if (!(v >= 0 && v < std::numeric_limits<double>::infinity()))
              fail(w, k, "must be a finite number >= 0, got " + num(v));
          }),
      key("optim", &RunConfig::optim, "muon_momentum", &O::muon_momentum,
          "Muon momentum mu, in [0, 1): M = mu M + G, Nesterov update mu M + G", half_open_unit),
      key("optim", &RunConfig::optim, "muon_weight_decay", &O::muon_weight_decay,
          "decoupled weight decay of the Muon matrices: W *= 1 - muon_lr * muon_weight_decay (optim.weight_decay "
          "applies to the AdamW tensors)",
          non_negative<double>()),
  };
  return k;
}

const KeyDef* find_key(const std::string& section, const std::string& name) {
  for (const auto& k : keys())
    if (k.section == section && k.name == name) return &k;
  return nullptr;
}

bool is_section(const std::string& s) {
  return s == "model" || s == "data" || s == "train" || s == "optim" || s == "parallel" || s == "rl";
}

// ModelConfig names keys "<where>: key 'hidden_size': ..."; a run config names them
// "model.hidden_size".
[[noreturn]] void rethrow_model_error(const Error& e, const std::string& where) {
  const std::string msg = e.what();
  const std::string prefix = where + ": key '";
  if (msg.compare(0, prefix.size(), prefix) == 0) throw Error(prefix + "model." + msg.substr(prefix.size()));
  throw Error(where + ": key 'model': " + msg);
}

// Model keys and their meaning (MODEL.md section 1), for the help text.
const std::vector<std::pair<std::string, std::string>>& model_help() {
  static const std::vector<std::pair<std::string, std::string>> h = {
      {"vocab_size", "V, vocabulary size"},
      {"hidden_size", "d, model width"},
      {"num_hidden_layers", "L, transformer layers"},
      {"num_attention_heads", "H, query heads"},
      {"num_key_value_heads", "H_kv, key/value heads (GQA; H % H_kv == 0); default H"},
      {"head_dim", "hd, width of one head; default d / H"},
      {"max_position_embeddings", "longest sequence (data.seq_len must not exceed it)"},
      {"rope_theta", "RoPE base"},
      {"rms_norm_eps", "epsilon of RMSNorm"},
      {"first_k_dense_replace", "number of leading layers with a dense FFN instead of MoE"},
      {"intermediate_size", "width of the dense FFN; default 4d"},
      {"n_routed_experts", "E, routed experts per MoE layer"},
      {"num_experts_per_tok", "K, experts selected per token"},
      {"moe_intermediate_size", "F, width of one routed expert; default d"},
      {"n_shared_experts", "S, the shared expert is one SwiGLU MLP of width S*F; 0 = none"},
      {"scoring_func", "router scores: \"softmax\", \"sigmoid\" or \"sqrtsoftplus\" (sqrt(softplus), DeepSeek-V4)"},
      {"norm_topk_prob", "renormalise the K selected weights to sum 1"},
      {"routed_scaling_factor", "multiplies the selected weights"},
      {"n_group", "expert groups of group-limited routing (1 = off)"},
      {"topk_group", "groups kept per token in group-limited routing"},
      {"topk_method", "\"greedy\" (select on scores) or \"noaux_tc\" (select on scores + bias)"},
      {"bias_update_rate", "gamma of the aux-loss-free bias update (noaux_tc)"},
      {"aux_loss_coeff", "switch-style load-balancing loss coefficient"},
      {"seq_aux_loss_coeff", "DeepSeek-V3 sequence-wise balance loss coefficient (alpha)"},
      {"z_loss_coeff", "router z-loss coefficient"},
      {"capacity_factor", "0 = dropless; > 0 = per-expert capacity ceil(c * T * K / E) with dropping"},
      {"tie_word_embeddings", "share the embedding and the LM head"},
      {"initializer_range", "standard deviation of the normal initialisation"},
      {"num_hash_layers", "leading MoE layers that route by the fixed per-token table mlp.gate.tid2eid (V, K); 0 = none"},
      {"swiglu_limit", "c > 0 clamps the experts' SwiGLU: gate = min(gate, c), up = clamp(up, -c, c); 0 = off"},
      {"hc_mult", "mHC residual streams per token (1 = the plain residual stream)"},
      {"hc_sinkhorn_iters", "mHC: Sinkhorn rounds of the stream-mixing matrix comb"},
      {"hc_eps", "mHC: epsilon of pre, comb and the Sinkhorn normalisations"},
      {"num_nextn_predict_layers", "MTP: 1 = one more block predicting token t+2 (mtp.0.*), 0 = none"},
      {"mtp_loss_weight", "MTP: weight of the MTP block's cross-entropy in the loss"},
      {"attention_type", "\"llama\" (q/k/v/o, GQA) or \"v4\" (DeepSeek-V4: low-rank q, shared kv head, sinks)"},
      {"q_lora_rank", "v4: rank of the low-rank q (q_a_proj, q_b_proj)"},
      {"qk_rope_head_dim", "v4: last channels of each q/kv head that get RoPE (interleaved pairs); even, <= head_dim"},
      {"sliding_window", "v4: a query sees its W most recent keys (itself included); 0 = all"},
      {"o_groups", "v4: groups of heads of the output projection o_a_proj (H % o_groups == 0)"},
      {"o_lora_rank", "v4: output width of one o_a_proj group; o_b_proj is (d, o_groups * o_lora_rank)"},
  };
  return h;
}

}  // namespace

int TrainConfig::micro_batches(int ranks) const {
  if (global_batch_size == 0) return grad_accum_steps * ranks;
  if (global_batch_size % (int64_t(micro_batch_size) * ranks) != 0)
    throw Error("key 'train.global_batch_size': " + std::to_string(global_batch_size) +
                " rows must be a multiple of train.micro_batch_size (" + std::to_string(micro_batch_size) +
                ") times the number of ranks (" + std::to_string(ranks) + ")");
  return int(global_batch_size / micro_batch_size);
}

RunConfig RunConfig::from_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open file");
  std::ostringstream text;
  text << in.rdbuf();
  json j;
  try {
    j = parse_json(text.str());
  } catch (const JsonError& e) {
    throw Error(path + ": invalid JSON: " + e.what());
  }
  return from_json(j, path, std::filesystem::path(path).parent_path().string());
}

RunConfig RunConfig::from_json(const json& j, const std::string& where, const std::string& base_dir) {
  if (!j.is_object()) throw Error(where + ": expected a JSON object with sections model, data, train, optim, parallel");
  RunConfig c;
  for (auto sec = j.begin(); sec != j.end(); ++sec) {
    const std::string& s = sec.key();
    if (!is_section(s)) fail(where, s, "unknown section (expected model, data, train, optim, parallel or rl)");
    if (!sec.value().is_object()) fail(where, s, "expected a JSON object, got " + sec.value().dump());
    if (s == "model") {
      try {
        c.model = ModelConfig::from_json(sec.value(), where);
      } catch (const Error& e) {
        rethrow_model_error(e, where);
      }
      continue;
    }
    for (auto it = sec.value().begin(); it != sec.value().end(); ++it) {
      const KeyDef* k = find_key(s, it.key());
      if (!k) fail(where, s + "." + it.key(), "unknown key in section '" + s + "'");
      k->read(c, it.value(), where);
    }
  }
  namespace fs = std::filesystem;
  if (!base_dir.empty() && !c.data.train_path.empty() && fs::path(c.data.train_path).is_relative())
    c.data.train_path = (fs::path(base_dir) / c.data.train_path).lexically_normal().string();
  if (!base_dir.empty() && !c.data.valid_path.empty() && fs::path(c.data.valid_path).is_relative())
    c.data.valid_path = (fs::path(base_dir) / c.data.valid_path).lexically_normal().string();
  if (!base_dir.empty() && !c.data.tokenizer.empty() && c.data.tokenizer != "byte" &&
      fs::path(c.data.tokenizer).is_relative())
    c.data.tokenizer = (fs::path(base_dir) / c.data.tokenizer).lexically_normal().string();
  c.validate(where);
  return c;
}

void RunConfig::set(const std::string& assignment) {
  const std::string where = "--set " + assignment;
  const auto eq = assignment.find('=');
  if (eq == std::string::npos)
    throw Error(where + ": expected <section>.<key>=<value>, e.g. train.steps=10 (no '=' found)");
  const std::string dotted = assignment.substr(0, eq);
  const std::string value = assignment.substr(eq + 1);
  const auto dot = dotted.find('.');
  if (dot == std::string::npos) fail(where, dotted, "expected <section>.<key> (sections: model, data, train, optim)");
  const std::string section = dotted.substr(0, dot), name = dotted.substr(dot + 1);
  if (!is_section(section))
    fail(where, dotted, "unknown section '" + section + "' (expected model, data, train, optim, parallel or rl)");
  if (section == "model") {
    ModelConfig m = model;  // leave *this untouched when the value is rejected
    try {
      m.set(name, value, where);
    } catch (const Error& e) {
      rethrow_model_error(e, where);
    }
    model = m;
    return;
  }
  const KeyDef* k = find_key(section, name);
  if (!k) fail(where, dotted, "unknown key in section '" + section + "'");
  json v;
  // A string value goes into JSON (trainer_state.json of every checkpoint), which holds
  // UTF-8 only.
  if (k->is_string && !tok::valid_utf8(value)) fail(where, dotted, "the value is not valid UTF-8");
  if (k->is_string && (value.empty() || value.front() != '"')) {
    v = value;  // a path or a word, taken literally
  } else {
    try {
      v = parse_json(value);
    } catch (const JsonError&) {
      v = value;  // not JSON: a bare word, rejected below unless the key is a string
    }
  }
  RunConfig changed = *this;  // leave *this untouched when the value is rejected
  k->read(changed, v, where);
  if (k->check) k->check(changed, where);
  *this = std::move(changed);
}

json RunConfig::to_json() const {
  json j = json::object();
  j["model"] = model.to_json();
  j["model"].erase("model_type");
  for (const auto& k : keys()) j[k.section][k.name] = k.write(*this);
  return j;
}

void RunConfig::validate(const std::string& where) const {
  try {
    model.validate(where);
  } catch (const Error& e) {
    rethrow_model_error(e, where);
  }
  for (const auto& k : keys())
    if (k.check) k.check(*this, where);
  if (data.seq_len > model.max_position_embeddings)
    fail(where, "data.seq_len",
         "must be <= model.max_position_embeddings (" + std::to_string(model.max_position_embeddings) + "), got " +
             std::to_string(data.seq_len));
  if (data.pad_id >= model.vocab_size)
    fail(where, "data.pad_id",
         "must be < model.vocab_size (" + std::to_string(model.vocab_size) + "), got " + std::to_string(data.pad_id));
  if (data.overlong == "skip" && data.format != "sft")
    fail(where, "data.overlong", "\"skip\" applies to data.format \"sft\" only (use truncate, error or split)");
  if (data.overlong == "split" && data.format == "sft")
    fail(where, "data.overlong",
         "\"split\" applies to data.format \"tokens\" and \"bin\"; an SFT sample is truncated, skipped or refused");
  if (data.overlong == "split" && data.seq_len < 2)
    fail(where, "data.overlong", "\"split\" needs data.seq_len >= 2");
  if (optim.warmup_steps > train.steps)
    fail(where, "optim.warmup_steps",
         "must be <= train.steps (" + std::to_string(train.steps) + "), got " + std::to_string(optim.warmup_steps));
}

std::string describe_config_keys() {
  std::ostringstream s;
  s << "Run configuration (moetune train --config run.json). Every section and key is optional;\n"
       "override any key with --set section.key=value (e.g. --set train.steps=10 --set optim.lr=3e-4).\n";
  const ModelConfig raw;  // unresolved: derived keys are -1
  const json model_defaults = ModelConfig::from_json(json::object()).to_json();
  s << "\n[model]  the model (MODEL.md section 1)\n";
  for (const auto& [name, help] : model_help()) {
    std::string def = model_defaults.at(name).dump();
    if (name == "num_key_value_heads" && raw.num_key_value_heads < 0) def = "num_attention_heads";
    if (name == "head_dim" && raw.head_dim < 0) def = "hidden_size / num_attention_heads";
    if (name == "intermediate_size" && raw.intermediate_size < 0) def = "4 * hidden_size";
    if (name == "moe_intermediate_size" && raw.moe_intermediate_size < 0) def = "hidden_size";
    s << "  model." << name << " = " << def << "\n      " << help << "\n";
  }
  const RunConfig defaults;
  std::string section;
  for (const auto& k : keys()) {
    if (k.section != section) {
      section = k.section;
      s << "\n[" << section << "]  "
        << (section == "data"    ? "training data and batch rows (docs/data.md)"
            : section == "train" ? "the training loop"
            : section == "optim" ? "the optimizer (AdamW or Muon) and the learning-rate schedule"
            : section == "rl"    ? "moetune rl: rollouts, rewards and the GRPO-family objective (docs/rl.md)"
                                 : "the process grid under mpirun (README: Running on several processes)")
        << "\n";
    }
    s << "  " << k.dotted() << " = " << k.write(defaults).dump() << "\n      " << k.help << "\n";
  }
  return s.str();
}

}  // namespace moetune
