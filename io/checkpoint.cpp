// Saving and loading moetune checkpoint directories (see checkpoint.hpp and
// docs/checkpoint.md). Sharded and single-file tensor sets are read through one
// TensorSource, so every check (missing, wrong shape, unexpected tensor) is written once.
#include "io/checkpoint.hpp"

#include <unistd.h>

#include <charconv>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <set>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>

#include "io/fsutil.hpp"
#include "io/json_parse.hpp"
#include "io/safetensors.hpp"
#include "io/tensor_set.hpp"
#include "moe/error.hpp"
#include "optim/optimizer.hpp"

namespace moetune {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::string join(const std::string& dir, const std::string& file) { return (fs::path(dir) / file).string(); }

json read_json_file(const std::string& path) {
  try {
    return parse_json(fsutil::read_file(path));
  } catch (const JsonError& e) {
    throw Error(path + ": invalid JSON: " + e.what());
  }
}

// A checkpoint whose weights or moments hold NaN/Inf (a diverged run saved without a
// check, bit rot, a foreign writer) would train or decode garbage without a word; second
// moments must also be >= 0 (AdamW takes their square root). Names file, tensor, element.
template <class T>
void check_values(const SafetensorsReader& file, const std::string& name, const T* p, size_t n,
                  bool non_negative = false) {
  for (size_t i = 0; i < n; ++i) {
    if (std::isfinite(p[i]) && !(non_negative && p[i] < 0)) continue;
    char v[64];
    std::snprintf(v, sizeof v, "%g", double(p[i]));
    throw Error(file.path() + ": tensor '" + name + "' holds a " + (std::isfinite(p[i]) ? "negative" : "non-finite") +
                " value (" + v + ") at element " + std::to_string(i) +
                (std::isfinite(p[i]) ? " (a second moment is never negative)" : "") + "; refusing to load it");
  }
}

void check_bias(const ModelConfig& cfg, const std::vector<std::vector<float>>& bias) {
  if (bias.size() != static_cast<size_t>(cfg.num_moe_layers()))
    throw Error("save_checkpoint: bias has " + std::to_string(bias.size()) + " MoE layers, the config has " +
                std::to_string(cfg.num_moe_layers()));
  for (size_t j = 0; j < bias.size(); ++j) {
    const size_t want = cfg.is_hash_moe_layer(int(j)) ? 0 : static_cast<size_t>(cfg.E());
    if (bias[j].size() != want)
      throw Error("save_checkpoint: the bias row of MoE layer " + std::to_string(j) + " has " +
                  std::to_string(bias[j].size()) + " entries, expected " + std::to_string(want) +
                  (want ? " (E)" : " (a hash-routed layer has no bias)"));
  }
}

}  // namespace

void check_tid2eid(const std::string& where, const std::string& name, const std::vector<int32_t>& table,
                   const ModelConfig& cfg) {
  const int64_t V = cfg.vocab_size;
  const int K = cfg.K(), E = cfg.E();
  const auto bad = [&](const std::string& msg) { throw Error(where + ": tensor '" + name + "': " + msg); };
  if (int64_t(table.size()) != V * K)
    bad("has " + std::to_string(table.size()) + " entries, expected (vocab_size, num_experts_per_tok) = " +
        format_shape({V, K}));
  std::vector<int64_t> seen(E, -1);
  for (int64_t v = 0; v < V; ++v)
    for (int k = 0; k < K; ++k) {
      const int32_t e = table[v * K + k];
      if (e < 0 || e >= E)
        bad("row " + std::to_string(v) + " (token " + std::to_string(v) + ") holds expert " + std::to_string(e) +
            ", outside [0, n_routed_experts = " + std::to_string(E) + ")");
      if (seen[e] == v)
        bad("row " + std::to_string(v) + " (token " + std::to_string(v) + ") names expert " + std::to_string(e) +
            " twice; a token's K experts must be distinct");
      seen[e] = v;
    }
}

namespace {

// The hash tables handed to a save: one per hash-routed layer, each valid.
void check_tables(const std::string& dir, const ModelConfig& cfg, const HashTables* tid2eid) {
  if (cfg.num_hash_layers == 0) return;
  if (!tid2eid || tid2eid->size() != size_t(cfg.num_hash_layers))
    throw Error(dir + ": save_checkpoint: the configuration has num_hash_layers = " +
                std::to_string(cfg.num_hash_layers) + " but " +
                (tid2eid ? std::to_string(tid2eid->size()) : std::string("no")) + " tid2eid tables were given");
  for (int j = 0; j < cfg.num_hash_layers; ++j)
    check_tid2eid(dir + ": save_checkpoint", ParamLayout::tid2eid_name(cfg.moe_layer(j)),
                  (*tid2eid)[j], cfg);
}

}  // namespace

// ---------------------------------------------------------------------------------

template <class T>
void save_checkpoint(const std::string& dir_in, const ModelConfig& cfg, const ParamLayout& layout,
                     const std::vector<T>& params, const std::vector<std::vector<float>>& bias,
                     const std::vector<T>* exp_avg, const std::vector<T>* exp_avg_sq, int64_t optimizer_step,
                     const nlohmann::json& trainer_state, const CheckpointWriteOptions& opt,
                     const HashTables* tid2eid) {
  const std::string dir = clean_checkpoint_dir(dir_in);
  // Validate everything before touching the disk.
  if (params.size() != layout.total())
    throw Error(dir + ": save_checkpoint: params has " + std::to_string(params.size()) + " elements, layout needs " +
                std::to_string(layout.total()));
  check_bias(cfg, bias);
  check_tables(dir, cfg, tid2eid);
  if ((exp_avg == nullptr) != (exp_avg_sq == nullptr))
    throw Error(dir + ": save_checkpoint: give both exp_avg and exp_avg_sq, or neither");
  if (exp_avg && (exp_avg->size() != layout.total() || exp_avg_sq->size() != layout.total()))
    throw Error(dir + ": save_checkpoint: optimizer moments must have layout.total() = " +
                std::to_string(layout.total()) + " elements");
  if (!trainer_state.is_null() && !trainer_state.is_object())
    throw Error(dir + ": save_checkpoint: trainer_state must be a JSON object");
  std::string state_text, config_text;
  try {
    state_text = (trainer_state.is_null() ? json::object() : trainer_state).dump(2) + "\n";
    config_text = cfg.to_json().dump(2) + "\n";
  } catch (const json::exception& e) {
    throw Error(dir + ": trainer_state.json: cannot serialise: " + e.what());
  }

  replace_dir_atomically(dir, "saving the checkpoint", [&](const std::string& tmp) {
    fsutil::write_file_atomic(join(tmp, "config.json"), config_text);

    // Model: layout order, each MoE layer's bias (or hash table) right after its router weight.
    std::vector<TensorToWrite> model;
    for (const auto& t : layout.tensors()) {
      model.push_back(to_write(t.name, t.shape, params.data() + t.offset));
      for (int j = 0; j < cfg.num_moe_layers(); ++j) {
        const int l = cfg.moe_layer(j);
        if (t.name != ParamLayout::layer(l, "mlp.gate.weight")) continue;
        if (cfg.is_hash_moe_layer(j))
          model.push_back(to_write<int32_t>(ParamLayout::tid2eid_name(l), {cfg.vocab_size, cfg.K()},
                                            (*tid2eid)[j].data()));
        else
          model.push_back(to_write<float>(ParamLayout::bias_name(l), {cfg.E()}, bias[j].data()));
      }
    }
    write_tensor_set(tmp, "model", model, {{"format", "pt"}}, opt.max_shard_bytes);

    if (exp_avg) {
      std::vector<TensorToWrite> moments;
      for (const auto& t : layout.tensors())
        for (const auto& st : optimizer_state_names(opt.optimizer, t))
          moments.push_back(
              to_write(t.name + st.suffix, t.shape, (st.slot == 0 ? exp_avg : exp_avg_sq)->data() + t.offset));
      write_tensor_set(tmp, "optimizer", moments,
                       {{"format", "pt"}, {"step", std::to_string(optimizer_step)}, {"optimizer", opt.optimizer}},
                       opt.max_shard_bytes);
    }
    fsutil::write_file_atomic(join(tmp, "trainer_state.json"), state_text);
    if (!opt.tokenizer_json.empty()) fsutil::write_file_atomic(join(tmp, "tokenizer.json"), opt.tokenizer_json);
  });
}

ModelConfig load_checkpoint_config(const std::string& dir) {
  const std::string path = join(clean_checkpoint_dir(dir), "config.json");
  if (!fs::exists(path)) throw Error(path + ": missing (is '" + dir + "' a moetune checkpoint?)");
  return ModelConfig::from_file(path);
}

template <class T>
void load_model_weights(const std::string& dir_in, const ModelConfig& cfg, const ParamLayout& layout,
                        std::vector<T>& params, std::vector<std::vector<float>>& bias, HashTables* tid2eid) {
  const std::string dir = clean_checkpoint_dir(dir_in);
  if (cfg.num_hash_layers > 0 && !tid2eid)
    throw Error(dir + ": load_model_weights: the configuration has num_hash_layers = " +
                std::to_string(cfg.num_hash_layers) + ": give the tid2eid tables to fill");
  auto src = open_tensor_set(dir, "model");
  if (!src) throw Error(join(dir, "model.safetensors") + ": missing (no model.safetensors or index)");

  // Check names and shapes of everything before reading a byte. A layout with an
  // expert range (one expert-parallel rank) reads its share; the file must still hold
  // exactly the full model.
  std::unordered_set<std::string> expected;
  const ParamLayout full = ParamLayout::build(cfg);
  for (const auto& t : full.tensors()) {
    src->expect(t.name, t.shape);
    expected.insert(t.name);
  }
  const int nm = cfg.num_moe_layers();
  std::vector<bool> has_bias(nm, false);
  for (int j = 0; j < nm; ++j) {
    const int l = cfg.moe_layer(j);
    if (cfg.is_hash_moe_layer(j)) {  // a table, no bias (a bias there is an unexpected tensor)
      const std::string name = ParamLayout::tid2eid_name(l);
      expected.insert(name);
      const SafeTensorInfo& t = src->expect(name, {cfg.vocab_size, cfg.K()});
      if (t.dtype != "I32")
        throw Error(src->file_of(name).path() + ": tensor '" + name + "' has dtype " + t.dtype +
                    "; the hash-routing table must be I32");
      continue;
    }
    const std::string name = ParamLayout::bias_name(l);
    expected.insert(name);
    has_bias[j] = cfg.noaux_tc() || src->where.count(name);
    if (has_bias[j]) src->expect(name, {cfg.E()});
  }
  src->reject_unexpected(expected);

  params.assign(layout.total(), T(0));
  for (const auto& t : layout.tensors()) {
    src->file_of(t.name).read(t.name, params.data() + t.offset, t.numel);
    check_values(src->file_of(t.name), t.name, params.data() + t.offset, t.numel);
  }
  bias.assign(nm, std::vector<float>(cfg.E(), 0.0f));
  if (tid2eid) tid2eid->assign(cfg.num_hash_layers, {});
  for (int j = 0; j < cfg.num_hash_layers; ++j) {
    const std::string name = ParamLayout::tid2eid_name(cfg.moe_layer(j));
    auto& table = (*tid2eid)[j];
    table.resize(size_t(cfg.vocab_size) * cfg.K());
    src->file_of(name).read(name, table.data(), table.size());
    check_tid2eid(src->file_of(name).path(), name, table, cfg);
    bias[j].clear();
  }
  for (int j = 0; j < nm; ++j) {
    if (!has_bias[j]) continue;
    const std::string name = ParamLayout::bias_name(cfg.moe_layer(j));
    src->file_of(name).read(name, bias[j].data(), bias[j].size());
    check_values(src->file_of(name), name, bias[j].data(), bias[j].size());
  }
}

template <class T>
bool load_optimizer_state(const std::string& dir_in, const ParamLayout& layout, std::vector<T>& exp_avg,
                          std::vector<T>& exp_avg_sq, int64_t& step, const std::string& optimizer) {
  const std::string dir = clean_checkpoint_dir(dir_in);
  auto src = open_tensor_set(dir, "optimizer");
  if (!src) return false;
  // The optimizer first: another optimizer's state has other tensor names, and "tensor
  // missing" would not say why.
  for (const auto& f : src->files) {
    auto it = f.metadata().find("optimizer");
    const std::string written = it == f.metadata().end() ? "adamw" : it->second;
    if (written != optimizer)
      throw Error(f.path() + ": the optimizer state was written by optim.name = \"" + written +
                  "\", but this run has key 'optim.name' = \"" + optimizer +
                  "\"; the optimizer cannot change on resume (set optim.name = \"" + written +
                  "\", or start from the weights alone with --init-from)");
  }
  std::unordered_set<std::string> expected;
  for (const auto& t : layout.tensors())
    for (const auto& st : optimizer_state_names(optimizer, t)) {
      src->expect(t.name + st.suffix, t.shape);
      expected.insert(t.name + st.suffix);
    }
  // State of experts outside this layout's expert range belongs to other ranks.
  std::unordered_set<std::string> others;
  for (const auto& n : src->names)
    if (!expected.count(n) && ParamLayout::is_expert_tensor(n) && !layout.contains(n.substr(0, n.rfind('.'))))
      others.insert(n);
  expected.insert(others.begin(), others.end());
  src->reject_unexpected(expected);
  for (const auto& f : src->files) {
    auto it = f.metadata().find("step");
    int64_t s = 0;
    const char* b = it == f.metadata().end() ? nullptr : it->second.data();
    const char* e = b ? b + it->second.size() : nullptr;
    auto r = b ? std::from_chars(b, e, s) : std::from_chars_result{nullptr, std::errc::invalid_argument};
    if (!b || r.ec != std::errc() || r.ptr != e || s < 0)
      throw Error(f.path() + ": __metadata__ needs \"step\" as a non-negative integer string");
    if (&f != &src->files.front() && s != step)
      throw Error(f.path() + ": step " + std::to_string(s) + " differs from the other shards' " + std::to_string(step));
    step = s;
  }
  exp_avg.assign(layout.total(), T(0));
  exp_avg_sq.assign(layout.total(), T(0));
  for (const auto& t : layout.tensors())
    for (const auto& st : optimizer_state_names(optimizer, t)) {
      const std::string name = t.name + st.suffix;
      T* out = (st.slot == 0 ? exp_avg : exp_avg_sq).data() + t.offset;
      src->file_of(name).read(name, out, t.numel);
      check_values(src->file_of(name), name, out, t.numel, st.slot == 1);  // a second moment is >= 0
    }
  return true;
}

nlohmann::json load_trainer_state(const std::string& dir) {
  const std::string path = join(clean_checkpoint_dir(dir), "trainer_state.json");
  if (!fs::exists(path)) return json::object();
  json j = read_json_file(path);
  if (!j.is_object()) throw Error(path + ": expected a JSON object");
  return j;
}

namespace {
const json& trainer_state_field(const json& state, const std::string& dir, const std::string& key) {
  const std::string path = join(clean_checkpoint_dir(dir), "trainer_state.json");
  const json* v = &state;
  std::string at;
  for (size_t b = 0; b <= key.size();) {
    const size_t e = std::min(key.find('.', b), key.size());
    const std::string part = key.substr(b, e - b);
    if (!v->is_object())
      throw Error(path + ": key '" + at + "': expected a JSON object, got " + std::string(v->type_name()) + " " +
                  v->dump().substr(0, 80));
    at += (at.empty() ? "" : ".") + part;
    if (!v->contains(part)) throw Error(path + ": key '" + at + "': missing");
    v = &(*v)[part];
    b = e + 1;
  }
  return *v;
}
}  // namespace

int64_t trainer_state_count(const json& state, const std::string& dir, const std::string& key) {
  const json& v = trainer_state_field(state, dir, key);
  if (!v.is_number_integer() || (!v.is_number_unsigned() && v.get<int64_t>() < 0) ||
      (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX)))
    throw Error(join(clean_checkpoint_dir(dir), "trainer_state.json") + ": key '" + key +
                "': expected a non-negative integer, got " + v.dump().substr(0, 80));
  return v.get<int64_t>();
}

std::string trainer_state_string(const json& state, const std::string& dir, const std::string& key) {
  const json& v = trainer_state_field(state, dir, key);
  if (!v.is_string())
    throw Error(join(clean_checkpoint_dir(dir), "trainer_state.json") + ": key '" + key + "': expected a string, got " +
                v.dump().substr(0, 80));
  return v.get<std::string>();
}

#define MOETUNE_INSTANTIATE(T)                                                                                    \
  template void save_checkpoint<T>(const std::string&, const ModelConfig&, const ParamLayout&,                  \
                                   const std::vector<T>&, const std::vector<std::vector<float>>&,               \
                                   const std::vector<T>*, const std::vector<T>*, int64_t, const nlohmann::json&, \
                                   const CheckpointWriteOptions&, const HashTables*);                            \
  template void load_model_weights<T>(const std::string&, const ModelConfig&, const ParamLayout&,               \
                                      std::vector<T>&, std::vector<std::vector<float>>&, HashTables*);          \
  template bool load_optimizer_state<T>(const std::string&, const ParamLayout&, std::vector<T>&,                \
                                        std::vector<T>&, int64_t&, const std::string&);
MOETUNE_INSTANTIATE(float)
MOETUNE_INSTANTIATE(double)
#undef MOETUNE_INSTANTIATE

}  // namespace moetune
