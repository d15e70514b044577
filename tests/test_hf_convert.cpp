// `moetune convert`: the Hugging Face form of a checkpoint (stacked experts, I64
// tables, transformers' config keys), the exact round trip back, reading the hub's
// variants (per-expert tensors, BF16, shards), and the refusals naming key or tensor.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>

#include "io/checkpoint.hpp"
#include "io/fsutil.hpp"
#include "io/hf_convert.hpp"
#include "io/safetensors.hpp"
#include "moe/error.hpp"
#include "moe/model.hpp"
#include "test_util.hpp"

using namespace moetune;
using namespace moetune::testing;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

// DeepSeek-V4 routing: every layer MoE, layer 0 hash-routed, sqrtsoftplus, one shared expert.
json v4_json() {
  return {{"vocab_size", 24},           {"hidden_size", 16},        {"num_hidden_layers", 2},
          {"num_attention_heads", 2},   {"n_routed_experts", 4},    {"num_experts_per_tok", 2},
          {"moe_intermediate_size", 8}, {"n_shared_experts", 1},    {"first_k_dense_replace", 0},
          {"scoring_func", "sqrtsoftplus"}, {"num_hash_layers", 1}, {"swiglu_limit", 7.0},
          {"max_position_embeddings", 32}};
}
// DeepSeek-V3 style: a dense layer then MoE.
json v3_json() {
  return {{"vocab_size", 24},         {"hidden_size", 16},          {"num_hidden_layers", 2},
          {"num_attention_heads", 2}, {"first_k_dense_replace", 1}, {"intermediate_size", 24},
          {"n_routed_experts", 4},    {"num_experts_per_tok", 2},   {"moe_intermediate_size", 8},
          {"max_position_embeddings", 32}};
}

// A step-0 checkpoint of `j` with distinct weights and biases.
std::string make_checkpoint(const std::string& name, const json& j, uint64_t shard_bytes = 0) {
  const ModelConfig cfg = ModelConfig::from_json(j, "test");
  Model<float> m(cfg);
  m.init(5);
  for (auto& b : m.expert_bias())
    for (size_t e = 0; e < b.size(); ++e) b[e] = 0.01f * float(e + 1);
  CheckpointWriteOptions wo;
  wo.max_shard_bytes = shard_bytes;
  wo.tokenizer_json = "{\"model\": \"test\"}";
  const std::string dir = test_path(name);
  save_checkpoint<float>(dir, cfg, m.layout(), m.params(), m.expert_bias(), nullptr, nullptr, 0, json{{"step", 0}},
                         wo, &m.tid2eid());
  return dir;
}

std::string bytes(const fs::path& p) { return read_text(p); }

// Writes tensors as given (dtype, shape, raw little-endian bytes) with the safetensors
// layout, for inputs moetune itself never writes (BF16).
struct RawTensor {
  std::string name, dtype;
  std::vector<int64_t> shape;
  std::string data;
};
void write_raw_safetensors(const std::string& path, const std::vector<RawTensor>& ts) {
  json h = json::object();
  uint64_t off = 0;
  for (const auto& t : ts) {
    h[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {off, off + t.data.size()}}};
    off += t.data.size();
  }
  std::string hs = h.dump();
  hs.append((8 - hs.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = char(uint64_t(hs.size()) >> (8 * i));
  out += hs;
  for (const auto& t : ts) out += t.data;
  std::ofstream(path, std::ios::binary) << out;
}
std::string bf16_bytes(const std::vector<float>& v) {  // truncation: exact for the values used
  std::string s;
  for (float f : v) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    s.push_back(char((u >> 16) & 0xff));
    s.push_back(char(u >> 24));
  }
  return s;
}

}  // namespace

TEST(HfConvert, StacksExpertsAndWidensTables) {
  const std::string in = make_checkpoint("in", v4_json());
  const std::string hf = test_path("hf");
  const ConvertReport r = convert_to_hf(in, hf);
  EXPECT_EQ(r.model_type, "deepseek_v4");
  const json cj = json::parse(read_text(fs::path(hf) / "config.json"));
  EXPECT_EQ(cj["model_type"], "deepseek_v4");
  EXPECT_EQ(cj["mlp_layer_types"], json({"hash_moe", "moe"}));
  EXPECT_EQ(cj["hidden_act"], "silu");
  EXPECT_EQ(read_text(fs::path(hf) / "tokenizer.json"), "{\"model\": \"test\"}");

  const ModelConfig cfg = ModelConfig::from_json(v4_json(), "test");
  const ParamLayout layout = ParamLayout::build(cfg);
  std::vector<float> p;
  std::vector<std::vector<float>> bias;
  HashTables tables;
  load_model_weights<float>(in, cfg, layout, p, bias, &tables);

  SafetensorsReader f((fs::path(hf) / "model.safetensors").string());
  for (const auto& t : f.tensors()) EXPECT_EQ(t.name.find(".experts.0."), std::string::npos) << t.name;
  const int64_t E = 4, F = 8, d = 16;
  for (int l = 0; l < 2; ++l) {
    const std::string pre = "model.layers." + std::to_string(l) + ".mlp.experts.";
    ASSERT_EQ(f.at(pre + "gate_up_proj").shape, (std::vector<int64_t>{E, 2 * F, d}));
    ASSERT_EQ(f.at(pre + "down_proj").shape, (std::vector<int64_t>{E, d, F}));
    std::vector<float> gu(E * 2 * F * d), dn(E * d * F);
    f.read(pre + "gate_up_proj", gu.data(), gu.size());
    f.read(pre + "down_proj", dn.data(), dn.size());
    for (int e = 0; e < E; ++e) {
      const std::string pe = pre + std::to_string(e) + ".";
      const float* g = p.data() + layout.offset(pe + "gate_proj.weight");
      const float* u = p.data() + layout.offset(pe + "up_proj.weight");
      const float* w = p.data() + layout.offset(pe + "down_proj.weight");
      EXPECT_EQ(0, std::memcmp(gu.data() + e * 2 * F * d, g, F * d * 4)) << pe;
      EXPECT_EQ(0, std::memcmp(gu.data() + (e * 2 + 1) * F * d, u, F * d * 4)) << pe;
      EXPECT_EQ(0, std::memcmp(dn.data() + e * d * F, w, d * F * 4)) << pe;
    }
  }
  const auto& tid = f.at("model.layers.0.mlp.gate.tid2eid");
  EXPECT_EQ(tid.dtype, "I64");
  std::vector<int32_t> table(24 * 2);
  f.read("model.layers.0.mlp.gate.tid2eid", table.data(), table.size());
  EXPECT_EQ(table, tables[0]);
  EXPECT_FALSE(f.contains("model.layers.0.mlp.gate.e_score_correction_bias"));
  std::vector<float> b(4);
  f.read("model.layers.1.mlp.gate.e_score_correction_bias", b.data(), 4);
  EXPECT_EQ(b, bias[1]);
}

// The whole V4 shape: V4 attention with a window, V4 routing, mHC (two streams) and the
// MTP block (its experts stack as mtp.0.mlp.experts.*).
json v4_hc_mtp_json() {
  json j = v4_json();
  j["hc_mult"] = 2;
  j["num_nextn_predict_layers"] = 1;
  j["attention_type"] = "v4";
  j["q_lora_rank"] = 8;
  j["qk_rope_head_dim"] = 4;
  j["o_groups"] = 2;
  j["o_lora_rank"] = 6;
  j["sliding_window"] = 16;
  return j;
}

TEST(HfConvert, RoundTripGivesTheSameBytes) {
  for (const json& j : {v4_json(), v3_json(), v4_hc_mtp_json()}) {
    const std::string in = make_checkpoint("rt_in", j);
    const std::string hf = test_path("rt_hf"), back = test_path("rt_back");
    convert_to_hf(in, hf);
    const ConvertReport r = convert_from_hf(hf, back);
    EXPECT_TRUE(r.notes.empty());
    if (j.contains("attention_type")) {
      // transformers' own config.json has neither key: deepseek_v4 means V4 attention and
      // partial_rotary_factor gives qk_rope_head_dim. The same checkpoint comes back.
      const json hj = json::parse(read_text(fs::path(hf) / "config.json"));
      EXPECT_EQ(hj["layer_types"], json({"sliding_attention", "sliding_attention"}));
      EXPECT_EQ(hj["partial_rotary_factor"], 0.5);
      json stripped = hj;
      stripped.erase("attention_type");
      stripped.erase("qk_rope_head_dim");
      fsutil::write_file_atomic(hf + "/config.json", stripped.dump(2));
      const std::string back2 = test_path("rt_back2");
      convert_from_hf(hf, back2);
      EXPECT_EQ(bytes(fs::path(in) / "config.json"), bytes(fs::path(back2) / "config.json"));
      EXPECT_EQ(bytes(fs::path(in) / "model.safetensors"), bytes(fs::path(back2) / "model.safetensors"));
      fs::remove_all(back2);
    }
    EXPECT_EQ(bytes(fs::path(in) / "model.safetensors"), bytes(fs::path(back) / "model.safetensors"));
    EXPECT_EQ(bytes(fs::path(in) / "config.json"), bytes(fs::path(back) / "config.json"));
    EXPECT_EQ(bytes(fs::path(in) / "tokenizer.json"), bytes(fs::path(back) / "tokenizer.json"));
    if (j.contains("num_nextn_predict_layers")) {
      SafetensorsReader f(hf + "/model.safetensors");
      EXPECT_EQ(f.at("mtp.0.mlp.experts.gate_up_proj").shape, (std::vector<int64_t>{4, 16, 16}));
      EXPECT_TRUE(f.contains("mtp.0.mlp.gate.e_score_correction_bias"));
      EXPECT_TRUE(f.contains("model.layers.1.attn_hc.fn"));
      EXPECT_TRUE(f.contains("model.hc_head.hc_fn"));
      EXPECT_TRUE(f.contains("model.layers.0.self_attn.q_a_norm.weight"));
      EXPECT_TRUE(f.contains("mtp.0.self_attn.sinks"));
    }
    fs::remove_all(in);
    fs::remove_all(hf);
    fs::remove_all(back);
  }
}

TEST(HfConvert, ShardedInAndOut) {
  // A sharded moetune checkpoint in, a sharded Hugging Face form out, and back.
  const std::string in = make_checkpoint("sh_in", v4_json(), 2048);
  ASSERT_TRUE(fs::exists(fs::path(in) / "model.safetensors.index.json"));
  const std::string hf = test_path("sh_hf"), back = test_path("sh_back"), single = test_path("sh_single");
  convert_to_hf(in, hf, 4096);
  ASSERT_TRUE(fs::exists(fs::path(hf) / "model.safetensors.index.json"));
  EXPECT_FALSE(fs::exists(fs::path(hf) / "model.safetensors"));
  convert_from_hf(hf, back);
  const ModelConfig cfg = ModelConfig::from_json(v4_json(), "test");
  const ParamLayout layout = ParamLayout::build(cfg);
  std::vector<float> a, b;
  std::vector<std::vector<float>> ba, bb;
  HashTables ta, tb;
  load_model_weights<float>(in, cfg, layout, a, ba, &ta);
  load_model_weights<float>(back, cfg, layout, b, bb, &tb);
  EXPECT_EQ(a, b);
  EXPECT_EQ(ba, bb);
  EXPECT_EQ(ta, tb);
}

TEST(HfConvert, ReadsPerExpertBf16HubFiles) {
  // The hub's DeepSeek-V3 files: per-expert tensors, BF16, a rotary buffer, I64 nothing.
  const ModelConfig cfg = ModelConfig::from_json(v3_json(), "test");
  const ParamLayout layout = ParamLayout::build(cfg);
  const std::string hf = test_path("hub");
  fs::create_directories(hf);
  json cj = v3_json();
  cj["model_type"] = "deepseek_v3";
  cj["architectures"] = {"DeepseekV3ForCausalLM"};
  cj["num_local_experts"] = 4;
  cj.erase("n_routed_experts");
  cj["hidden_act"] = "silu";
  cj["rope_scaling"] = nullptr;
  cj["q_lora_rank"] = nullptr;
  cj["bos_token_id"] = 0;
  cj["transformers_version"] = "4.57.0";
  fsutil::write_file_atomic(hf + "/config.json", cj.dump());
  std::vector<RawTensor> ts;
  std::vector<float> want(layout.total(), 0.0f);
  for (const auto& t : layout.tensors()) {
    std::vector<float> v(t.numel);
    for (size_t i = 0; i < t.numel; ++i) v[i] = float(int((t.offset + i) % 61) - 30) / 64.0f;  // exact in BF16
    std::copy(v.begin(), v.end(), want.begin() + t.offset);
    ts.push_back({t.name, "BF16", t.shape, bf16_bytes(v)});
  }
  ts.push_back({"model.layers.1.mlp.gate.e_score_correction_bias", "F32", {4}, std::string(16, '\0')});
  ts.push_back({"model.layers.0.self_attn.rotary_emb.inv_freq", "F32", {4}, std::string(16, '\0')});
  write_raw_safetensors(hf + "/model.safetensors", ts);
  const std::string out = test_path("hub_out");
  const ConvertReport r = convert_from_hf(hf, out);
  ASSERT_EQ(r.notes.size(), 1u);
  EXPECT_NE(r.notes[0].find("skipped 1"), std::string::npos) << r.notes[0];
  std::vector<float> p;
  std::vector<std::vector<float>> bias;
  load_model_weights<float>(out, load_checkpoint_config(out), layout, p, bias);
  EXPECT_EQ(p, want);
}

namespace {
// Error message of convert_from_hf on <dir> after `edit` changed its config.json.
std::string from_hf_error(const std::string& dir, const std::function<void(json&)>& edit) {
  json cj = json::parse(read_text(fs::path(dir) / "config.json"));
  const std::string keep = cj.dump(2);
  edit(cj);
  fsutil::write_file_atomic(dir + "/config.json", cj.dump(2));
  std::string msg;
  try {
    convert_from_hf(dir, test_path("never"));
  } catch (const Error& e) {
    msg = e.what();
  }
  fsutil::write_file_atomic(dir + "/config.json", keep);
  EXPECT_FALSE(fs::exists(test_path("never")));
  return msg;
}
}  // namespace

TEST(HfConvert, RefusesWhatMoetuneCannotRepresent) {
  const std::string hf = test_path("bad_hf");
  convert_to_hf(make_checkpoint("bad_in", v4_json()), hf);
  const auto has = [](const std::string& msg, const std::string& part) {
    EXPECT_NE(msg.find(part), std::string::npos) << "message: " << msg << "\nexpected: " << part;
  };
  has(from_hf_error(hf, [](json& j) { j["layer_types"] = {"sliding_attention", "compressed_sparse_attention"}; }),
      "key 'layer_types': entry 1");
  has(from_hf_error(hf, [](json& j) { j["quantization_config"] = {{"quant_method", "fp8"}}; }),
      "key 'quantization_config'");
  has(from_hf_error(hf, [](json& j) { j["kv_lora_rank"] = 512; }), "key 'kv_lora_rank': multi-head latent");
  has(from_hf_error(hf, [](json& j) { j["hidden_act"] = "gelu"; }), "key 'hidden_act'");
  has(from_hf_error(hf, [](json& j) { j["model_type"] = "llama"; }), "key 'model_type'");
  has(from_hf_error(hf, [](json& j) { j["mlp_layer_types"] = {"moe", "hash_moe"}; }),
      "key 'mlp_layer_types': hash_moe layers must come first");
  has(from_hf_error(hf, [](json& j) { j["num_hash_layers"] = 2; }), "key 'num_hash_layers'");
  has(from_hf_error(hf, [](json& j) { j["some_new_key"] = 1; }), "some_new_key");
  // A stacked tensor of the wrong shape: the file and the tensor are named.
  has(from_hf_error(hf, [](json& j) { j["moe_intermediate_size"] = 4; }), "mlp.experts.gate_up_proj");
}

TEST(HfConvert, BadTensorsAreNamedAndTheOutputIsUntouched) {
  const std::string hf = test_path("bt_hf");
  convert_to_hf(make_checkpoint("bt_in", v4_json()), hf);
  SafetensorsReader f(hf + "/model.safetensors");
  const std::string all = read_text(hf + "/model.safetensors");
  uint64_t header = 0;
  for (int i = 0; i < 8; ++i) header |= uint64_t(uint8_t(all[i])) << (8 * i);
  std::vector<RawTensor> ts;
  for (const auto& t : f.tensors())
    ts.push_back({t.name, t.dtype, t.shape, all.substr(8 + header + t.begin, t.end - t.begin)});
  const std::string out = test_path("bt_out");
  fs::create_directories(out);
  write_file("bt_out/keep.txt", "precious");
  const auto error_with = [&](std::vector<RawTensor> edited) {
    write_raw_safetensors(hf + "/model.safetensors", edited);
    std::string msg;
    try {
      convert_from_hf(hf, out);
    } catch (const Error& e) {
      msg = e.what();
    }
    return msg;
  };
  // A repeated expert in a tid2eid row.
  auto t1 = ts;
  for (auto& t : t1)
    if (t.name == "model.layers.0.mlp.gate.tid2eid") std::memcpy(t.data.data() + 8, t.data.data(), 8);
  EXPECT_NE(error_with(t1).find("model.layers.0.mlp.gate.tid2eid"), std::string::npos);
  // An extra tensor.
  auto t2 = ts;
  t2.push_back({"model.layers.0.mlp.extra", "F32", {1}, std::string(4, '\0')});
  EXPECT_NE(error_with(t2).find("unexpected tensor 'model.layers.0.mlp.extra'"), std::string::npos);
  // A NaN in a stacked expert tensor.
  auto t3 = ts;
  for (auto& t : t3)
    if (t.name == "model.layers.1.mlp.experts.down_proj") {
      const float nan = std::nanf("");
      std::memcpy(t.data.data() + 12, &nan, 4);
    }
  EXPECT_NE(error_with(t3).find("non-finite value at element 3"), std::string::npos);
  // The directory the output would replace is not a checkpoint: refused, left as it was.
  write_raw_safetensors(hf + "/model.safetensors", ts);
  std::string msg;
  try {
    convert_from_hf(hf, out);
  } catch (const Error& e) {
    msg = e.what();
  }
  EXPECT_NE(msg.find("is not a moetune checkpoint"), std::string::npos) << msg;
  EXPECT_EQ(read_text(out + "/keep.txt"), "precious");
}
