// Checkpoint directories: float/double/sharded round trips, the names and bytes on
// disk, loading checks (missing / wrong shape / unexpected tensors, bad config), and
// that a failed save never destroys the checkpoint already there.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <regex>
#include <set>

#include "io/checkpoint.hpp"
#include "io/safetensors.hpp"
#include "moe/error.hpp"
#include "test_util.hpp"

using namespace moetune;
using namespace moetune::testing;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

// 3 layers: layer 0 dense, layers 1-2 MoE (E = 4, K = 2), one shared expert.
json small_config_json() {
  return {{"vocab_size", 32},          {"hidden_size", 16},          {"num_hidden_layers", 3},
          {"num_attention_heads", 2},  {"first_k_dense_replace", 1}, {"intermediate_size", 32},
          {"n_routed_experts", 4},     {"num_experts_per_tok", 2},   {"moe_intermediate_size", 8},
          {"n_shared_experts", 1},     {"max_position_embeddings", 64}};
}
ModelConfig small_config() { return ModelConfig::from_json(small_config_json(), "test"); }

// Distinct values in every tensor element, `pad` in the alignment padding.
template <class T>
std::vector<T> fill(const ParamLayout& layout, double seed, T pad) {
  std::vector<T> p(layout.total(), pad);
  for (const auto& t : layout.tensors())
    for (size_t i = 0; i < t.numel; ++i)
      p[t.offset + i] = static_cast<T>(std::sin(seed + 0.37 * double(t.offset + i)) / 3.0);
  return p;
}

std::vector<std::vector<float>> fill_bias(const ModelConfig& cfg, float seed) {
  std::vector<std::vector<float>> b(cfg.num_moe_layers(), std::vector<float>(cfg.E()));
  for (size_t j = 0; j < b.size(); ++j)
    for (size_t e = 0; e < b[j].size(); ++e) b[j][e] = seed + 0.001f * float(10 * j + e);
  return b;
}


class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::random_device rd;
    root_ = fs::temp_directory_path() /
            ("moetune_test_ckpt_" + std::to_string(::getpid()) + "_" + std::to_string(rd()));
    fs::create_directories(root_);
  }
  void TearDown() override { fs::remove_all(root_); }
  std::string path(const std::string& name) const { return (root_ / name).string(); }
  // Entries of root_ other than the given ones (leftover temporaries).
  std::vector<std::string> others(const std::vector<std::string>& keep) const {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(root_)) {
      const std::string n = e.path().filename().string();
      if (std::find(keep.begin(), keep.end(), n) == keep.end()) out.push_back(n);
    }
    return out;
  }

  ModelConfig cfg_ = small_config();
  ParamLayout layout_ = ParamLayout::build(cfg_);
  fs::path root_;
};

// Saves a float checkpoint with optimizer state and returns what was saved.
struct Saved {
  std::vector<float> params, m, v;
  std::vector<std::vector<float>> bias;
  json state;
};
Saved save_float(const std::string& dir, const ModelConfig& cfg, const ParamLayout& layout, double seed,
                 const CheckpointWriteOptions& opt = {}) {
  Saved s;
  s.params = fill<float>(layout, seed, 0.0f);
  s.m = fill<float>(layout, seed + 1, 0.0f);
  s.v = fill<float>(layout, seed + 2, 0.0f);
  for (auto& x : s.v) x = x * x;
  s.bias = fill_bias(cfg, float(seed));
  s.state = {{"step", 17}, {"data", {{"epoch", 1}, {"position", 4096}}}, {"rng", "abc"}};
  save_checkpoint<float>(dir, cfg, layout, s.params, s.bias, &s.m, &s.v, 17, s.state, opt);
  return s;
}

}  // namespace

// mHC and MTP (MODEL.md section 12): their tensors (attn_hc / ffn_hc / hc_head, and the
// mtp.0.* block with its routing bias) round-trip under their Hugging Face names.
TEST_F(CheckpointTest, RoundTripHyperConnectionsAndMtp) {
  json j = small_config_json();
  j["hc_mult"] = 2;
  j["num_nextn_predict_layers"] = 1;
  const ModelConfig cfg = ModelConfig::from_json(j, "test");
  const ParamLayout layout = ParamLayout::build(cfg);
  for (const char* name : {"model.layers.0.attn_hc.fn", "model.layers.0.ffn_hc.scale", "model.hc_head.hc_fn",
                           "mtp.0.enorm.weight", "mtp.0.hnorm.weight", "mtp.0.e_proj.weight", "mtp.0.h_proj.weight",
                           "mtp.0.self_attn.q_proj.weight", "mtp.0.mlp.experts.0.up_proj.weight",
                           "mtp.0.attn_hc.base", "mtp.0.hc_head.hc_scale", "mtp.0.norm.weight"})
    EXPECT_TRUE(layout.contains(name)) << name;
  const std::string dir = path("ckpt");
  const Saved s = save_float(dir, cfg, layout, 0.25);
  const ModelConfig c = load_checkpoint_config(dir);
  EXPECT_EQ(c.to_json(), cfg.to_json());
  EXPECT_EQ(c.num_moe_layers(), cfg.num_moe_layers());
  std::vector<float> p;
  std::vector<std::vector<float>> bias;
  load_model_weights<float>(dir, c, layout, p, bias);
  EXPECT_EQ(p, s.params);
  EXPECT_EQ(bias, s.bias);  // the MTP block's bias is the last row
  SafetensorsReader r(dir + "/model.safetensors");
  EXPECT_TRUE(r.contains("mtp.0.mlp.gate.e_score_correction_bias"));
}

TEST_F(CheckpointTest, RoundTripFloat) {
  const std::string dir = path("ckpt");
  const Saved s = save_float(dir, cfg_, layout_, 0.5);
  for (const char* f : {"config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json"})
    EXPECT_TRUE(fs::exists(fs::path(dir) / f)) << f;
  EXPECT_FALSE(fs::exists(fs::path(dir) / "model.safetensors.index.json"));
  EXPECT_TRUE(others({"ckpt"}).empty());  // no temporaries left behind

  const ModelConfig c = load_checkpoint_config(dir);
  EXPECT_EQ(c.to_json(), cfg_.to_json());
  std::vector<float> p(3, 9.0f);
  std::vector<std::vector<float>> bias;
  load_model_weights<float>(dir, c, layout_, p, bias);
  EXPECT_EQ(p, s.params);
  EXPECT_EQ(bias, s.bias);
  std::vector<float> m, v;
  int64_t step = -1;
  ASSERT_TRUE(load_optimizer_state<float>(dir, layout_, m, v, step));
  EXPECT_EQ(m, s.m);
  EXPECT_EQ(v, s.v);
  EXPECT_EQ(step, 17);
  EXPECT_EQ(load_trainer_state(dir), s.state);
}

TEST_F(CheckpointTest, RoundTripDoubleIsFloatRounded) {
  const std::string dir = path("ckpt_d/");  // a trailing slash is fine
  const auto params = fill<double>(layout_, 1.25, 7.0);  // 7 in the padding must not survive
  const auto m = fill<double>(layout_, 2.0, 0.0);
  auto v = fill<double>(layout_, 3.0, 0.0);
  for (auto& x : v) x = x * x;  // a second moment is never negative (loading refuses it)
  const auto bias = fill_bias(cfg_, -0.5f);
  save_checkpoint<double>(dir, cfg_, layout_, params, bias, &m, &v, 5, json::object());
  std::vector<double> p, m2, v2;
  std::vector<std::vector<float>> b2;
  load_model_weights<double>(dir, cfg_, layout_, p, b2);
  ASSERT_EQ(p.size(), layout_.total());
  std::vector<bool> inside(layout_.total(), false);
  size_t rounded = 0;
  for (const auto& t : layout_.tensors())
    for (size_t i = t.offset; i < t.offset + t.numel; ++i) {
      inside[i] = true;
      ASSERT_EQ(p[i], double(float(params[i]))) << t.name << " " << i - t.offset;
      rounded += p[i] != params[i];
    }
  EXPECT_GT(rounded, 0u);  // the values did go through F32
  for (size_t i = 0; i < p.size(); ++i)
    if (!inside[i]) {
      ASSERT_EQ(p[i], 0.0) << "padding element " << i;
    }
  EXPECT_LT(layout_.tensors().back().offset + layout_.tensors().back().numel + 1, layout_.total() + 16);
  EXPECT_EQ(b2, bias);
  int64_t step = 0;
  ASSERT_TRUE(load_optimizer_state<double>(dir, layout_, m2, v2, step));
  EXPECT_EQ(step, 5);
  for (size_t i = 0; i < m.size(); ++i) {
    ASSERT_EQ(m2[i], double(float(m[i])));
    ASSERT_EQ(v2[i], double(float(v[i])));
  }
  SafetensorsReader r(dir + "model.safetensors");
  for (const auto& t : r.tensors()) EXPECT_EQ(t.dtype, "F32") << t.name;
}

TEST_F(CheckpointTest, ShardedRoundTripMatchesSingleFile) {
  const std::string one = path("one"), many = path("many");
  const Saved s = save_float(one, cfg_, layout_, 0.75);
  CheckpointWriteOptions opt;
  opt.max_shard_bytes = 8192;
  save_float(many, cfg_, layout_, 0.75, opt);

  EXPECT_FALSE(fs::exists(fs::path(many) / "model.safetensors"));
  std::ifstream in(fs::path(many) / "model.safetensors.index.json");
  const json index = json::parse(in);
  const json& wm = index["weight_map"];
  std::set<std::string> shards;
  uint64_t total = 0;
  for (auto it = wm.begin(); it != wm.end(); ++it) shards.insert(it.value().get<std::string>());
  ASSERT_GE(shards.size(), 3u);
  const std::regex pattern("model-(\\d{5})-of-(\\d{5})\\.safetensors");
  for (const auto& f : shards) {
    std::smatch mm;
    ASSERT_TRUE(std::regex_match(f, mm, pattern)) << f;
    EXPECT_EQ(std::stoul(mm[2]), shards.size());
    SafetensorsReader r((fs::path(many) / f).string());
    uint64_t bytes = 0;
    for (const auto& t : r.tensors()) {
      EXPECT_EQ(wm[t.name], f);
      bytes += t.end - t.begin;
    }
    total += bytes;
    // Only a shard holding one oversized tensor may exceed the limit.
    if (r.tensors().size() > 1) {
      EXPECT_LE(bytes, opt.max_shard_bytes) << f;
    }
  }
  EXPECT_EQ(index["metadata"]["total_size"].get<uint64_t>(), total);
  EXPECT_EQ(wm.size(), layout_.tensors().size() + size_t(cfg_.num_moe_layers()));
  EXPECT_TRUE(wm.contains(ParamLayout::bias_name(2)));
  EXPECT_TRUE(fs::exists(fs::path(many) / "optimizer.safetensors.index.json"));
  EXPECT_FALSE(fs::exists(fs::path(many) / "optimizer.safetensors"));

  std::vector<float> p1, p2, m1, m2, v1, v2;
  std::vector<std::vector<float>> b1, b2;
  int64_t s1 = 0, s2 = 0;
  load_model_weights<float>(one, cfg_, layout_, p1, b1);
  load_model_weights<float>(many, cfg_, layout_, p2, b2);
  EXPECT_EQ(p2, p1);
  EXPECT_EQ(p2, s.params);
  EXPECT_EQ(b2, b1);
  ASSERT_TRUE(load_optimizer_state<float>(one, layout_, m1, v1, s1));
  ASSERT_TRUE(load_optimizer_state<float>(many, layout_, m2, v2, s2));
  EXPECT_EQ(m2, m1);
  EXPECT_EQ(v2, v1);
  EXPECT_EQ(s2, s1);

  // A shard that went missing is named.
  fs::remove(fs::path(many) / *shards.begin());
  EXPECT_CONTAINS(error_of([&] { load_model_weights<float>(many, cfg_, layout_, p2, b2); }), *shards.begin());
}

TEST_F(CheckpointTest, ModelFileUsesHuggingFaceNamesAndTheStandardFormat) {
  const std::string dir = path("fmt");
  const Saved s = save_float(dir, cfg_, layout_, 0.1);
  // Parse the file by hand: 8-byte LE length, JSON header, data buffer.
  std::ifstream in(fs::path(dir) / "model.safetensors", std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), {});
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  ASSERT_EQ(n % 8, 0u);
  const json h = json::parse(bytes.substr(8, n));
  EXPECT_EQ(h["__metadata__"]["format"], "pt");
  EXPECT_EQ(h["model.embed_tokens.weight"]["shape"], (json{32, 16}));
  EXPECT_EQ(h["model.layers.0.mlp.gate_proj.weight"]["shape"], (json{32, 16}));
  EXPECT_EQ(h["model.layers.1.mlp.gate.weight"]["shape"], (json{4, 16}));
  EXPECT_EQ(h["model.layers.2.mlp.experts.3.down_proj.weight"]["shape"], (json{16, 8}));
  EXPECT_EQ(h["model.layers.1.mlp.shared_experts.up_proj.weight"]["shape"], (json{8, 16}));
  EXPECT_EQ(h["lm_head.weight"]["shape"], (json{32, 16}));
  const json& b = h["model.layers.2.mlp.gate.e_score_correction_bias"];
  EXPECT_EQ(b["dtype"], "F32");
  EXPECT_EQ(b["shape"], (json{4}));
  EXPECT_FALSE(h.contains("model.layers.0.mlp.gate.e_score_correction_bias"));  // dense layer
  // The bias of MoE layer j = 1 (model layer 2) holds bias[1] in its byte range.
  const uint64_t begin = b["data_offsets"][0];
  std::vector<float> got(4);
  std::memcpy(got.data(), bytes.data() + 8 + n + begin, 16);
  EXPECT_EQ(got, s.bias[1]);
  // And the embedding holds the parameter values.
  const auto& emb = layout_.at("model.embed_tokens.weight");
  const uint64_t eb = h["model.embed_tokens.weight"]["data_offsets"][0];
  std::vector<float> e(emb.numel);
  std::memcpy(e.data(), bytes.data() + 8 + n + eb, 4 * emb.numel);
  EXPECT_EQ(e, std::vector<float>(s.params.begin() + emb.offset, s.params.begin() + emb.offset + emb.numel));
  // The optimizer file carries both moments of every parameter and the step.
  SafetensorsReader opt((fs::path(dir) / "optimizer.safetensors").string());
  EXPECT_EQ(opt.tensors().size(), 2 * layout_.tensors().size());
  EXPECT_EQ(opt.metadata().at("step"), "17");
  EXPECT_TRUE(opt.contains("model.norm.weight.exp_avg_sq"));
}

TEST_F(CheckpointTest, NoOptimizerStateAndNoTrainerState) {
  const std::string dir = path("noopt");
  const auto params = fill<float>(layout_, 0.0, 0.0f);
  save_checkpoint<float>(dir, cfg_, layout_, params, fill_bias(cfg_, 0), nullptr, nullptr, 0, nullptr);
  EXPECT_FALSE(fs::exists(fs::path(dir) / "optimizer.safetensors"));
  std::vector<float> m = {1}, v = {2};
  int64_t step = 99;
  EXPECT_FALSE(load_optimizer_state<float>(dir, layout_, m, v, step));
  EXPECT_EQ(step, 99);
  EXPECT_EQ(m, std::vector<float>{1});
  EXPECT_EQ(load_trainer_state(dir), json::object());
  fs::remove(fs::path(dir) / "trainer_state.json");
  EXPECT_EQ(load_trainer_state(dir), json::object());
  // Invalid requests are refused before anything is written.
  EXPECT_CONTAINS(error_of([&] {
                    save_checkpoint<float>(path("x"), cfg_, layout_, params, fill_bias(cfg_, 0), &m, nullptr, 0, {});
                  }),
                  "both");
  EXPECT_CONTAINS(error_of([&] {
                    save_checkpoint<float>(path("x"), cfg_, layout_, params, fill_bias(cfg_, 0), nullptr, nullptr,
                                           0, json::array());
                  }),
                  "trainer_state");
  EXPECT_CONTAINS(error_of([&] {
                    save_checkpoint<float>(path("x"), cfg_, layout_, params, {{0, 0, 0, 0}}, nullptr, nullptr, 0, {});
                  }),
                  "bias");
  EXPECT_FALSE(fs::exists(path("x")));
}

TEST_F(CheckpointTest, MissingTensorIsNamed) {
  const std::string dir = path("miss");
  save_float(dir, cfg_, layout_, 0.2);
  // Rewrite the model file without one expert tensor.
  const std::string file = (fs::path(dir) / "model.safetensors").string();
  const std::string gone = ParamLayout::expert(2, 1, "up_proj");
  std::vector<std::vector<float>> data;
  std::vector<TensorToWrite> keep;
  {
    SafetensorsReader r(file);
    data.reserve(r.tensors().size());
    for (const auto& t : r.tensors()) {
      if (t.name == gone) continue;
      data.emplace_back(t.numel());
      r.read(t.name, data.back().data(), t.numel());
      keep.push_back({t.name, t.shape, data.back().data()});
    }
  }
  write_safetensors(file, keep);
  std::vector<float> p;
  std::vector<std::vector<float>> b;
  const std::string msg = error_of([&] { load_model_weights<float>(dir, cfg_, layout_, p, b); });
  EXPECT_CONTAINS(msg, file);
  EXPECT_CONTAINS(msg, "missing tensor '" + gone + "'");
  EXPECT_CONTAINS(msg, "(8, 16)");
}

// A checkpoint of the default attention loaded under a V4-attention config (MODEL.md
// 12), and the other way round: the load fails naming the first tensor it lacks.
TEST_F(CheckpointTest, AttentionTypeMismatchNamesTheMissingTensor) {
  json v4j = small_config_json();
  v4j.update(
      {{"attention_type", "v4"}, {"q_lora_rank", 8}, {"qk_rope_head_dim", 4}, {"o_groups", 2}, {"o_lora_rank", 4}});
  const ModelConfig v4 = ModelConfig::from_json(v4j, "test");
  const ParamLayout v4_layout = ParamLayout::build(v4);
  EXPECT_EQ(v4_layout.at("model.layers.0.self_attn.o_a_proj.weight").shape, (std::vector<int64_t>{8, 8}));
  EXPECT_FALSE(v4_layout.at("model.layers.0.self_attn.sinks").decay);
  save_float(path("llama"), cfg_, layout_, 0.3);
  save_float(path("v4"), v4, v4_layout, 0.4);
  std::vector<float> p;
  std::vector<std::vector<float>> b;
  EXPECT_CONTAINS(error_of([&] { load_model_weights<float>(path("llama"), v4, v4_layout, p, b); }),
                  "missing tensor 'model.layers.0.self_attn.q_a_proj.weight' (expected shape (8, 16))");
  EXPECT_CONTAINS(error_of([&] { load_model_weights<float>(path("v4"), cfg_, layout_, p, b); }),
                  "missing tensor 'model.layers.0.self_attn.q_proj.weight'");
  // Its own config loads it back exactly.
  load_model_weights<float>(path("v4"), v4, v4_layout, p, b);
  EXPECT_EQ(p, fill<float>(v4_layout, 0.4, 0.0f));
}

TEST_F(CheckpointTest, WrongShapeAndUnexpectedTensorsAreRejected) {
  const std::string dir = path("shape");
  save_float(dir, cfg_, layout_, 0.3);
  const std::string file = (fs::path(dir) / "model.safetensors").string();
  std::vector<float> p;
  std::vector<std::vector<float>> b;

  json j = small_config_json();
  j["moe_intermediate_size"] = 4;
  const ModelConfig narrow = ModelConfig::from_json(j);
  const std::string msg = error_of([&] { load_model_weights<float>(dir, narrow, ParamLayout::build(narrow), p, b); });
  EXPECT_CONTAINS(msg, file);
  EXPECT_CONTAINS(msg, "tensor 'model.layers.1.mlp.experts.0.gate_proj.weight' has shape (8, 16)");
  EXPECT_CONTAINS(msg, "needs (4, 16)");

  j = small_config_json();
  j["n_shared_experts"] = 0;
  const ModelConfig noshared = ModelConfig::from_json(j);
  const std::string msg2 =
      error_of([&] { load_model_weights<float>(dir, noshared, ParamLayout::build(noshared), p, b); });
  EXPECT_CONTAINS(msg2, file);
  EXPECT_CONTAINS(msg2, "unexpected tensor 'model.layers.1.mlp.shared_experts.gate_proj.weight'");

  // Optimizer state of a different model is rejected the same way.
  std::vector<float> m, v;
  int64_t step;
  const std::string msg3 = error_of([&] { load_optimizer_state<float>(dir, ParamLayout::build(narrow), m, v, step); });
  EXPECT_CONTAINS(msg3, "optimizer.safetensors");
  EXPECT_CONTAINS(msg3, "exp_avg' has shape (8, 16)");
}

TEST_F(CheckpointTest, CorruptFilesNameTheFile) {
  const std::string dir = path("corrupt");
  save_float(dir, cfg_, layout_, 0.4);
  const fs::path d(dir);
  std::vector<float> p;
  std::vector<std::vector<float>> b;
  // Truncated model file.
  fs::resize_file(d / "model.safetensors", fs::file_size(d / "model.safetensors") - 1);
  EXPECT_CONTAINS(error_of([&] { load_model_weights<float>(dir, cfg_, layout_, p, b); }),
                  (d / "model.safetensors").string());
  // Bad config.json, then a missing one.
  std::ofstream(d / "config.json") << "{\"hidden_size\": 16,";
  EXPECT_CONTAINS(error_of([&] { load_checkpoint_config(dir); }), (d / "config.json").string());
  std::ofstream(d / "config.json") << "{\"hidden_size\": 16, \"n_routed_experts\": 4, \"num_experts_per_tok\": 5}";
  const std::string bad_key = error_of([&] { load_checkpoint_config(dir); });
  EXPECT_CONTAINS(bad_key, (d / "config.json").string());
  EXPECT_CONTAINS(bad_key, "num_experts_per_tok");
  fs::remove(d / "config.json");
  EXPECT_CONTAINS(error_of([&] { load_checkpoint_config(dir); }), (d / "config.json").string());
  // trainer_state.json that is not an object; optimizer file without a step.
  std::ofstream(d / "trainer_state.json") << "[1, 2]";
  EXPECT_CONTAINS(error_of([&] { load_trainer_state(dir); }), (d / "trainer_state.json").string());
  std::vector<TensorToWrite> moments;
  std::vector<std::vector<float>> zeros;
  for (const auto& t : layout_.tensors()) zeros.emplace_back(t.numel, 0.0f);
  for (size_t i = 0; i < layout_.tensors().size(); ++i) {
    const auto& t = layout_.tensors()[i];
    moments.push_back({t.name + ".exp_avg", t.shape, zeros[i].data()});
    moments.push_back({t.name + ".exp_avg_sq", t.shape, zeros[i].data()});
  }
  write_safetensors((d / "optimizer.safetensors").string(), moments, {{"format", "pt"}});
  std::vector<float> m, v;
  int64_t step;
  const std::string msg = error_of([&] { load_optimizer_state<float>(dir, layout_, m, v, step); });
  EXPECT_CONTAINS(msg, (d / "optimizer.safetensors").string());
  EXPECT_CONTAINS(msg, "step");
}

TEST_F(CheckpointTest, NonFiniteWeightsAndNegativeSecondMomentsAreRefused) {
  const std::string dir = path("nan");
  const fs::path d(dir);
  std::vector<float> p, m, v;
  std::vector<double> pd;
  std::vector<std::vector<float>> b;
  int64_t step;
  const auto rewrite = [&](const char* file, const std::string& tensor, size_t at, float value) {
    const std::string f = (d / file).string();
    std::vector<std::vector<float>> data;
    std::vector<TensorToWrite> all;
    std::map<std::string, std::string> meta;
    {
      SafetensorsReader r(f);
      meta = r.metadata();
      data.reserve(r.tensors().size());
      for (const auto& t : r.tensors()) {
        data.emplace_back(t.numel());
        r.read(t.name, data.back().data(), t.numel());
        if (t.name == tensor) data.back()[at] = value;
        all.push_back({t.name, t.shape, data.back().data()});
      }
    }
    write_safetensors(f, all, meta);
  };
  const std::string model = (d / "model.safetensors").string(), opt = (d / "optimizer.safetensors").string();
  save_float(dir, cfg_, layout_, 0.5);
  rewrite("model.safetensors", "lm_head.weight", 3, std::nanf(""));
  std::string msg = error_of([&] { load_model_weights<float>(dir, cfg_, layout_, p, b); });
  EXPECT_CONTAINS(msg, model + ": tensor 'lm_head.weight' holds a non-finite value (nan) at element 3");
  save_float(dir, cfg_, layout_, 0.5);
  rewrite("model.safetensors", ParamLayout::bias_name(1), 2, -INFINITY);
  EXPECT_CONTAINS(error_of([&] { load_model_weights<double>(dir, cfg_, layout_, pd, b); }),
                  "tensor '" + ParamLayout::bias_name(1) + "' holds a non-finite value (-inf) at element 2");
  save_float(dir, cfg_, layout_, 0.5);
  rewrite("optimizer.safetensors", "model.norm.weight.exp_avg", 0, INFINITY);
  EXPECT_CONTAINS(error_of([&] { load_optimizer_state<float>(dir, layout_, m, v, step); }),
                  opt + ": tensor 'model.norm.weight.exp_avg' holds a non-finite value (inf) at element 0");
  save_float(dir, cfg_, layout_, 0.5);
  rewrite("optimizer.safetensors", "model.norm.weight.exp_avg_sq", 1, -0.5f);
  EXPECT_CONTAINS(error_of([&] { load_optimizer_state<float>(dir, layout_, m, v, step); }),
                  "tensor 'model.norm.weight.exp_avg_sq' holds a negative value (-0.5) at element 1");
  // A negative first moment is normal.
  save_float(dir, cfg_, layout_, 0.5);
  rewrite("optimizer.safetensors", "model.norm.weight.exp_avg", 1, -0.5f);
  EXPECT_TRUE(load_optimizer_state<float>(dir, layout_, m, v, step));
}

TEST_F(CheckpointTest, GreedyRoutingToleratesAbsentBias) {
  const std::string dir = path("greedy");
  save_float(dir, cfg_, layout_, 0.6);
  // Drop the bias tensors: a noaux_tc config must refuse, a greedy config loads zeros.
  const std::string file = (fs::path(dir) / "model.safetensors").string();
  std::vector<std::vector<float>> data;
  std::vector<TensorToWrite> keep;
  {
    SafetensorsReader r(file);
    data.reserve(r.tensors().size());
    for (const auto& t : r.tensors()) {
      if (t.name.find("e_score_correction_bias") != std::string::npos) continue;
      data.emplace_back(t.numel());
      r.read(t.name, data.back().data(), t.numel());
      keep.push_back({t.name, t.shape, data.back().data()});
    }
  }
  write_safetensors(file, keep);
  std::vector<float> p;
  std::vector<std::vector<float>> b;
  EXPECT_CONTAINS(error_of([&] { load_model_weights<float>(dir, cfg_, layout_, p, b); }),
                  "missing tensor '" + ParamLayout::bias_name(1) + "'");
  json j = small_config_json();
  j["topk_method"] = "greedy";
  const ModelConfig greedy = ModelConfig::from_json(j);
  load_model_weights<float>(dir, greedy, ParamLayout::build(greedy), p, b);
  EXPECT_EQ(b, (std::vector<std::vector<float>>(2, std::vector<float>(4, 0.0f))));
}

TEST_F(CheckpointTest, OverwriteReplacesAndFailedOverwriteKeepsTheOld) {
  const std::string dir = path("live");
  const Saved v1 = save_float(dir, cfg_, layout_, 1.0);
  std::vector<float> p;
  std::vector<std::vector<float>> b;

  // A failing write in the middle of the save (file size limit = a full disk: writes
  // fail with EFBIG once a file passes 4 KiB, which the model file does).
  {
    struct rlimit old_lim {};
    ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old_lim), 0);
    struct rlimit lim = old_lim;
    lim.rlim_cur = 4096;
    auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
    ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &lim), 0);
    const std::string msg = error_of([&] { save_float(dir, cfg_, layout_, 2.0); });
    setrlimit(RLIMIT_FSIZE, &old_lim);
    std::signal(SIGXFSZ, old_handler);
    EXPECT_CONTAINS(msg, "model.safetensors");
    EXPECT_CONTAINS(msg, "write failed");
  }
  EXPECT_TRUE(others({"live"}).empty());  // the temporary directory was removed
  load_model_weights<float>(dir, cfg_, layout_, p, b);
  EXPECT_EQ(p, v1.params);

  // Parent is a regular file: clear error, nothing created.
  std::ofstream(path("plain")) << "x";
  EXPECT_CONTAINS(error_of([&] { save_float(path("plain") + "/ckpt", cfg_, layout_, 2.0); }), path("plain"));
  // A directory that is not a checkpoint is never replaced.
  fs::create_directories(path("precious"));
  std::ofstream(path("precious") + "/notes.txt") << "keep me";
  EXPECT_CONTAINS(error_of([&] { save_float(path("precious"), cfg_, layout_, 2.0); }), "not a moetune checkpoint");
  EXPECT_TRUE(fs::exists(path("precious") + "/notes.txt"));
  fs::remove_all(path("precious"));
  fs::remove(path("plain"));

  // A successful overwrite replaces the old checkpoint and leaves nothing else.
  const Saved v2 = save_float(dir, cfg_, layout_, 2.0);
  EXPECT_TRUE(others({"live"}).empty());
  load_model_weights<float>(dir, cfg_, layout_, p, b);
  EXPECT_EQ(p, v2.params);
  EXPECT_NE(v2.params, v1.params);
  // Overwriting a sharded checkpoint with a single-file one leaves no stale shard.
  CheckpointWriteOptions opt;
  opt.max_shard_bytes = 4096;
  save_float(dir, cfg_, layout_, 3.0, opt);
  const Saved v4 = save_float(dir, cfg_, layout_, 4.0);
  EXPECT_FALSE(fs::exists(fs::path(dir) / "model.safetensors.index.json"));
  load_model_weights<float>(dir, cfg_, layout_, p, b);
  EXPECT_EQ(p, v4.params);
}

// ---------------------------------------------------------------------------------
// Hash-routing tables (MODEL.md section 12): mlp.gate.tid2eid, I32 (V, K), no bias.

namespace {

// small_config with MoE layer 1 hash-routed (model layer 1) and layer 2 live.
ModelConfig hash_config() {
  json j = small_config_json();
  j["num_hash_layers"] = 1;
  return ModelConfig::from_json(j, "test");
}
HashTables fill_tables(const ModelConfig& cfg) {
  HashTables t(cfg.num_hash_layers, std::vector<int32_t>(size_t(cfg.vocab_size) * cfg.K()));
  for (auto& table : t)
    for (int v = 0; v < cfg.vocab_size; ++v)
      for (int k = 0; k < cfg.K(); ++k) table[v * cfg.K() + k] = (v + 3 * k) % cfg.E();
  return t;
}
std::vector<std::vector<float>> hash_bias(const ModelConfig& cfg) {
  auto b = fill_bias(cfg, 0.25f);
  for (int j = 0; j < cfg.num_hash_layers; ++j) b[j].clear();
  return b;
}

// Rewrites `file` with tensor `name` replaced by `replace` (nullptr: removed) and
// `extra` appended; every other tensor is kept as it is (F32 or I32).
void rewrite(const std::string& file, const std::string& name, const TensorToWrite* replace,
             const std::vector<TensorToWrite>& extra = {}) {
  std::vector<std::vector<float>> f32;
  std::vector<std::vector<int32_t>> i32;
  std::vector<TensorToWrite> out;
  SafetensorsReader r(file);
  f32.reserve(r.tensors().size());
  i32.reserve(r.tensors().size());
  for (const auto& t : r.tensors()) {
    if (t.name == name) {
      if (replace) out.push_back(*replace);
      continue;
    }
    if (t.dtype == "I32") {
      i32.emplace_back(t.numel());
      r.read(t.name, i32.back().data(), t.numel());
      out.push_back(to_write<int32_t>(t.name, t.shape, i32.back().data()));
    } else {
      f32.emplace_back(t.numel());
      r.read(t.name, f32.back().data(), t.numel());
      out.push_back(to_write<float>(t.name, t.shape, f32.back().data()));
    }
  }
  out.insert(out.end(), extra.begin(), extra.end());
  write_safetensors(file + ".new", out);
  fs::rename(file + ".new", file);
}

}  // namespace

TEST_F(CheckpointTest, HashTablesRoundTripAsI32WithoutBias) {
  const ModelConfig cfg = hash_config();
  const ParamLayout layout = ParamLayout::build(cfg);
  const auto params = fill<float>(layout, 0.7, 0.0f);
  const auto bias = hash_bias(cfg);
  const HashTables tables = fill_tables(cfg);
  for (const uint64_t shard : {uint64_t(0), uint64_t(2048)}) {
    const std::string dir = path("hash_" + std::to_string(shard));
    CheckpointWriteOptions wo;
    wo.max_shard_bytes = shard;
    save_checkpoint<float>(dir, cfg, layout, params, bias, nullptr, nullptr, 0, json::object(), wo, &tables);
    if (shard == 0) {
      SafetensorsReader r((fs::path(dir) / "model.safetensors").string());
      const auto& t = r.at(ParamLayout::tid2eid_name(1));
      EXPECT_EQ(t.dtype, "I32");
      EXPECT_EQ(t.shape, (std::vector<int64_t>{32, 2}));
      EXPECT_FALSE(r.contains(ParamLayout::bias_name(1)));
      EXPECT_TRUE(r.contains(ParamLayout::bias_name(2)));
      EXPECT_FALSE(r.contains(ParamLayout::tid2eid_name(2)));
      std::vector<float> as_float(t.numel());
      EXPECT_CONTAINS(error_of([&] { r.read(t.name, as_float.data(), as_float.size()); }), "dtype I32");
    } else {
      EXPECT_TRUE(fs::exists(fs::path(dir) / "model.safetensors.index.json"));
    }
    std::vector<float> p;
    std::vector<std::vector<float>> b;
    HashTables back;
    load_model_weights<float>(dir, cfg, layout, p, b, &back);
    EXPECT_EQ(p, params);
    EXPECT_EQ(b, bias);
    EXPECT_EQ(back, tables);
    // Without somewhere to put the tables the load refuses (they would be lost).
    EXPECT_CONTAINS(error_of([&] { load_model_weights<float>(dir, cfg, layout, p, b); }), "num_hash_layers");
  }
  // The same files under a config without hash layers: the table is unexpected, the
  // bias it needs is missing.
  const std::string msg =
      error_of([&] { std::vector<float> p; std::vector<std::vector<float>> b;
                     load_model_weights<float>(path("hash_0"), cfg_, layout_, p, b); });
  EXPECT_CONTAINS(msg, "missing tensor '" + ParamLayout::bias_name(1) + "'");
}

TEST_F(CheckpointTest, SaveRefusesMissingOrInvalidHashTables) {
  const ModelConfig cfg = hash_config();
  const ParamLayout layout = ParamLayout::build(cfg);
  const auto params = fill<float>(layout, 0.7, 0.0f);
  const auto bias = hash_bias(cfg);
  auto save = [&](const HashTables* t) {
    return error_of([&] {
      save_checkpoint<float>(path("bad_save"), cfg, layout, params, bias, nullptr, nullptr, 0, json::object(), {}, t);
    });
  };
  EXPECT_CONTAINS(save(nullptr), "num_hash_layers = 1");
  HashTables t = fill_tables(cfg);
  t[0][5 * 2 + 1] = t[0][5 * 2];
  EXPECT_CONTAINS(save(&t), "row 5 (token 5) names expert");
  t = fill_tables(cfg);
  t[0][7] = 4;
  EXPECT_CONTAINS(save(&t), "outside [0, n_routed_experts = 4)");
  EXPECT_FALSE(fs::exists(path("bad_save")));
  // A bias row for the hash layer is refused too.
  t = fill_tables(cfg);
  EXPECT_CONTAINS(error_of([&] {
                    save_checkpoint<float>(path("bad_save"), cfg, layout, params, fill_bias(cfg, 0.1f), nullptr,
                                           nullptr, 0, json::object(), {}, &t);
                  }),
                  "hash-routed layer has no bias");
}

TEST_F(CheckpointTest, BadHashTablesAreNamedWhenLoading) {
  const ModelConfig cfg = hash_config();
  const ParamLayout layout = ParamLayout::build(cfg);
  const std::string name = ParamLayout::tid2eid_name(1);
  auto fresh = [&](const std::string& d) {
    const HashTables tables = fill_tables(cfg);
    save_checkpoint<float>(path(d), cfg, layout, fill<float>(layout, 0.7, 0.0f), hash_bias(cfg), nullptr, nullptr, 0,
                           json::object(), {}, &tables);
    return (fs::path(path(d)) / "model.safetensors").string();
  };
  auto load = [&](const std::string& d) {
    return error_of([&] {
      std::vector<float> p;
      std::vector<std::vector<float>> b;
      HashTables t;
      load_model_weights<float>(path(d), cfg, layout, p, b, &t);
    });
  };
  std::vector<int32_t> table = fill_tables(cfg)[0];
  {  // a token's row repeats an expert
    const std::string file = fresh("repeat");
    auto bad = table;
    bad[9 * 2 + 1] = bad[9 * 2];
    const auto t = to_write<int32_t>(name, {32, 2}, bad.data());
    rewrite(file, name, &t);
    const std::string msg = load("repeat");
    EXPECT_CONTAINS(msg, file);
    EXPECT_CONTAINS(msg, "tensor '" + name + "'");
    EXPECT_CONTAINS(msg, "row 9 (token 9) names expert " + std::to_string(bad[18]) + " twice");
  }
  {  // out-of-range experts, negative and >= E
    for (const int32_t v : {-1, 4}) {
      const std::string d = "range" + std::to_string(v + 1);
      const std::string file = fresh(d);
      auto bad = table;
      bad[3] = v;
      const auto t = to_write<int32_t>(name, {32, 2}, bad.data());
      rewrite(file, name, &t);
      const std::string msg = load(d);
      EXPECT_CONTAINS(msg, "tensor '" + name + "'");
      EXPECT_CONTAINS(msg, "row 1 (token 1) holds expert " + std::to_string(v));
    }
  }
  {  // wrong shape: (V, K+1) and (V*K)
    const std::string file = fresh("shape");
    std::vector<int32_t> wide(32 * 3, 0);
    const auto t = to_write<int32_t>(name, {32, 3}, wide.data());
    rewrite(file, name, &t);
    const std::string msg = load("shape");
    EXPECT_CONTAINS(msg, "tensor '" + name + "' has shape (32, 3)");
    EXPECT_CONTAINS(msg, "needs (32, 2)");
  }
  {  // floating point instead of I32
    const std::string file = fresh("dtype");
    std::vector<float> f(table.begin(), table.end());
    const auto t = to_write<float>(name, {32, 2}, f.data());
    rewrite(file, name, &t);
    const std::string msg = load("dtype");
    EXPECT_CONTAINS(msg, "tensor '" + name + "' has dtype F32");
    EXPECT_CONTAINS(msg, "must be I32");
  }
  {  // missing table
    const std::string file = fresh("missing");
    rewrite(file, name, nullptr);
    EXPECT_CONTAINS(load("missing"), "missing tensor '" + name + "' (expected shape (32, 2))");
  }
  {  // a bias for the hash-routed layer
    const std::string file = fresh("bias");
    std::vector<float> b(4, 0.0f);
    rewrite(file, "", nullptr, {to_write<float>(ParamLayout::bias_name(1), {4}, b.data())});
    EXPECT_CONTAINS(load("bias"), "unexpected tensor '" + ParamLayout::bias_name(1) + "'");
  }
}
