// Whole-model gradient checks in double: the loss (CE + every enabled balance loss)
// against central differences, for every parameter tensor, across router variants.
// Also: forward-only equals forward+backward, and gradient accumulation over
// micro-batches equals one big micro-batch (global-token-mean normalisation).
#include <gtest/gtest.h>

#include "moe/model.hpp"
#include "test_util.hpp"

using namespace moetune;
using namespace moetune::testing;

namespace {

nlohmann::json tiny(nlohmann::json extra) {
  nlohmann::json j = {{"vocab_size", 16},
                      {"hidden_size", 8},
                      {"num_hidden_layers", 2},
                      {"num_attention_heads", 2},
                      {"num_key_value_heads", 1},
                      {"intermediate_size", 8},
                      {"n_routed_experts", 4},
                      {"num_experts_per_tok", 2},
                      {"moe_intermediate_size", 4},
                      {"max_position_embeddings", 16},
                      {"initializer_range", 0.3}};
  for (auto it = extra.begin(); it != extra.end(); ++it) j[it.key()] = it.value();
  return j;
}

struct Case {
  const char* name;
  nlohmann::json cfg;
  double h = 1e-5;  // central-difference step
};

}  // namespace

class ModelGrad : public ::testing::TestWithParam<Case> {};

TEST_P(ModelGrad, EveryParameterTensor) {
  auto cfg = ModelConfig::from_json(tiny(GetParam().cfg));
  Model<double> m(cfg);
  m.init(11);
  for (auto& b : m.expert_bias())
    for (size_t e = 0; e < b.size(); ++e) b[e] = 0.02f * float(e % 2);
  auto mb = make_batch(2, 6, cfg.vocab_size, 5);
  LossNorm norm{double(mb.count_targets()), 2, 3};  // as if part of a larger global batch
  m.zero_grad();
  const auto st = m.forward_backward(mb, norm, true);
  ASSERT_GT(st.n_targets, 0);
  if (cfg.capacity_factor > 0) {
    EXPECT_GT(st.dropped_pairs, 0);
  }
  const std::vector<double> grads = m.grads();
  auto f = [&] { return m.forward_backward(mb, norm, false).total(); };
  EXPECT_NEAR(f(), st.total(), 1e-12);
  double worst_all = 0;
  for (const auto& t : m.layout().tensors()) {
    std::vector<double> x(m.params().begin() + t.offset, m.params().begin() + t.offset + t.numel);
    std::vector<double> g(grads.begin() + t.offset, grads.begin() + t.offset + t.numel);
    // Perturb through the model's own buffer.
    double gmax = 0;
    for (double v : g) gmax = std::max(gmax, std::fabs(v));
    const double floor = 1e-5 * (1.0 + gmax);
    double worst = 0;
    const size_t step = t.numel <= 48 ? 1 : t.numel / 48;
    for (size_t i = 0; i < t.numel; i += step) {
      double num = fd(f, m.params()[t.offset + i], GetParam().h);
      worst = std::max(worst, rel_err(num, g[i], floor));
    }
    EXPECT_LT(worst, 1e-5) << GetParam().name << ": " << t.name;
    worst_all = std::max(worst_all, worst);
  }
  std::printf("[ fd ] %s: worst relative error %.2e over %zu tensors\n", GetParam().name, worst_all,
              m.layout().tensors().size());
}

INSTANTIATE_TEST_SUITE_P(
    Variants, ModelGrad,
    ::testing::Values(
        Case{"sigmoid_noaux_shared_all_losses",
             {{"aux_loss_coeff", 0.05}, {"seq_aux_loss_coeff", 0.05}, {"z_loss_coeff", 0.01}}},
        Case{"softmax_greedy_capacity_tied_noshared",
             {{"scoring_func", "softmax"}, {"topk_method", "greedy"}, {"capacity_factor", 1.0},
              {"tie_word_embeddings", true}, {"n_shared_experts", 0}, {"norm_topk_prob", false},
              {"routed_scaling_factor", 2.0}}},
        Case{"groups_all_moe", {{"n_group", 2}, {"topk_group", 1}, {"first_k_dense_replace", 0},
                                {"num_key_value_heads", 2}, {"aux_loss_coeff", 0.05}}},
        Case{"softmax_shared_seq_aux", {{"scoring_func", "softmax"}, {"seq_aux_loss_coeff", 0.1}}},
        // DeepSeek-V4 routing (MODEL.md section 12): every layer MoE, layer 0 hash-routed,
        // layer 1 sqrtsoftplus + noaux_tc bias, the experts' SwiGLU clamped.
        Case{"v4_sqrtsoftplus_hash_swiglu_limit_all_moe",
             {{"scoring_func", "sqrtsoftplus"}, {"num_hash_layers", 1}, {"swiglu_limit", 0.5},
              {"first_k_dense_replace", 0}, {"routed_scaling_factor", 1.5}, {"aux_loss_coeff", 0.05},
              {"seq_aux_loss_coeff", 0.05}, {"z_loss_coeff", 0.01}}},
        Case{"v4_all_layers_hashed_capacity",
             {{"scoring_func", "sqrtsoftplus"}, {"num_hash_layers", 2}, {"swiglu_limit", 0.5},
              {"first_k_dense_replace", 0}, {"capacity_factor", 1.0}, {"aux_loss_coeff", 0.05}}},
        // mHC (MODEL.md section 12): 2 and 4 residual streams, few Sinkhorn rounds and a
        // large hc_eps so that every term of the connection counts.
        Case{"mhc_n2", {{"hc_mult", 2}, {"hc_sinkhorn_iters", 3}, {"hc_eps", 0.01}}},
        Case{"mhc_n4_v4_routing", {{"hc_mult", 4}, {"hc_sinkhorn_iters", 2}, {"hc_eps", 0.01},
                                   {"scoring_func", "sqrtsoftplus"}, {"num_hash_layers", 1},
                                   {"seq_aux_loss_coeff", 0.05}}},
        // MTP (MODEL.md section 12): one more block predicting token t+2, its loss weighted;
        // with the balance losses of its MoE layer; and with mHC (its own streams and head).
        // (Step 3e-5: at 1e-5 the expert weights' errors, 1.6e-5, are round-off: 4e-5 at
        // 3e-6, 4e-6 at 3e-5.)
        Case{"mtp",
             {{"num_nextn_predict_layers", 1}, {"mtp_loss_weight", 0.7}, {"aux_loss_coeff", 0.05},
              {"seq_aux_loss_coeff", 0.05}, {"z_loss_coeff", 0.01}},
             3e-5},
        Case{"mhc_n2_mtp_tied", {{"hc_mult", 2}, {"hc_sinkhorn_iters", 3}, {"hc_eps", 0.01},
                                 {"num_nextn_predict_layers", 1}, {"tie_word_embeddings", true},
                                 {"first_k_dense_replace", 0}, {"num_hash_layers", 1}}},
        // DeepSeek-V4 attention (MODEL.md section 12): low-rank q, shared kv head, sinks
        // (set away from their init 0 by the FD of the whole model), partial RoPE.
        Case{"v4_attention",
             {{"attention_type", "v4"}, {"head_dim", 6}, {"q_lora_rank", 5}, {"qk_rope_head_dim", 4},
              {"o_groups", 2}, {"o_lora_rank", 3}}},
        Case{"v4_attention_sliding_window_v4_routing",
             {{"attention_type", "v4"}, {"q_lora_rank", 6}, {"qk_rope_head_dim", 2}, {"o_groups", 1},
              {"o_lora_rank", 5}, {"sliding_window", 2}, {"scoring_func", "sqrtsoftplus"}, {"num_hash_layers", 1},
              {"swiglu_limit", 0.5}, {"first_k_dense_replace", 0}, {"aux_loss_coeff", 0.05},
              {"seq_aux_loss_coeff", 0.05}}},
        // RoPE on every channel, one head per output group. (head_dim 4: with heads of 2
        // channels the per-head RMS norm is so curved that central differences at h = 1e-5
        // miss by 2.5e-5 in q_a_proj.)
        Case{"v4_attention_full_rope_window_3",
             {{"attention_type", "v4"}, {"num_attention_heads", 4}, {"head_dim", 4}, {"q_lora_rank", 4},
              {"qk_rope_head_dim", 4}, {"o_groups", 4}, {"o_lora_rank", 2}, {"sliding_window", 3},
              {"tie_word_embeddings", true}}},
        // The whole DeepSeek-V4 shape at once (tests/fixtures/parity_v4 at FD size): V4
        // attention (low-rank q, shared kv head, sinks, partial RoPE, a window of 2 over
        // rows of 6, 2 output groups), every layer MoE, layer 0 hash-routed, sqrtsoftplus +
        // noaux_tc bias, clamped SwiGLU, a shared expert, 2 mHC streams and an MTP block
        // (whose MoE layer is live-routed), with every balance loss. (Step 3e-5, reached
        // 5.2e-6: at 1e-5 layer 0's and the MTP block's attn_hc.fn miss by 1.3e-5, at 3e-6
        // a dozen tensors by up to 4.9e-5: round-off, which falls as the step grows.)
        Case{"v4_everything",
             {{"attention_type", "v4"}, {"q_lora_rank", 6}, {"qk_rope_head_dim", 2}, {"o_groups", 2},
              {"o_lora_rank", 3}, {"sliding_window", 2}, {"first_k_dense_replace", 0}, {"num_hash_layers", 1},
              {"scoring_func", "sqrtsoftplus"}, {"swiglu_limit", 0.5}, {"n_shared_experts", 1},
              {"routed_scaling_factor", 1.5}, {"hc_mult", 2}, {"hc_sinkhorn_iters", 3}, {"hc_eps", 0.01},
              {"num_nextn_predict_layers", 1}, {"mtp_loss_weight", 0.7}, {"aux_loss_coeff", 0.05},
              {"seq_aux_loss_coeff", 0.05}, {"z_loss_coeff", 0.01}},
             3e-5}),
    [](const auto& info) { return std::string(info.param.name); });

// 1 micro-batch of 8 rows and 4 micro-batches of 2 rows give the same gradient when
// every loss term is normalised over the global batch (CE by the global target count,
// the sequence-wise loss by the global row count).
TEST(ModelGradAccum, FourMicroBatchesEqualOne) {
  auto cfg = ModelConfig::from_json(tiny({{"seq_aux_loss_coeff", 0.05}}));
  Model<double> a(cfg), b(cfg);
  a.init(3);
  b.init(3);
  auto big = make_batch(8, 6, cfg.vocab_size, 9);
  // Uneven target counts per micro-batch, so a mean of means would differ.
  for (int i = 0; i < 20; ++i) big.labels[i] = kIgnoreIndex;
  const double nt = double(big.count_targets());
  a.zero_grad();
  const auto sa = a.forward_backward(big, LossNorm{nt, 1, 8}, true);
  b.zero_grad();
  double ce = 0, seq = 0;
  for (int m = 0; m < 4; ++m) {
    MicroBatch mb;
    mb.rows = 2;
    mb.seq_len = 6;
    const int64_t n = 12;
    mb.input_ids.assign(big.input_ids.begin() + m * n, big.input_ids.begin() + (m + 1) * n);
    mb.labels.assign(big.labels.begin() + m * n, big.labels.begin() + (m + 1) * n);
    mb.doc_ids.assign(big.doc_ids.begin() + m * n, big.doc_ids.begin() + (m + 1) * n);
    const auto s = b.forward_backward(mb, LossNorm{nt, 4, 8}, true);
    ce += s.ce;
    seq += s.seq_aux_loss;
  }
  EXPECT_NEAR(ce, sa.ce, 1e-12);
  EXPECT_NEAR(seq, sa.seq_aux_loss, 1e-12);
  EXPECT_GT(sa.seq_aux_loss, 0);
  double worst = 0;
  for (size_t i = 0; i < a.grads().size(); ++i) worst = std::max(worst, std::fabs(a.grads()[i] - b.grads()[i]));
  EXPECT_LT(worst, 1e-12);
}

TEST(ModelForward, FloatMatchesDouble) {
  auto cfg = ModelConfig::from_json(tiny({{"aux_loss_coeff", 0.01}}));
  Model<double> md(cfg);
  Model<float> mf(cfg);
  md.init(4);
  mf.init(4);
  auto mb = make_batch(2, 6, cfg.vocab_size, 6);
  LossNorm norm{double(mb.count_targets()), 1, 2};
  md.zero_grad();
  mf.zero_grad();
  auto sd = md.forward_backward(mb, norm, true);
  auto sf = mf.forward_backward(mb, norm, true);
  EXPECT_LT(rel_err(sf.total(), sd.total()), 1e-5);
  double gmax = 0, diff = 0;
  for (size_t i = 0; i < md.grads().size(); ++i) {
    gmax = std::max(gmax, std::fabs(md.grads()[i]));
    diff = std::max(diff, std::fabs(md.grads()[i] - double(mf.grads()[i])));
  }
  EXPECT_LT(diff / gmax, 1e-4);
}

// A micro-batch without a single target: the cross-entropy and its gradient are zero.
// With the balance losses on, only the parameters upstream of a router get a gradient
// (the LM head and the final norm get exactly zero); with them off, every gradient is 0.
TEST(ModelForward, EmptyTargetsGiveZeroLoss) {
  for (const bool balance : {true, false}) {
    auto cfg = ModelConfig::from_json(
        tiny(balance ? nlohmann::json{{"aux_loss_coeff", 0.1}, {"z_loss_coeff", 0.01}}
                     : nlohmann::json{{"aux_loss_coeff", 0.0}, {"seq_aux_loss_coeff", 0.0}, {"z_loss_coeff", 0.0}}));
    Model<double> m(cfg);
    m.init(1);
    auto mb = make_batch(1, 6, cfg.vocab_size, 2);
    std::fill(mb.labels.begin(), mb.labels.end(), kIgnoreIndex);
    m.zero_grad();
    std::fill(m.grads().begin(), m.grads().end(), 1.0);  // zero_grad must really clear them
    m.zero_grad();
    auto st = m.forward_backward(mb, LossNorm{0, 1, 1}, true);
    EXPECT_EQ(st.ce, 0.0);
    EXPECT_EQ(st.n_targets, 0);
    EXPECT_TRUE(std::isfinite(st.total()));
    double nonzero_router_side = 0;
    for (const auto& t : m.layout().tensors()) {
      const double* g = m.grads().data() + t.offset;
      double sum_abs = 0;
      for (size_t i = 0; i < t.numel; ++i) {
        ASSERT_TRUE(std::isfinite(g[i])) << t.name;
        sum_abs += std::fabs(g[i]);
      }
      const bool head = t.name == "lm_head.weight" || t.name == "model.norm.weight";
      if (head || !balance)
        EXPECT_EQ(sum_abs, 0.0) << t.name << (balance ? " (no target reaches the head)" : " (no loss at all)");
      else
        nonzero_router_side += sum_abs;
    }
    if (balance) {
      EXPECT_GT(st.aux_loss + st.z_loss, 0.0);
      EXPECT_GT(nonzero_router_side, 0.0) << "the balance losses must still reach the routers";
    } else {
      EXPECT_EQ(st.total(), 0.0);
    }
  }
}

// swiglu_limit changes only the MoE experts: with a limit far above every activation the
// model is bit-identical to no limit; a small one changes the loss; a dense layer alone
// (no MoE layer reached) is never clamped.
TEST(ModelForward, SwigluLimitClampsExpertsOnly) {
  auto run = [](nlohmann::json extra) {
    auto cfg = ModelConfig::from_json(tiny(extra));
    Model<double> m(cfg);
    m.init(5);
    auto mb = make_batch(2, 6, cfg.vocab_size, 4);
    m.forward_backward(mb, LossNorm{double(mb.count_targets()), 1, 2}, false);
    return m.logits();
  };
  EXPECT_EQ(run({}), run({{"swiglu_limit", 1e6}}));
  EXPECT_NE(run({}), run({{"swiglu_limit", 0.3}}));
  EXPECT_EQ(run({{"n_routed_experts", 4}, {"first_k_dense_replace", 2}}),
            run({{"n_routed_experts", 4}, {"first_k_dense_replace", 2}, {"swiglu_limit", 0.01}}));
}

// A hash-routed layer routes by its table: the routing follows tid2eid whatever the
// router weights, its bias row is empty, and changing a table row changes the routing.
TEST(ModelForward, HashLayerRoutesByTheTable) {
  auto cfg = ModelConfig::from_json(tiny({{"num_hash_layers", 1}, {"first_k_dense_replace", 0}}));
  Model<double> m(cfg);
  m.init(9);
  ASSERT_EQ(m.tid2eid().size(), 1u);
  EXPECT_TRUE(m.expert_bias()[0].empty());
  EXPECT_EQ(m.expert_bias()[1].size(), 4u);
  auto mb = make_batch(2, 6, cfg.vocab_size, 4);
  RoutingTrace rec;
  ForwardOptions fo;
  fo.train = false;
  fo.record = &rec;
  m.forward(mb, LossNorm{}, fo);
  const int K = cfg.K();
  for (int64_t t = 0; t < mb.tokens(); ++t)
    for (int k = 0; k < K; ++k) EXPECT_EQ(rec.idx[0][t * K + k], m.tid2eid()[0][mb.input_ids[t] * K + k]);
  const auto before = m.logits();
  std::swap(m.tid2eid()[0][mb.input_ids[0] * K], m.tid2eid()[0][mb.input_ids[0] * K + 1]);  // reorders: same set
  m.forward(mb, LossNorm{}, fo);
  double diff = 0;
  for (size_t i = 0; i < before.size(); ++i) diff = std::max(diff, std::fabs(before[i] - m.logits()[i]));
  EXPECT_LT(diff, 1e-12) << "the order of a row's experts changes only the summation order";
  m.tid2eid()[0][mb.input_ids[0] * K] = (m.tid2eid()[0][mb.input_ids[0] * K + 1] + 1) % cfg.E();
  if (m.tid2eid()[0][mb.input_ids[0] * K] == m.tid2eid()[0][mb.input_ids[0] * K + 1]) FAIL();
  m.forward(mb, LossNorm{}, fo);
  diff = 0;
  for (size_t i = 0; i < before.size(); ++i) diff = std::max(diff, std::fabs(before[i] - m.logits()[i]));
  EXPECT_GT(diff, 1e-6);
  m.tid2eid()[0].pop_back();
  EXPECT_CONTAINS(error_of([&] { m.forward(mb, LossNorm{}, fo); }), "tid2eid");
}

TEST(ModelForward, RejectsTokenOutsideVocabulary) {
  auto cfg = ModelConfig::from_json(tiny({}));
  Model<float> m(cfg);
  auto mb = make_batch(1, 6, cfg.vocab_size, 2);
  mb.input_ids[3] = 99;
  try {
    m.forward_backward(mb, LossNorm{}, false);
    FAIL() << "expected an error";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("token id 99"), std::string::npos) << e.what();
  }
}

// Packing: perturbing one document never changes another document's logits.
TEST(ModelForward, DocumentsDoNotAttendAcrossBoundaries) {
  auto cfg = ModelConfig::from_json(tiny({{"n_shared_experts", 1}}));
  Model<double> m(cfg);
  m.init(8);
  auto mb = make_batch(1, 6, cfg.vocab_size, 3);  // row 0: doc 0 = [0,3), doc 1 = [3,6)
  m.forward_backward(mb, LossNorm{}, false);
  const auto before = m.logits();
  mb.input_ids[1] = (mb.input_ids[1] + 5) % cfg.vocab_size;  // change doc 0
  m.forward_backward(mb, LossNorm{}, false);
  const auto after = m.logits();
  const int64_t V = cfg.vocab_size;
  for (int64_t i = 3 * V; i < 6 * V; ++i) EXPECT_EQ(before[i], after[i]) << "doc 1 logits changed";
  double changed = 0;
  for (int64_t i = 1 * V; i < 3 * V; ++i) changed += std::fabs(before[i] - after[i]);
  EXPECT_GT(changed, 0.0);
}
