// moetune <-> Hugging Face transformers checkpoint conversion (see hf_convert.hpp).
#include "io/hf_convert.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <optional>
#include <unordered_set>

#include "io/checkpoint.hpp"
#include "io/fsutil.hpp"
#include "io/json_parse.hpp"
#include "io/safetensors.hpp"
#include "io/tensor_set.hpp"
#include "moe/error.hpp"
#include "moe/params.hpp"

namespace moetune {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::string join(const std::string& dir, const std::string& file) { return (fs::path(dir) / file).string(); }

// "<prefix>.mlp.experts.<e>.<proj>.weight" of moetune's per-expert layout.
struct ExpertName {
  std::string prefix;  // "model.layers.3" (everything before ".mlp.experts.")
  int expert = 0;
  int proj = 0;  // 0 gate_proj, 1 up_proj, 2 down_proj
};

std::optional<ExpertName> parse_expert_name(const std::string& name) {
  static const std::string mid = ".mlp.experts.";
  const size_t m = name.find(mid);
  if (m == std::string::npos) return std::nullopt;
  size_t i = m + mid.size(), j = i;
  while (j < name.size() && name[j] >= '0' && name[j] <= '9') ++j;
  if (j == i || j >= name.size() || name[j] != '.') return std::nullopt;
  static const char* projs[] = {"gate_proj.weight", "up_proj.weight", "down_proj.weight"};
  for (int p = 0; p < 3; ++p)
    if (name.compare(j + 1, std::string::npos, projs[p]) == 0)
      return ExpertName{name.substr(0, m), std::stoi(name.substr(i, j - i)), p};
  return std::nullopt;
}

std::string gate_up_name(const std::string& prefix) { return prefix + ".mlp.experts.gate_up_proj"; }
std::string down_name(const std::string& prefix) { return prefix + ".mlp.experts.down_proj"; }

// The transformers model a configuration maps to: DeepSeek-V4 for any of its parts
// (V4 attention, sqrtsoftplus or hash routing, mHC, the MTP block), else DeepSeek-V3.
bool is_v4(const ModelConfig& c) {
  return c.v4_attention() || c.sqrtsoftplus() || c.num_hash_layers > 0 || c.hc() || c.mtp();
}

// The routed-expert stacks of one checkpoint: prefix -> (F, d), in layout order.
struct ExpertStacks {
  std::vector<std::string> prefixes;
  std::map<std::string, std::pair<int64_t, int64_t>> dims;  // prefix -> (F, d)
};

ExpertStacks expert_stacks(const ParamLayout& layout, int E) {
  ExpertStacks s;
  std::map<std::string, std::vector<int>> seen;  // prefix -> count per projection
  for (const auto& t : layout.tensors()) {
    const auto en = parse_expert_name(t.name);
    if (!en) continue;
    if (!s.dims.count(en->prefix)) {
      s.prefixes.push_back(en->prefix);
      s.dims[en->prefix] = {-1, -1};
      seen[en->prefix].assign(3, 0);
    }
    auto& fd = s.dims[en->prefix];
    if (en->proj == 0) fd = {t.shape[0], t.shape[1]};
    seen[en->prefix][en->proj]++;
  }
  for (const auto& p : s.prefixes)
    for (int k = 0; k < 3; ++k)
      if (seen[p][k] != E)
        throw Error("convert: " + p + " has " + std::to_string(seen[p][k]) + " routed experts, expected " +
                    std::to_string(E));
  return s;
}

json read_json(const std::string& path) {
  if (!fs::exists(path)) throw Error(path + ": missing");
  try {
    return parse_json(fsutil::read_file(path));
  } catch (const JsonError& e) {
    throw Error(path + ": invalid JSON: " + e.what());
  }
}

void copy_tokenizer(const std::string& from_dir, const std::string& to_dir) {
  const std::string tok = join(from_dir, "tokenizer.json");
  if (fs::exists(tok)) fsutil::write_file_atomic(join(to_dir, "tokenizer.json"), fsutil::read_file(tok));
}

template <class T>
void check_finite(const std::string& file, const std::string& name, const T* p, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (!std::isfinite(p[i]))
      throw Error(file + ": tensor '" + name + "' holds a non-finite value at element " + std::to_string(i) +
                  "; refusing to convert it");
}

}  // namespace

json hf_config_json(const ModelConfig& cfg) {
  json j = cfg.to_json();
  const bool v4 = is_v4(cfg);
  j["model_type"] = v4 ? "deepseek_v4" : "deepseek_v3";
  j["architectures"] = {v4 ? "DeepseekV4ForCausalLM" : "DeepseekV3ForCausalLM"};
  j["torch_dtype"] = "float32";
  j["hidden_act"] = "silu";
  if (cfg.v4_attention()) {
    // transformers' per-layer attention schedule (moetune has the sliding-window one only)
    // and its RoPE fraction; qk_rope_head_dim stays as well (the legacy key it folds in).
    j["layer_types"] = json(std::vector<std::string>(size_t(cfg.num_hidden_layers), "sliding_attention"));
    j["partial_rotary_factor"] = double(cfg.qk_rope_head_dim) / double(cfg.hd());
  }
  if (cfg.num_hash_layers > 0 && cfg.first_k_dense_replace == 0) {
    // transformers' per-layer MoE schedule (every layer MoE, as in DeepSeek-V4);
    // num_hash_layers stays as well (the legacy key it folds in).
    json types = json::array();
    for (int l = 0; l < cfg.num_hidden_layers; ++l) types.push_back(cfg.is_hash_moe_layer(l) ? "hash_moe" : "moe");
    j["mlp_layer_types"] = types;
  }
  return j;
}

ModelConfig config_from_hf_json(const json& in, const std::string& where) {
  if (!in.is_object()) throw Error(where + ": expected a JSON object");
  const auto bad = [&](const std::string& key, const std::string& msg) -> void {
    throw Error(where + ": key '" + key + "': " + msg);
  };
  json j = json::object();
  std::optional<int> hash_from_types;
  const bool v4 = in.contains("model_type") && in["model_type"] == "deepseek_v4";
  for (auto it = in.begin(); it != in.end(); ++it) {
    const std::string& k = it.key();
    const json& v = it.value();
    if (k == "model_type") {
      if (!v.is_string() || (v != "deepseek_v3" && v != "deepseek_v4"))
        bad(k, "moetune converts DeepSeek models (deepseek_v3, deepseek_v4), not " + v.dump());
    } else if (k == "hidden_act") {
      if (v != "silu") bad(k, "moetune's experts use SwiGLU (silu), not " + v.dump());
    } else if (k == "attention_bias" || k == "mlp_bias") {
      if (v != false) bad(k, "moetune's projections have no bias");
    } else if (k == "rope_scaling") {
      if (!v.is_null()) bad(k, "RoPE scaling (YaRN etc.) is not implemented; only plain RoPE");
    } else if (k == "quantization_config") {
      bad(k, "quantised (e.g. FP8) weights are not supported; convert them to BF16/F32 first");
    } else if (k == "kv_lora_rank" || k == "qk_nope_head_dim" || k == "v_head_dim" ||
               (k == "q_lora_rank" && !v4 && !in.contains("attention_type"))) {
      if (!v.is_null())
        bad(k, "multi-head latent attention (MLA, DeepSeek-V3's) is not implemented; moetune's attentions are "
               "grouped-query attention (q/k/v/o projections) and DeepSeek-V4's (attention_type \"v4\")");
    } else if (k == "layer_types") {
      if (!v.is_array()) bad(k, "expected an array");
      for (size_t i = 0; i < v.size(); ++i)
        if (v[i] != "sliding_attention")
          bad(k, "entry " + std::to_string(i) + " is " + v[i].dump() +
                     ": compressed attention (CSA/HCA) is not implemented");
    } else if (k == "mlp_layer_types") {
      if (!v.is_array()) bad(k, "expected an array");
      int h = 0;
      bool after_hash = false;
      for (size_t i = 0; i < v.size(); ++i) {
        if (v[i] == "hash_moe") {
          if (after_hash) bad(k, "hash_moe layers must come first (entry " + std::to_string(i) + ")");
          ++h;
        } else if (v[i] == "moe") {
          after_hash = true;
        } else {
          bad(k, "entry " + std::to_string(i) + " is " + v[i].dump() + ", expected \"hash_moe\" or \"moe\"");
        }
      }
      hash_from_types = h;
    } else if (k == "num_local_experts") {
      j["n_routed_experts"] = v;
    } else if (k == "moe_layer_freq") {
      if (v != 1) bad(k, "only every layer from first_k_dense_replace on being MoE (1) is supported");
    } else if (k == "transformers_version" || k == "_name_or_path" || k == "use_cache" || k == "bos_token_id" ||
               k == "eos_token_id" || k == "pad_token_id" || k == "attention_dropout" ||
               k == "output_router_logits" || k == "router_aux_loss_coef" || k == "router_jitter_noise" ||
               k == "pretraining_tp" || k == "ep_size" || k == "compress_rates" || k == "compress_rope_theta" ||
               k == "index_n_heads" || k == "index_head_dim" || k == "index_topk" || k == "rope_parameters" ||
               k == "dtype" || k == "rope_interleave" || k == "partial_rotary_factor") {
      // transformers bookkeeping, settings of parts moetune refuses above, or read below
      // (partial_rotary_factor).
    } else {
      j[k] = v;  // a moetune key (unknown ones are named by from_json)
    }
  }
  if (v4 && !j.contains("attention_type")) j["attention_type"] = "v4";  // transformers' V4 has no other
  if (in.contains("partial_rotary_factor") && !in.contains("qk_rope_head_dim") && in["partial_rotary_factor"].is_number()) {
    const double f = in["partial_rotary_factor"].get<double>();
    const int hd = in.contains("head_dim") && in["head_dim"].is_number_integer()
                       ? in["head_dim"].get<int>()
                       : (in.value("hidden_size", 0) / std::max(1, in.value("num_attention_heads", 1)));
    j["qk_rope_head_dim"] = int(std::lround(f * hd));
  }
  if (hash_from_types) {
    if (j.contains("num_hash_layers") && j["num_hash_layers"] != *hash_from_types)
      bad("num_hash_layers", "is " + j["num_hash_layers"].dump() + " but mlp_layer_types lists " +
                                 std::to_string(*hash_from_types) + " hash_moe layers");
    j["num_hash_layers"] = *hash_from_types;
  }
  return ModelConfig::from_json(j, where);
}

ConvertReport convert_to_hf(const std::string& in_dir, const std::string& out_dir, uint64_t max_shard_bytes) {
  const ModelConfig cfg = load_checkpoint_config(in_dir);
  const ParamLayout layout = ParamLayout::build(cfg);
  std::vector<float> params;
  std::vector<std::vector<float>> bias;
  HashTables tables;
  load_model_weights<float>(in_dir, cfg, layout, params, bias, &tables);

  // Stack the routed experts layer by layer.
  const ExpertStacks st = expert_stacks(layout, cfg.E());
  std::map<std::string, std::vector<float>> gate_up, down;
  for (const auto& p : st.prefixes) {
    const auto [F, d] = st.dims.at(p);
    gate_up[p].assign(size_t(cfg.E()) * 2 * F * d, 0.0f);
    down[p].assign(size_t(cfg.E()) * d * F, 0.0f);
  }
  for (const auto& t : layout.tensors()) {
    const auto en = parse_expert_name(t.name);
    if (!en) continue;
    const auto [F, d] = st.dims.at(en->prefix);
    const float* src = params.data() + t.offset;
    float* dst = en->proj == 2 ? down[en->prefix].data() + size_t(en->expert) * d * F
                               : gate_up[en->prefix].data() + (size_t(en->expert) * 2 + en->proj) * F * d;
    std::copy_n(src, t.numel, dst);
  }
  std::vector<std::vector<int64_t>> wide(tables.size());
  for (size_t j = 0; j < tables.size(); ++j) wide[j].assign(tables[j].begin(), tables[j].end());

  // Layout order; a layer's two stacks where its expert 0 was; bias / table after the router.
  std::vector<TensorToWrite> out;
  for (const auto& t : layout.tensors()) {
    const auto en = parse_expert_name(t.name);
    if (en) {
      if (en->expert != 0 || en->proj != 0) continue;
      const auto [F, d] = st.dims.at(en->prefix);
      out.push_back(to_write<float>(gate_up_name(en->prefix), {cfg.E(), 2 * F, d}, gate_up[en->prefix].data()));
      out.push_back(to_write<float>(down_name(en->prefix), {cfg.E(), d, F}, down[en->prefix].data()));
      continue;
    }
    out.push_back(to_write<float>(t.name, t.shape, params.data() + t.offset));
    for (int j = 0; j < cfg.num_moe_layers(); ++j) {
      const int l = cfg.moe_layer(j);
      if (t.name != ParamLayout::layer(l, "mlp.gate.weight")) continue;
      if (cfg.is_hash_moe_layer(j))
        out.push_back(to_write<int64_t>(ParamLayout::tid2eid_name(l), {cfg.vocab_size, cfg.K()}, wide[j].data()));
      else
        out.push_back(to_write<float>(ParamLayout::bias_name(l), {cfg.E()}, bias[j].data()));
    }
  }

  ConvertReport rep;
  rep.model_type = is_v4(cfg) ? "deepseek_v4" : "deepseek_v3";
  rep.tensors = int64_t(out.size());
  rep.parameters = int64_t(layout.total());
  const std::string config_text = hf_config_json(cfg).dump(2) + "\n";
  replace_dir_atomically(out_dir, "converting to the Hugging Face form", [&](const std::string& tmp) {
    fsutil::write_file_atomic(join(tmp, "config.json"), config_text);
    write_tensor_set(tmp, "model", out, {{"format", "pt"}}, max_shard_bytes);
    copy_tokenizer(in_dir, tmp);
  });
  if (cfg.v4_attention() && cfg.sliding_window == 0)
    rep.notes.push_back("sliding_window is 0 (every earlier key): transformers' DeepseekV4 always applies a window; "
                        "give it sliding_window = max_position_embeddings for the same attention");
  if (!cfg.v4_attention())
    rep.notes.push_back(
        "attention is moetune's grouped-query attention (self_attn.{q,k,v,o}_proj), neither DeepSeek-V3's MLA nor "
        "DeepSeek-V4's: transformers' DeepSeek models do not load these attention tensors");
  if (is_v4(cfg)) {
    if (cfg.first_k_dense_replace > 0)
      rep.notes.push_back("first_k_dense_replace > 0: transformers' DeepseekV4 has no dense layers");
    if (!cfg.hc()) rep.notes.push_back("hc_mult 1: transformers' DeepseekV4 always has the mHC tensors");
    if (cfg.n_shared_experts != 1)
      rep.notes.push_back("n_shared_experts != 1: transformers' DeepseekV4 has exactly one shared expert");
  }
  return rep;
}

ConvertReport convert_from_hf(const std::string& in_dir, const std::string& out_dir) {
  const std::string cfg_path = join(in_dir, "config.json");
  const ModelConfig cfg = config_from_hf_json(read_json(cfg_path), cfg_path);
  const ParamLayout layout = ParamLayout::build(cfg);
  auto src = open_tensor_set(in_dir, "model");
  if (!src) throw Error(join(in_dir, "model.safetensors") + ": missing (no model.safetensors or index)");

  ConvertReport rep;
  rep.model_type = is_v4(cfg) ? "deepseek_v4" : "deepseek_v3";
  std::unordered_set<std::string> used;
  std::vector<float> params(layout.total(), 0.0f);
  const ExpertStacks st = expert_stacks(layout, cfg.E());
  std::map<std::string, std::vector<float>> gate_up, down;  // stacked form, read once per layer
  for (const auto& p : st.prefixes) {
    const bool stacked = src->has(gate_up_name(p)) || src->has(down_name(p));
    if (!stacked) continue;
    const auto [F, d] = st.dims.at(p);
    src->expect(gate_up_name(p), {cfg.E(), 2 * F, d});
    src->expect(down_name(p), {cfg.E(), d, F});
    gate_up[p].resize(size_t(cfg.E()) * 2 * F * d);
    down[p].resize(size_t(cfg.E()) * d * F);
    src->file_of(gate_up_name(p)).read(gate_up_name(p), gate_up[p].data(), gate_up[p].size());
    src->file_of(down_name(p)).read(down_name(p), down[p].data(), down[p].size());
    check_finite(src->file_of(gate_up_name(p)).path(), gate_up_name(p), gate_up[p].data(), gate_up[p].size());
    check_finite(src->file_of(down_name(p)).path(), down_name(p), down[p].data(), down[p].size());
    used.insert(gate_up_name(p));
    used.insert(down_name(p));
  }
  for (const auto& t : layout.tensors()) {
    float* dst = params.data() + t.offset;
    const auto en = parse_expert_name(t.name);
    if (en && gate_up.count(en->prefix)) {
      const auto [F, d] = st.dims.at(en->prefix);
      const float* from = en->proj == 2 ? down[en->prefix].data() + size_t(en->expert) * d * F
                                        : gate_up[en->prefix].data() + (size_t(en->expert) * 2 + en->proj) * F * d;
      std::copy_n(from, t.numel, dst);
      continue;
    }
    src->expect(t.name, t.shape);
    src->file_of(t.name).read(t.name, dst, t.numel);
    check_finite(src->file_of(t.name).path(), t.name, dst, t.numel);
    used.insert(t.name);
  }
  const int nm = cfg.num_moe_layers();
  std::vector<std::vector<float>> bias(nm);
  HashTables tables(cfg.num_hash_layers);
  for (int j = 0; j < nm; ++j) {
    const int l = cfg.moe_layer(j);
    if (cfg.is_hash_moe_layer(j)) {
      const std::string name = ParamLayout::tid2eid_name(l);
      src->expect(name, {cfg.vocab_size, cfg.K()});
      tables[j].resize(size_t(cfg.vocab_size) * cfg.K());
      src->file_of(name).read(name, tables[j].data(), tables[j].size());
      check_tid2eid(src->file_of(name).path(), name, tables[j], cfg);
      used.insert(name);
      continue;
    }
    bias[j].assign(cfg.E(), 0.0f);
    const std::string name = ParamLayout::bias_name(l);
    if (!src->has(name)) {
      if (cfg.noaux_tc()) src->expect(name, {cfg.E()});  // the Error naming it
      continue;
    }
    src->expect(name, {cfg.E()});
    src->file_of(name).read(name, bias[j].data(), bias[j].size());
    check_finite(src->file_of(name).path(), name, bias[j].data(), bias[j].size());
    used.insert(name);
  }
  int64_t skipped = 0;
  for (const auto& n : src->names) {
    if (used.count(n)) continue;
    // Buffers transformers may save that moetune recomputes; MTP weights of a model
    // converted without its MTP layer.
    if (n.ends_with("rotary_emb.inv_freq")) {
      ++skipped;
      continue;
    }
    if (n.rfind("mtp.", 0) == 0 || n.rfind("model.mtp.", 0) == 0) {
      ++skipped;
      continue;
    }
    throw Error(src->file_of(n).path() + ": unexpected tensor '" + n + "' (not part of this model configuration)");
  }
  if (skipped > 0)
    rep.notes.push_back("skipped " + std::to_string(skipped) +
                        " tensor(s) moetune does not use (rotary_emb.inv_freq buffers, mtp.* weights)");

  CheckpointWriteOptions wo;
  const std::string tok = join(in_dir, "tokenizer.json");
  if (fs::exists(tok)) wo.tokenizer_json = fsutil::read_file(tok);
  save_checkpoint<float>(out_dir, cfg, layout, params, bias, nullptr, nullptr, 0,
                         json{{"step", 0}, {"converted_from", in_dir}}, wo, &tables);
  rep.tensors = int64_t(src->names.size()) - skipped;
  rep.parameters = int64_t(layout.total());
  return rep;
}

}  // namespace moetune
