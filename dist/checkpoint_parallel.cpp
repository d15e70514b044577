#include "dist/checkpoint_parallel.hpp"

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <type_traits>

#include "dist/collective.hpp"
#include "dist/fault.hpp"
#include "io/fsutil.hpp"
#include "io/manifest.hpp"
#include "io/safetensors.hpp"
#include "moe/error.hpp"
#include "optim/optimizer.hpp"

namespace moetune::dist {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::string shard_name(const char* stem, int k, int n) {
  if (n == 1) return std::string(stem) + ".safetensors";
  char buf[128];
  std::snprintf(buf, sizeof buf, "%s-%05d-of-%05d.safetensors", stem, k + 1, n);
  return buf;
}

// Shard (0-based) of a tensor: 0 = every dense tensor and the routing biases,
// 1 + e = routed expert e of every layer. Independent of the layout that writes it.
int shard_of(const std::string& name) {
  if (!ParamLayout::is_expert_tensor(name)) return 0;
  const auto p = name.find(".mlp.experts.") + 13;
  return 1 + std::stoi(name.substr(p));
}

}  // namespace

template <class T>
void save_checkpoint_parallel(const std::string& dir_in, const ProcessGrid& g, const ModelConfig& cfg,
                              const ParamLayout& layout, const std::vector<T>& params,
                              const std::vector<std::vector<float>>& bias, const std::vector<T>* exp_avg,
                              const std::vector<T>* exp_avg_sq, int64_t optimizer_step, const json& state,
                              const std::string& tokenizer_json, const HashTables* tid2eid,
                              const std::string& optimizer) {
  std::string dir = dir_in;
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  // Every rank holds the same tables (same seed or the same checkpoint); rank 0 writes them.
  if (cfg.num_hash_layers > 0) {
    if (!tid2eid || tid2eid->size() != size_t(cfg.num_hash_layers))
      throw Error(dir + ": save_checkpoint_parallel: the configuration has num_hash_layers = " +
                  std::to_string(cfg.num_hash_layers) + " but the tid2eid tables were not given");
    for (int j = 0; j < cfg.num_hash_layers; ++j)
      check_tid2eid(dir + ": save_checkpoint_parallel", ParamLayout::tid2eid_name(cfg.moe_layer(j)),
                    (*tid2eid)[j], cfg);
  }
  // One temporary name for all ranks: rank 0's pid.
  int64_t pid = ::getpid();
  g.world.broadcast(std::span<int64_t>(&pid, 1), 0);
  const std::string tmp = dir + ".tmp-" + std::to_string(pid), old = dir + ".old-" + std::to_string(pid);
  std::error_code ec;
  std::string error;
  if (g.world_rank == 0) {
    try {
      if (fs::exists(fs::symlink_status(dir)) && !fs::exists(fs::path(dir) / "config.json") && !fs::is_empty(dir))
        throw Error(dir + ": exists and is not a moetune checkpoint (no config.json); refusing to replace it");
      fs::create_directories(fs::path(dir).parent_path().empty() ? fs::path(".") : fs::path(dir).parent_path());
      fs::remove_all(tmp);
      fs::create_directory(tmp);
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  auto verdict = [&](const char* what) {
    if (g.world.all_true(error.empty())) return;
    if (g.world_rank == 0) fs::remove_all(tmp, ec);
    // One message (the lowest failing rank's) on every rank: the CLI prints it once and
    // every rank exits 1, nobody is left waiting in a collective.
    throw_first_error(g.world,
                      error.empty() ? "" : dir + ": saving the checkpoint failed (" + what + "): " + error);
  };
  verdict("creating the temporary directory");

  // Shard writers: the ranks of EP group 0; world rank 0 writes shard 0 (dense), the
  // owner of expert e writes shard 1 + e.
  const int n = cfg.E() + 1;
  if (g.ep_group == 0) {
    try {
      for (int k = 0; k < n; ++k) {
        const bool mine = k == 0 ? g.world_rank == 0 : (k - 1 >= layout.expert_begin() && k - 1 < layout.expert_end());
        if (!mine) continue;
        std::vector<TensorToWrite> model, moments;
        for (const auto& t : layout.tensors()) {
          if (shard_of(t.name) != k) continue;
          model.push_back(to_write(t.name, t.shape, params.data() + t.offset));
          if (exp_avg)
            for (const auto& st : optimizer_state_names(optimizer, t))
              moments.push_back(
                  to_write(t.name + st.suffix, t.shape, (st.slot == 0 ? exp_avg : exp_avg_sq)->data() + t.offset));
          for (int j = 0; j < cfg.num_moe_layers() && k == 0; ++j) {
            const int l = cfg.moe_layer(j);
            if (t.name != ParamLayout::layer(l, "mlp.gate.weight")) continue;
            if (cfg.is_hash_moe_layer(j))
              model.push_back(to_write<int32_t>(ParamLayout::tid2eid_name(l), {cfg.vocab_size, cfg.K()},
                                                (*tid2eid)[j].data()));
            else
              model.push_back(to_write<float>(ParamLayout::bias_name(l), {cfg.E()}, bias[j].data()));
          }
        }
        write_safetensors((fs::path(tmp) / shard_name("model", k, n)).string(), model, {{"format", "pt"}});
        if (exp_avg)
          write_safetensors((fs::path(tmp) / shard_name("optimizer", k, n)).string(), moments,
                            {{"format", "pt"}, {"step", std::to_string(optimizer_step)}, {"optimizer", optimizer}});
      }
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  maybe_inject_fault("in-save", state.value("step", int64_t(-1)), g.world_rank);
  verdict("writing the shards");

  if (g.world_rank == 0) {
    try {
      fsutil::write_file_atomic((fs::path(tmp) / "config.json").string(), cfg.to_json().dump(2) + "\n");
      {
        const ParamLayout full = ParamLayout::build(cfg);
        json mi = {{"metadata", {{"format", "pt"}}}, {"weight_map", json::object()}};
        json oi = {{"metadata", {{"format", "pt"}, {"step", std::to_string(optimizer_step)}, {"optimizer", optimizer}}},
                   {"weight_map", json::object()}};
        for (const auto& t : full.tensors()) {
          mi["weight_map"][t.name] = shard_name("model", shard_of(t.name), n);
          const std::string of = shard_name("optimizer", shard_of(t.name), n);
          for (const auto& st : optimizer_state_names(optimizer, t)) oi["weight_map"][t.name + st.suffix] = of;
        }
        for (int j = 0; j < cfg.num_moe_layers(); ++j) {
          const int l = cfg.moe_layer(j);
          mi["weight_map"][cfg.is_hash_moe_layer(j) ? ParamLayout::tid2eid_name(l) : ParamLayout::bias_name(l)] =
              shard_name("model", 0, n);
        }
        fsutil::write_file_atomic((fs::path(tmp) / "model.safetensors.index.json").string(), mi.dump(2) + "\n");
        if (exp_avg)
          fsutil::write_file_atomic((fs::path(tmp) / "optimizer.safetensors.index.json").string(), oi.dump(2) + "\n");
      }
      fsutil::write_file_atomic((fs::path(tmp) / "trainer_state.json").string(), state.dump(2) + "\n");
      if (!tokenizer_json.empty())
        fsutil::write_file_atomic((fs::path(tmp) / "tokenizer.json").string(), tokenizer_json);
      write_manifest(tmp);  // last: a checkpoint with a valid manifest is complete
      fsutil::fsync_dir(tmp);
      const bool replacing = fs::exists(fs::symlink_status(dir));
      if (replacing) {
        fs::remove_all(old);
        fs::rename(dir, old);
      }
      fs::rename(tmp, dir);
      fsutil::fsync_dir(fs::path(dir).parent_path().empty() ? "." : fs::path(dir).parent_path().string());
      if (replacing) fs::remove_all(old, ec);
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  verdict("finishing the checkpoint");
}

template void save_checkpoint_parallel<float>(const std::string&, const ProcessGrid&, const ModelConfig&,
                                              const ParamLayout&, const std::vector<float>&,
                                              const std::vector<std::vector<float>>&, const std::vector<float>*,
                                              const std::vector<float>*, int64_t, const json&, const std::string&,
                                              const HashTables*, const std::string&);
template void save_checkpoint_parallel<double>(const std::string&, const ProcessGrid&, const ModelConfig&,
                                               const ParamLayout&, const std::vector<double>&,
                                               const std::vector<std::vector<float>>&, const std::vector<double>*,
                                               const std::vector<double>*, int64_t, const json&, const std::string&,
                                               const HashTables*, const std::string&);

}  // namespace moetune::dist
