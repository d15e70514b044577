// ModelConfig: defaults, derived values, validation messages naming the key.
#include <gtest/gtest.h>

#include "moe/config.hpp"
#include "moe/error.hpp"
#include "moe/params.hpp"

using namespace moetune;
using nlohmann::json;

static std::string error_of(const json& j) {
  try {
    ModelConfig::from_json(j, "cfg.json");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Config, DefaultsResolveDerivedValues) {
  auto c = ModelConfig::from_json(json::object());
  EXPECT_EQ(c.num_key_value_heads, 4);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.intermediate_size, 1024);
  EXPECT_EQ(c.moe_intermediate_size, 256);
  auto round = ModelConfig::from_json(c.to_json());
  EXPECT_EQ(round.to_json(), c.to_json());
}

TEST(Config, InvalidCombinationsNameTheKey) {
  EXPECT_NE(error_of({{"n_routed_experts", 6}, {"n_group", 4}}).find("'n_group'"), std::string::npos);
  EXPECT_NE(error_of({{"num_experts_per_tok", 9}}).find("'num_experts_per_tok'"), std::string::npos);
  EXPECT_NE(error_of({{"n_group", 2}, {"topk_group", 3}}).find("'topk_group'"), std::string::npos);
  EXPECT_NE(error_of({{"n_group", 4}, {"topk_group", 1}, {"num_experts_per_tok", 3}}).find("'num_experts_per_tok'"),
            std::string::npos);
  EXPECT_NE(error_of({{"num_key_value_heads", 3}}).find("'num_key_value_heads'"), std::string::npos);
  EXPECT_NE(error_of({{"scoring_func", "relu"}}).find("'scoring_func'"), std::string::npos);
  EXPECT_NE(error_of({{"hidden_sise", 3}}).find("unknown"), std::string::npos);
  // mHC (MODEL.md section 12)
  EXPECT_NE(error_of({{"hc_mult", 0}}).find("key 'hc_mult': must be >= 1"), std::string::npos);
  EXPECT_NE(error_of({{"hc_sinkhorn_iters", 0}}).find("key 'hc_sinkhorn_iters': must be >= 1"), std::string::npos);
  EXPECT_NE(error_of({{"hc_eps", -1e-6}}).find("key 'hc_eps': must be a finite number >= 0"), std::string::npos);
  // MTP (MODEL.md section 12)
  EXPECT_NE(error_of({{"num_nextn_predict_layers", 2}}).find("key 'num_nextn_predict_layers': must be 0 or 1"),
            std::string::npos);
  EXPECT_NE(error_of({{"num_nextn_predict_layers", -1}}).find("key 'num_nextn_predict_layers'"), std::string::npos);
  EXPECT_NE(error_of({{"mtp_loss_weight", -0.1}}).find("key 'mtp_loss_weight': must be a finite number >= 0"),
            std::string::npos);
  EXPECT_NE(error_of({{"hidden_size", "big"}}).find("cfg.json: key 'hidden_size'"), std::string::npos);
  // Found by fuzz_model_config: an int that wraps, a derived default that overflows,
  // a --set value that is not UTF-8.
  EXPECT_NE(error_of({{"hidden_size", 4294967360LL}}).find("'hidden_size': integer 4294967360 is out of range"),
            std::string::npos);
  EXPECT_NE(error_of({{"hidden_size", 1 << 30}}).find("'intermediate_size'"), std::string::npos);
  ModelConfig c = ModelConfig::from_json(json::object());
  try {
    c.set("hidden_size", "\xff");
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'hidden_size': expected an integer"), std::string::npos) << e.what();
  }
}

// DeepSeek-V4 attention keys (MODEL.md section 12).
TEST(Config, V4AttentionKeysAreValidatedNamingTheKey) {
  const json v4 = {{"attention_type", "v4"}, {"num_attention_heads", 4}, {"head_dim", 16}, {"q_lora_rank", 32},
                   {"qk_rope_head_dim", 8}, {"o_groups", 2}, {"o_lora_rank", 16}};
  auto with = [&](const json& extra) {
    json j = v4;
    j.update(extra);
    return error_of(j);
  };
  EXPECT_EQ(with(json::object()), "");
  const ModelConfig c = ModelConfig::from_json(v4);
  EXPECT_TRUE(c.v4_attention());
  EXPECT_EQ(ModelConfig::from_json(c.to_json()).to_json(), c.to_json());
  EXPECT_FALSE(ModelConfig::from_json(json::object()).v4_attention());  // the default stays "llama"
  EXPECT_NE(with({{"attention_type", "mla"}}).find("key 'attention_type': must be \"llama\" or \"v4\""),
            std::string::npos);
  EXPECT_NE(with({{"qk_rope_head_dim", 7}}).find("key 'qk_rope_head_dim': must be even"), std::string::npos);
  EXPECT_NE(with({{"qk_rope_head_dim", 18}}).find("key 'qk_rope_head_dim'"), std::string::npos);
  EXPECT_NE(with({{"qk_rope_head_dim", -2}}).find("key 'qk_rope_head_dim'"), std::string::npos);
  EXPECT_NE(with({{"o_groups", 3}}).find("key 'o_groups': num_attention_heads (4) must be divisible by o_groups (3)"),
            std::string::npos);
  EXPECT_NE(with({{"o_groups", 0}}).find("key 'o_groups': must be positive"), std::string::npos);
  EXPECT_NE(with({{"q_lora_rank", 0}}).find("key 'q_lora_rank': must be positive"), std::string::npos);
  EXPECT_NE(with({{"o_lora_rank", -1}}).find("key 'o_lora_rank': must be positive"), std::string::npos);
  EXPECT_NE(with({{"sliding_window", -1}}).find("key 'sliding_window': must be >= 0"), std::string::npos);
  EXPECT_NE(with({{"sliding_window", "4"}}).find("key 'sliding_window': expected an integer"), std::string::npos);
  // The default attention has no window, and ignores the other V4 keys.
  EXPECT_NE(error_of({{"sliding_window", 4}}).find("key 'sliding_window': applies to attention_type \"v4\" only"),
            std::string::npos);
  EXPECT_EQ(error_of({{"q_lora_rank", 0}, {"o_groups", 3}}), "");
  EXPECT_EQ(with({{"qk_rope_head_dim", 0}, {"sliding_window", 1}}), "");
}

TEST(Config, IntegersOutsideIntAreRefusedNotWrapped) {
  // get<int>() would turn 2^32 + 16 into 16 and 2^64 - 1 into -1.
  EXPECT_NE(error_of({{"hidden_size", 4294967312ull}}).find("key 'hidden_size': integer 4294967312 is out of range"),
            std::string::npos);
  EXPECT_NE(error_of({{"vocab_size", 18446744073709551615ull}}).find("key 'vocab_size': integer"), std::string::npos);
  EXPECT_NE(error_of({{"num_hidden_layers", -4294967295ll}}).find("out of range"), std::string::npos);
  ModelConfig c = ModelConfig::from_json(json::object());
  EXPECT_THROW(c.set("hidden_size", "4294967312"), Error);
  EXPECT_EQ(c.hidden_size, 256);
}

TEST(Config, ModelsLargerThanMemoryNameTheFile) {
  // Every size valid on its own, together 10^9 x 512 x 2 parameters.
  const std::string msg = error_of({{"hidden_size", 1000000000}, {"intermediate_size", 16}, {"moe_intermediate_size", 16}});
  EXPECT_NE(msg.find("cfg.json: the model has"), std::string::npos) << msg;
  EXPECT_NE(msg.find("more than this machine's"), std::string::npos) << msg;
  // A derived size that would overflow int (intermediate_size = 4 * hidden_size) names the key.
  EXPECT_NE(error_of({{"hidden_size", 1000000000}}).find("cfg.json: key 'intermediate_size': the default 4 * hidden_size"),
            std::string::npos);
}

TEST(Config, LayoutHasHuggingFaceNames) {
  auto c = ModelConfig::from_json({{"num_hidden_layers", 2}, {"tie_word_embeddings", true}});
  auto p = ParamLayout::build(c);
  EXPECT_TRUE(p.contains("model.layers.0.mlp.gate_proj.weight"));
  EXPECT_TRUE(p.contains("model.layers.1.mlp.experts.7.down_proj.weight"));
  EXPECT_TRUE(p.contains("model.layers.1.mlp.shared_experts.up_proj.weight"));
  EXPECT_FALSE(p.contains("lm_head.weight"));
  EXPECT_EQ(p.at("model.layers.1.mlp.gate.weight").shape, (std::vector<int64_t>{8, 256}));
  EXPECT_FALSE(p.at("model.norm.weight").decay);
}

TEST(Config, SetRederivesDerivedKeysButKeepsExplicitOnes) {
  auto c = ModelConfig::from_json({{"hidden_size", 64}, {"num_attention_heads", 4}, {"intermediate_size", 100}});
  EXPECT_EQ(c.head_dim, 16);
  c.set("hidden_size", "128");
  EXPECT_EQ(c.head_dim, 32);               // derived: follows hidden_size
  EXPECT_EQ(c.moe_intermediate_size, 128);  // derived
  EXPECT_EQ(c.intermediate_size, 100);      // explicit: kept
  c.set("head_dim", "8");
  c.set("hidden_size", "256");
  EXPECT_EQ(c.head_dim, 8);  // now explicit
  // A failed set leaves the config unchanged.
  EXPECT_THROW(c.set("num_key_value_heads", "3"), Error);
  EXPECT_EQ(c.num_key_value_heads, 4);
}
