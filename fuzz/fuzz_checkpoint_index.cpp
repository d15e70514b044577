// Fuzzes the sharded-checkpoint index (model.safetensors.index.json and
// optimizer.safetensors.index.json, read by io/checkpoint.cpp open_tensor_set): a tiny
// model is saved once per process in shards of at most 512 bytes; the input replaces
// both index files, then load_model_weights and load_optimizer_state read the directory.
// MOETUNE_FUZZ_WRITE_SEEDS=<dir> copies the genuine index files there (seed corpus).
#include <cstdlib>
#include <filesystem>

#include "fuzz/fuzz_util.hpp"
#include "io/checkpoint.hpp"
#include "io/fsutil.hpp"
#include "moe/params.hpp"

using namespace moetune;

namespace {

ModelConfig tiny() {
  return ModelConfig::from_json({{"vocab_size", 16},
                                 {"hidden_size", 8},
                                 {"num_hidden_layers", 2},
                                 {"num_attention_heads", 2},
                                 {"num_key_value_heads", 1},
                                 {"max_position_embeddings", 16},
                                 {"first_k_dense_replace", 1},
                                 {"intermediate_size", 16},
                                 {"n_routed_experts", 4},
                                 {"num_experts_per_tok", 2},
                                 {"moe_intermediate_size", 4},
                                 {"n_shared_experts", 1}});
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const ModelConfig cfg = tiny();
  static const ParamLayout layout = ParamLayout::build(cfg);
  static const std::string dir = [] {
    const std::string d = fuzz::scratch_dir() + "/ckpt";
    std::vector<float> p(layout.total()), m(layout.total(), 0.5f), v(layout.total(), 0.25f);
    for (size_t i = 0; i < p.size(); ++i) p[i] = float(i % 7) * 0.125f;
    const std::vector<std::vector<float>> bias(size_t(cfg.num_moe_layers()), std::vector<float>(size_t(cfg.E()), 0.f));
    CheckpointWriteOptions opt;
    opt.max_shard_bytes = 512;
    save_checkpoint<float>(d, cfg, layout, p, bias, &m, &v, 3, nlohmann::json::object(), opt);
    if (const char* seeds = std::getenv("MOETUNE_FUZZ_WRITE_SEEDS")) {
      std::filesystem::create_directories(seeds);
      for (const char* f : {"model.safetensors.index.json", "optimizer.safetensors.index.json"})
        std::filesystem::copy_file(d + "/" + f, std::string(seeds) + "/" + f,
                                   std::filesystem::copy_options::overwrite_existing);
    }
    return d;
  }();
  fuzz::write_input("ckpt/model.safetensors.index.json", data, size);
  fuzz::write_input("ckpt/optimizer.safetensors.index.json", data, size);
  std::vector<float> params, m, v;
  std::vector<std::vector<float>> bias;
  int64_t step = 0;
  fuzz::parse_or_reject([&] { load_model_weights<float>(dir, cfg, layout, params, bias); });
  fuzz::parse_or_reject([&] { (void)load_optimizer_state<float>(dir, layout, m, v, step); });
  return 0;
}
