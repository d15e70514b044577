// Parsing, validation and serialisation of ModelConfig (MODEL.md section 1).
#include "moe/config.hpp"

#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <functional>
#include <limits>
#include <sstream>
#include <vector>

#include "io/json_parse.hpp"
#include "moe/error.hpp"

namespace moetune {
namespace {

using json = nlohmann::json;

// One entry per key: how to read it from JSON, from a string, and write it back.
struct KeyDef {
  const char* name;
  std::function<void(ModelConfig&, const json&, const std::string&)> read;
  std::function<json(const ModelConfig&)> write;
};

[[noreturn]] void fail(const std::string& where, const std::string& key, const std::string& msg) {
  throw Error(where + ": key '" + key + "': " + msg);
}

// A value for a message. A --set value that is not JSON becomes a string as given,
// possibly not UTF-8, which plain dump() refuses (it throws): show U+FFFD instead.
std::string shown(const json& v) { return v.dump(-1, ' ', false, json::error_handler_t::replace); }

template <class M>
KeyDef int_key(const char* name, M member) {
  return {name,
          [=](ModelConfig& c, const json& v, const std::string& where) {
            if (!v.is_number_integer()) fail(where, name, "expected an integer, got " + shown(v));
            // get<int>() would silently wrap 4294967304 to 8.
            if (v.is_number_unsigned() ? v.get<uint64_t>() > uint64_t(INT_MAX)
                                       : v.get<int64_t>() < INT_MIN || v.get<int64_t>() > INT_MAX)
              fail(where, name, "integer " + v.dump() + " is out of range (at most " + std::to_string(INT_MAX) + ")");
            c.*member = v.get<int>();
          },
          [=](const ModelConfig& c) { return json(c.*member); }};
}
template <class M>
KeyDef num_key(const char* name, M member) {
  return {name,
          [=](ModelConfig& c, const json& v, const std::string& where) {
            if (!v.is_number()) fail(where, name, "expected a number, got " + shown(v));
            c.*member = v.get<double>();
          },
          [=](const ModelConfig& c) { return json(c.*member); }};
}
template <class M>
KeyDef bool_key(const char* name, M member) {
  return {name,
          [=](ModelConfig& c, const json& v, const std::string& where) {
            if (!v.is_boolean()) fail(where, name, "expected true or false, got " + shown(v));
            c.*member = v.get<bool>();
          },
          [=](const ModelConfig& c) { return json(c.*member); }};
}
template <class M>
KeyDef str_key(const char* name, M member) {
  return {name,
          [=](ModelConfig& c, const json& v, const std::string& where) {
            if (!v.is_string()) fail(where, name, "expected a string, got " + shown(v));
            c.*member = v.get<std::string>();
          },
          [=](const ModelConfig& c) { return json(c.*member); }};
}

const std::vector<KeyDef>& keys() {
  static const std::vector<KeyDef> k = {
      int_key("vocab_size", &ModelConfig::vocab_size),
      int_key("hidden_size", &ModelConfig::hidden_size),
      int_key("num_hidden_layers", &ModelConfig::num_hidden_layers),
      int_key("num_attention_heads", &ModelConfig::num_attention_heads),
      int_key("num_key_value_heads", &ModelConfig::num_key_value_heads),
      int_key("head_dim", &ModelConfig::head_dim),
      int_key("max_position_embeddings", &ModelConfig::max_position_embeddings),
      num_key("rope_theta", &ModelConfig::rope_theta),
      num_key("rms_norm_eps", &ModelConfig::rms_norm_eps),
      int_key("first_k_dense_replace", &ModelConfig::first_k_dense_replace),
      int_key("intermediate_size", &ModelConfig::intermediate_size),
      int_key("n_routed_experts", &ModelConfig::n_routed_experts),
      int_key("num_experts_per_tok", &ModelConfig::num_experts_per_tok),
      int_key("moe_intermediate_size", &ModelConfig::moe_intermediate_size),
      int_key("n_shared_experts", &ModelConfig::n_shared_experts),
      str_key("scoring_func", &ModelConfig::scoring_func),
      bool_key("norm_topk_prob", &ModelConfig::norm_topk_prob),
      num_key("routed_scaling_factor", &ModelConfig::routed_scaling_factor),
      int_key("n_group", &ModelConfig::n_group),
      int_key("topk_group", &ModelConfig::topk_group),
      str_key("topk_method", &ModelConfig::topk_method),
      num_key("bias_update_rate", &ModelConfig::bias_update_rate),
      num_key("aux_loss_coeff", &ModelConfig::aux_loss_coeff),
      num_key("seq_aux_loss_coeff", &ModelConfig::seq_aux_loss_coeff),
      num_key("z_loss_coeff", &ModelConfig::z_loss_coeff),
      num_key("capacity_factor", &ModelConfig::capacity_factor),
      bool_key("tie_word_embeddings", &ModelConfig::tie_word_embeddings),
      num_key("initializer_range", &ModelConfig::initializer_range),
      int_key("num_hash_layers", &ModelConfig::num_hash_layers),
      num_key("swiglu_limit", &ModelConfig::swiglu_limit),
      int_key("hc_mult", &ModelConfig::hc_mult),
      int_key("hc_sinkhorn_iters", &ModelConfig::hc_sinkhorn_iters),
      num_key("hc_eps", &ModelConfig::hc_eps),
      int_key("num_nextn_predict_layers", &ModelConfig::num_nextn_predict_layers),
      num_key("mtp_loss_weight", &ModelConfig::mtp_loss_weight),
      str_key("attention_type", &ModelConfig::attention_type),
      int_key("q_lora_rank", &ModelConfig::q_lora_rank),
      int_key("qk_rope_head_dim", &ModelConfig::qk_rope_head_dim),
      int_key("sliding_window", &ModelConfig::sliding_window),
      int_key("o_groups", &ModelConfig::o_groups),
      int_key("o_lora_rank", &ModelConfig::o_lora_rank),
  };
  return k;
}

// Keys that Hugging Face config.json files carry and that we accept and ignore.
bool ignorable(const std::string& key) {
  static const char* names[] = {"model_type", "architectures", "torch_dtype", "transformers_version",
                                "_name_or_path", "moetune_version"};
  for (auto* n : names)
    if (key == n) return true;
  return false;
}

enum : unsigned { kDerivedKv = 1, kDerivedHeadDim = 2, kDerivedInter = 4, kDerivedMoeInter = 8 };

// Fills the -1 (derived) keys and remembers which ones were derived.
void resolve(ModelConfig& c, const std::string& where) {
  if (c.num_key_value_heads == -1) {
    c.num_key_value_heads = c.num_attention_heads;
    c.derived_mask |= kDerivedKv;
  }
  if (c.head_dim == -1 && c.num_attention_heads > 0) {
    c.head_dim = c.hidden_size / c.num_attention_heads;
    c.derived_mask |= kDerivedHeadDim;
  }
  if (c.intermediate_size == -1) {
    if (int64_t(c.hidden_size) * 4 > INT_MAX)
      fail(where, "intermediate_size", "the default 4 * hidden_size = " + std::to_string(int64_t(c.hidden_size) * 4) +
                                           " is out of range; give intermediate_size");
    c.intermediate_size = 4 * c.hidden_size;
    c.derived_mask |= kDerivedInter;
  }
  if (c.moe_intermediate_size == -1) {
    c.moe_intermediate_size = c.hidden_size;
    c.derived_mask |= kDerivedMoeInter;
  }
}

// Puts derived keys back to -1 so that resolve() derives them again.
void unresolve(ModelConfig& c) {
  if (c.derived_mask & kDerivedKv) c.num_key_value_heads = -1;
  if (c.derived_mask & kDerivedHeadDim) c.head_dim = -1;
  if (c.derived_mask & kDerivedInter) c.intermediate_size = -1;
  if (c.derived_mask & kDerivedMoeInter) c.moe_intermediate_size = -1;
}

unsigned derived_bit(const std::string& key) {
  if (key == "num_key_value_heads") return kDerivedKv;
  if (key == "head_dim") return kDerivedHeadDim;
  if (key == "intermediate_size") return kDerivedInter;
  if (key == "moe_intermediate_size") return kDerivedMoeInter;
  return 0;
}

}  // namespace

ModelConfig ModelConfig::from_json(const json& j, const std::string& where) {
  if (!j.is_object()) throw Error(where + ": expected a JSON object");
  ModelConfig c;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const KeyDef* def = nullptr;
    for (const auto& k : keys())
      if (it.key() == k.name) def = &k;
    if (!def) {
      if (ignorable(it.key())) continue;
      fail(where, it.key(), "unknown model config key");
    }
    def->read(c, it.value(), where);
  }
  resolve(c, where);
  c.validate(where);
  return c;
}

ModelConfig ModelConfig::from_file(const std::string& path) {
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
  return from_json(j, path);
}

json ModelConfig::to_json() const {
  json j = json::object();
  j["model_type"] = "moetune_moe";
  for (const auto& k : keys()) j[k.name] = k.write(*this);
  return j;
}

void ModelConfig::set(const std::string& key, const std::string& value, const std::string& where) {
  for (const auto& k : keys()) {
    if (key != k.name) continue;
    json v;
    try {
      v = parse_json(value);
    } catch (const JsonError&) {
      v = value;  // a bare word is a string
    }
    ModelConfig next = *this;
    unresolve(next);
    k.read(next, v, where);
    next.derived_mask &= ~derived_bit(key);  // an explicit value is no longer derived
    if (v.is_number_integer() && v.get<long>() == -1) next.derived_mask |= derived_bit(key);
    resolve(next, where);
    next.validate(where);
    *this = next;
    return;
  }
  fail(where, key, "unknown model config key");
}

int ModelConfig::num_moe_layers() const {
  int n = 0;
  for (int l = 0; l < num_hidden_layers; ++l) n += is_moe_layer(l);
  return n + (mtp() ? 1 : 0);
}

void ModelConfig::validate(const std::string& w) const {
  auto positive = [&](const char* key, long v) {
    if (v <= 0) fail(w, key, "must be positive, got " + std::to_string(v));
  };
  positive("vocab_size", vocab_size);
  positive("hidden_size", hidden_size);
  positive("num_hidden_layers", num_hidden_layers);
  positive("num_attention_heads", num_attention_heads);
  positive("num_key_value_heads", num_key_value_heads);
  positive("head_dim", head_dim);
  positive("max_position_embeddings", max_position_embeddings);
  positive("intermediate_size", intermediate_size);
  positive("n_routed_experts", n_routed_experts);
  positive("num_experts_per_tok", num_experts_per_tok);
  positive("moe_intermediate_size", moe_intermediate_size);
  positive("n_group", n_group);
  positive("topk_group", topk_group);
  if (head_dim % 2 != 0) fail(w, "head_dim", "must be even for RoPE, got " + std::to_string(head_dim));
  if (num_attention_heads % num_key_value_heads != 0)
    fail(w, "num_key_value_heads",
         "num_attention_heads (" + std::to_string(num_attention_heads) + ") must be divisible by num_key_value_heads (" +
             std::to_string(num_key_value_heads) + ")");
  if (!(rope_theta > 0)) fail(w, "rope_theta", "must be positive");
  if (!(rms_norm_eps > 0)) fail(w, "rms_norm_eps", "must be positive");
  if (first_k_dense_replace < 0 || first_k_dense_replace > num_hidden_layers)
    fail(w, "first_k_dense_replace", "must be in [0, num_hidden_layers]");
  if (n_shared_experts < 0) fail(w, "n_shared_experts", "must be >= 0");
  if (scoring_func != "softmax" && scoring_func != "sigmoid" && scoring_func != "sqrtsoftplus")
    fail(w, "scoring_func",
         "must be \"softmax\", \"sigmoid\" or \"sqrtsoftplus\", got \"" + scoring_func + "\"");
  if (topk_method != "greedy" && topk_method != "noaux_tc")
    fail(w, "topk_method", "must be \"greedy\" or \"noaux_tc\", got \"" + topk_method + "\"");
  if (num_experts_per_tok > n_routed_experts)
    fail(w, "num_experts_per_tok", "K = " + std::to_string(num_experts_per_tok) + " exceeds n_routed_experts = " +
                                       std::to_string(n_routed_experts));
  if (n_routed_experts % n_group != 0)
    fail(w, "n_group", "n_routed_experts (" + std::to_string(n_routed_experts) + ") must be divisible by n_group (" +
                           std::to_string(n_group) + ")");
  if (topk_group > n_group)
    fail(w, "topk_group", "topk_group (" + std::to_string(topk_group) + ") exceeds n_group (" +
                              std::to_string(n_group) + ")");
  if ((long)num_experts_per_tok > (long)topk_group * (n_routed_experts / n_group))
    fail(w, "num_experts_per_tok", "K = " + std::to_string(num_experts_per_tok) +
                                       " exceeds the experts selectable in topk_group groups (" +
                                       std::to_string(topk_group * (n_routed_experts / n_group)) + ")");
  if (!(routed_scaling_factor > 0)) fail(w, "routed_scaling_factor", "must be positive");
  if (bias_update_rate < 0) fail(w, "bias_update_rate", "must be >= 0");
  if (aux_loss_coeff < 0) fail(w, "aux_loss_coeff", "must be >= 0");
  if (seq_aux_loss_coeff < 0) fail(w, "seq_aux_loss_coeff", "must be >= 0");
  if (z_loss_coeff < 0) fail(w, "z_loss_coeff", "must be >= 0");
  if (capacity_factor < 0) fail(w, "capacity_factor", "must be >= 0 (0 = dropless)");
  if (!(initializer_range > 0)) fail(w, "initializer_range", "must be positive");
  if (num_hash_layers < 0) fail(w, "num_hash_layers", "must be >= 0, got " + std::to_string(num_hash_layers));
  if (num_hash_layers > num_main_moe_layers())
    fail(w, "num_hash_layers", std::to_string(num_hash_layers) + " hash-routed layers exceed the " +
                                   std::to_string(num_main_moe_layers()) +
                                   " MoE layers (num_hidden_layers - first_k_dense_replace)");
  if (!(swiglu_limit >= 0) || !std::isfinite(swiglu_limit))
    fail(w, "swiglu_limit", "must be a finite number >= 0 (0 = off)");
  if (hc_mult < 1) fail(w, "hc_mult", "must be >= 1 (1 = no hyper-connections), got " + std::to_string(hc_mult));
  if (hc_sinkhorn_iters < 1)
    fail(w, "hc_sinkhorn_iters", "must be >= 1, got " + std::to_string(hc_sinkhorn_iters));
  if (!(hc_eps >= 0) || !std::isfinite(hc_eps)) fail(w, "hc_eps", "must be a finite number >= 0");
  if (num_nextn_predict_layers != 0 && num_nextn_predict_layers != 1)
    fail(w, "num_nextn_predict_layers",
         "must be 0 or 1 (one MTP block), got " + std::to_string(num_nextn_predict_layers));
  if (!(mtp_loss_weight >= 0) || !std::isfinite(mtp_loss_weight))
    fail(w, "mtp_loss_weight", "must be a finite number >= 0");
  if (attention_type != "llama" && attention_type != "v4")
    fail(w, "attention_type", "must be \"llama\" or \"v4\", got \"" + attention_type + "\"");
  if (sliding_window < 0)
    fail(w, "sliding_window", "must be >= 0 (0 = every earlier key), got " + std::to_string(sliding_window));
  if (!v4_attention() && sliding_window != 0)
    fail(w, "sliding_window", "applies to attention_type \"v4\" only (attention_type is \"" + attention_type + "\")");
  if (v4_attention()) {
    positive("q_lora_rank", q_lora_rank);
    positive("o_lora_rank", o_lora_rank);
    positive("o_groups", o_groups);
    if (qk_rope_head_dim < 0 || qk_rope_head_dim % 2 != 0 || qk_rope_head_dim > head_dim)
      fail(w, "qk_rope_head_dim", "must be even and in [0, head_dim = " + std::to_string(head_dim) + "], got " +
                                      std::to_string(qk_rope_head_dim));
    if (num_attention_heads % o_groups != 0)
      fail(w, "o_groups", "num_attention_heads (" + std::to_string(num_attention_heads) +
                              ") must be divisible by o_groups (" + std::to_string(o_groups) + ")");
  }

  // Sizes that are each valid can still multiply to more weights than any machine
  // holds (hidden_size 10^9): say so here, naming the file, rather than fail inside an
  // allocation (std::bad_alloc, "vector larger than max_size()") or the OOM killer.
  const long double d = hidden_size, V = vocab_size, q = (long double)num_attention_heads * head_dim,
                    kv = (long double)num_key_value_heads * head_dim, E = n_routed_experts, F = moe_intermediate_size;
  const int moe_layers = num_moe_layers();
  // Attention weights of one layer: q/k/v/o, or V4's q_a, q_b, kv, o_a, o_b (+ norms, sinks).
  const long double qr = q_lora_rank, orank = (long double)o_groups * o_lora_rank;
  const long double attn = v4_attention() ? d * qr + qr + qr * q + d * head_dim + head_dim + q * o_lora_rank +
                                                d * orank + num_attention_heads
                                          : 2 * q * d + 2 * kv * d;
  const long double params =
      V * d * (tie_word_embeddings ? 1 : 2) + d +
      (long double)num_hidden_layers * (2 * d + attn) +
      (long double)(num_hidden_layers - moe_layers) * 3 * (long double)intermediate_size * d +
      (long double)moe_layers * (E * d + E + 3 * E * F * d + 3 * (long double)n_shared_experts * F * d);
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGE_SIZE);
  const long double memory = pages > 0 && page > 0 ? (long double)pages * page : 1e15L;
  if (params * 4 > memory) {
    char msg[320];
    std::snprintf(msg, sizeof msg,
                  ": the model has %.3Lg parameters (%.3Lg GiB as float), more than this machine's %.3Lg GiB of "
                  "memory: check the sizes (vocab_size, hidden_size, num_hidden_layers, intermediate_size, "
                  "n_routed_experts, moe_intermediate_size, n_shared_experts)",
                  params, params * 4 / (1024.0L * 1024 * 1024), memory / (1024.0L * 1024 * 1024));
    throw Error(w + msg);
  }
}

}  // namespace moetune
