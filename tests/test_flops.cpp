// FLOPs per token, N_active, MFU and the FMA peak probe (MODEL.md section 9).
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "moe/config.hpp"
#include "moe/params.hpp"
#include "train/flops.hpp"

using namespace moetune;
using nlohmann::json;

namespace {

// V=10, d=8, L=3 (layer 0 dense), H=2, H_kv=1, hd=4, I=16, E=4, K=2, F=6, S=1, tied.
ModelConfig tiny() {
  return ModelConfig::from_json({{"vocab_size", 10},
                                 {"hidden_size", 8},
                                 {"num_hidden_layers", 3},
                                 {"num_attention_heads", 2},
                                 {"num_key_value_heads", 1},
                                 {"head_dim", 4},
                                 {"first_k_dense_replace", 1},
                                 {"intermediate_size", 16},
                                 {"n_routed_experts", 4},
                                 {"num_experts_per_tok", 2},
                                 {"moe_intermediate_size", 6},
                                 {"n_shared_experts", 1},
                                 {"tie_word_embeddings", true}});
}

}  // namespace

TEST(Flops, ActiveParamsHandComputed) {
  // Attention per layer: q (2*4 x 8) = 64, k (1*4 x 8) = 32, v = 32, o (8 x 8) = 64
  //   -> 192 per layer, x 3 layers                                        =  576
  // Dense layer 0: gate, up (16 x 8) and down (8 x 16) = 3 * 128          =  384
  // MoE layers 1, 2: router (4 x 8) = 32; shared 3 * (6 x 8) = 144;
  //   K = 2 routed experts of 3 * (6 x 8) = 288 -> 464 per layer, x 2     =  928
  // LM head (10 x 8), counted although tied                               =   80
  //                                                                 total = 1968
  EXPECT_EQ(active_matrix_params(tiny()), 1968);
}

TEST(Flops, FlopsPerTokenFormula) {
  // 6 * 1968 + 6 * L * H * hd * S = 11808 + 6 * 3 * 2 * 4 * 16 = 11808 + 2304 = 14112
  EXPECT_EQ(flops_per_token(tiny(), 16), 14112.0);
  EXPECT_EQ(flops_per_token(tiny(), 32) - flops_per_token(tiny(), 16), 6.0 * 3 * 2 * 4 * 16);
}

TEST(Flops, AllExpertsActiveEqualsLayoutMatrices) {
  // With K = E and an untied head every rank-2 tensor of the layout except the
  // embedding is touched by every token: N_active = their total size.
  auto c = ModelConfig::from_json({{"num_hidden_layers", 3},
                                   {"n_routed_experts", 4},
                                   {"num_experts_per_tok", 4},
                                   {"num_key_value_heads", 2},
                                   {"n_shared_experts", 2}});
  const ParamLayout layout = ParamLayout::build(c);
  int64_t matrices = 0;
  for (const TensorInfo& t : layout.tensors())
    if (t.shape.size() == 2 && t.name != "model.embed_tokens.weight") matrices += static_cast<int64_t>(t.numel);
  EXPECT_EQ(active_matrix_params(c), matrices);
  // Routing to K = 2 of the 4 experts removes 2 experts of 3 * F * d per MoE layer.
  c.set("num_experts_per_tok", "2");
  EXPECT_EQ(active_matrix_params(c), matrices - int64_t(c.num_moe_layers()) * 2 * 3 * c.F() * c.d());
}

// mHC (MODEL.md section 12) adds its projections fn: per layer attn_hc and ffn_hc
// ((2+n)n, n d) each, and hc_head (n, n d); the all-experts check still holds.
TEST(Flops, HyperConnectionsAddTheirProjections) {
  ModelConfig c = tiny();
  c.set("hc_mult", "2");
  // n = 2, d = 8: 2 * 3 layers * (4*2 x 16) = 768, head (2 x 16) = 32
  EXPECT_EQ(active_matrix_params(c), 1968 + 768 + 32);
  auto all = ModelConfig::from_json({{"num_hidden_layers", 2}, {"n_routed_experts", 2}, {"num_experts_per_tok", 2},
                                     {"hc_mult", 3}});
  const ParamLayout layout = ParamLayout::build(all);
  int64_t matrices = 0;
  for (const TensorInfo& t : layout.tensors())
    if (t.shape.size() == 2 && t.name != "model.embed_tokens.weight") matrices += static_cast<int64_t>(t.numel);
  EXPECT_EQ(active_matrix_params(all), matrices);
}

// MTP (MODEL.md section 12): e_proj and h_proj (d, d), one more MoE block, the LM head
// again; and one more attention layer in the S_ctx term.
TEST(Flops, MtpAddsItsBlockAndHead) {
  ModelConfig c = tiny();
  c.set("num_nextn_predict_layers", "1");
  // 2 * 64 + attention 192 + MoE 464 + LM head 80 = 864
  EXPECT_EQ(active_matrix_params(c), 1968 + 864);
  EXPECT_EQ(flops_per_token(c, 16), 6.0 * (1968 + 864) + 6.0 * 4 * 2 * 4 * 16);
}

// V4 attention (MODEL.md 12) on tiny(): q_lora_rank 3, o_groups 2 of o_lora_rank 5.
TEST(Flops, V4AttentionHandComputed) {
  ModelConfig c = tiny();
  c.set("q_lora_rank", "3");
  c.set("qk_rope_head_dim", "2");
  c.set("o_groups", "2");
  c.set("o_lora_rank", "5");
  c.set("attention_type", "v4");
  // Per layer: q_a (3 x 8) = 24, q_b (8 x 3) = 24, kv (4 x 8) = 32, o_a (2*5 x 8/2) = 40,
  // o_b (8 x 10) = 80 -> 200 per layer instead of 192: 1968 + 3 * 8 = 1992.
  EXPECT_EQ(active_matrix_params(c), 1992);
  EXPECT_EQ(flops_per_token(c, 16), 6.0 * 1992 + 6.0 * 3 * 2 * 4 * 16);
  // A sliding window W < S: S_ctx = 2W - W^2/S; W >= S changes nothing.
  c.set("sliding_window", "4");
  EXPECT_EQ(attention_context(c, 16), 8.0 - 1.0);
  EXPECT_EQ(flops_per_token(c, 16), 6.0 * 1992 + 6.0 * 3 * 2 * 4 * 7);
  c.set("sliding_window", "16");
  EXPECT_EQ(attention_context(c, 16), 16.0);
}

TEST(Flops, V4AllExpertsActiveEqualsLayoutMatrices) {
  auto c = ModelConfig::from_json({{"num_hidden_layers", 2},
                                   {"n_routed_experts", 4},
                                   {"num_experts_per_tok", 4},
                                   {"attention_type", "v4"},
                                   {"q_lora_rank", 24},
                                   {"o_groups", 2},
                                   {"o_lora_rank", 12}});
  const ParamLayout layout = ParamLayout::build(c);
  int64_t matrices = 0;
  for (const TensorInfo& t : layout.tensors())
    if (t.shape.size() == 2 && t.name != "model.embed_tokens.weight") matrices += static_cast<int64_t>(t.numel);
  EXPECT_EQ(active_matrix_params(c), matrices);
}

TEST(Flops, Mfu) {
  EXPECT_DOUBLE_EQ(mfu(1e9, 100.0, 1e12), 0.1);
  EXPECT_EQ(mfu(1e9, 100.0, 0.0), 0.0);
}

TEST(Flops, PeakProbeReturnsPositiveFinite) {
  const std::string isa = peak_probe_isa();
  EXPECT_TRUE(isa == "avx512f+fma" || isa == "avx2+fma" || isa == "generic") << isa;
  for (int threads : {1, 2}) {
    const double peak = measure_peak_flops(threads, 0.05);
    EXPECT_TRUE(std::isfinite(peak)) << threads;
    EXPECT_GT(peak, 0.0) << threads;
  }
  EXPECT_FALSE(cpu_model_name().empty());
}
