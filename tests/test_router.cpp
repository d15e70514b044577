// Router unit tests against hand-computed cases: selection, bias, groups, ties,
// weight normalisation/scaling, capacity drops, expert counts.
#include <gtest/gtest.h>

#include <cmath>

#include "moe/router.hpp"

using namespace moetune;

namespace {
ModelConfig cfg(nlohmann::json j) {
  j["hidden_size"] = 8;
  j["num_attention_heads"] = 2;
  return ModelConfig::from_json(j);
}
double sig(double x) { return 1.0 / (1.0 + std::exp(-x)); }
}  // namespace

TEST(Router, SigmoidTopKNormalised) {
  auto c = cfg({{"n_routed_experts", 4}, {"num_experts_per_tok", 2}, {"topk_method", "greedy"}});
  std::vector<double> logits = {0.1, 2.0, -1.0, 1.0};
  std::vector<float> bias(4, 0.f);
  Routing<double> r;
  route_select(r, logits.data(), bias.data(), c, 1);
  EXPECT_EQ(r.idx, (std::vector<int32_t>{1, 3}));
  const double s1 = sig(2.0), s3 = sig(1.0);
  EXPECT_NEAR(r.weight[0], s1 / (s1 + s3), 1e-15);
  EXPECT_NEAR(r.weight[1], s3 / (s1 + s3), 1e-15);
  EXPECT_EQ(r.counts, (std::vector<int64_t>{0, 1, 0, 1}));
}

TEST(Router, BiasChangesSelectionButNotWeights) {
  auto c = cfg({{"n_routed_experts", 4}, {"num_experts_per_tok", 2}, {"topk_method", "noaux_tc"},
                {"norm_topk_prob", false}});
  std::vector<double> logits = {0.1, 2.0, -1.0, 1.0};
  std::vector<float> bias = {0.f, 0.f, 0.9f, 0.f};  // s2 + 0.9 = 0.269 + 0.9 > s3 = 0.731
  Routing<double> r;
  route_select(r, logits.data(), bias.data(), c, 1);
  EXPECT_EQ(r.idx, (std::vector<int32_t>{2, 1}));  // 1.169 > 0.881
  EXPECT_NEAR(r.weight[0], sig(-1.0), 1e-15);     // unbiased score
  EXPECT_NEAR(r.weight[1], sig(2.0), 1e-15);
  // Under greedy the bias is ignored.
  auto g = cfg({{"n_routed_experts", 4}, {"num_experts_per_tok", 2}, {"topk_method", "greedy"}});
  route_select(r, logits.data(), bias.data(), g, 1);
  EXPECT_EQ(r.idx, (std::vector<int32_t>{1, 3}));
}

TEST(Router, SoftmaxScaledWithoutNormalisation) {
  auto c = cfg({{"n_routed_experts", 3}, {"num_experts_per_tok", 1}, {"scoring_func", "softmax"},
                {"topk_method", "greedy"}, {"norm_topk_prob", false}, {"routed_scaling_factor", 2.5}});
  std::vector<double> logits = {0.0, std::log(2.0), std::log(5.0)};  // softmax = 1/8, 2/8, 5/8
  std::vector<float> bias(3, 0.f);
  Routing<double> r;
  route_select(r, logits.data(), bias.data(), c, 1);
  EXPECT_EQ(r.idx[0], 2);
  EXPECT_NEAR(r.weight[0], 2.5 * 5.0 / 8.0, 1e-14);
}

TEST(Router, TiesGoToLowerExpertIndex) {
  auto c = cfg({{"n_routed_experts", 4}, {"num_experts_per_tok", 2}, {"topk_method", "greedy"}});
  std::vector<double> logits = {0.5, 1.0, 1.0, 1.0};
  std::vector<float> bias(4, 0.f);
  Routing<double> r;
  route_select(r, logits.data(), bias.data(), c, 1);
  EXPECT_EQ(r.idx, (std::vector<int32_t>{1, 2}));
}

TEST(Router, GroupLimitedNoauxUsesTopTwoSum) {
  // 8 experts in 4 groups of 2; keep 1 group. sel = s + b.
  // Group 0 has the single best expert but group 1 has the best top-2 sum.
  auto c = cfg({{"n_routed_experts", 8}, {"num_experts_per_tok", 2}, {"n_group", 4}, {"topk_group", 1},
                {"topk_method", "noaux_tc"}});
  std::vector<double> logits = {3.0, -3.0, 1.5, 1.5, 0, 0, -1, -1};
  std::vector<float> bias(8, 0.f);
  Routing<double> r;
  route_select(r, logits.data(), bias.data(), c, 1);
  // group sums: g0 = s(3)+s(-3) = 1.0 ; g1 = 2 s(1.5) = 1.635 -> group 1 wins
  EXPECT_EQ(r.idx, (std::vector<int32_t>{2, 3}));
  // Greedy: group score = max -> group 0 (s(3) = 0.95) wins; both its experts are taken.
  auto g = cfg({{"n_routed_experts", 8}, {"num_experts_per_tok", 2}, {"n_group", 4}, {"topk_group", 1},
                {"topk_method", "greedy"}});
  route_select(r, logits.data(), bias.data(), g, 1);
  EXPECT_EQ(r.idx, (std::vector<int32_t>{0, 1}));
}

TEST(Router, CapacityDropsLowestScoresTiesToLowerToken) {
  // 4 tokens, 2 experts, K=1, capacity_factor 1 -> cap = ceil(1*4*1/2) = 2 per expert.
  auto c = cfg({{"n_routed_experts", 2}, {"num_experts_per_tok", 1}, {"topk_method", "greedy"},
                {"capacity_factor", 1.0}});
  // Every token prefers expert 0; token scores s0: t0 = s(1), t1 = s(3), t2 = s(3), t3 = s(2).
  std::vector<double> logits = {1, -5, 3, -5, 3, -5, 2, -5};
  std::vector<float> bias(2, 0.f);
  Routing<double> r;
  route_select(r, logits.data(), bias.data(), c, 4);
  route_capacity(r, c.capacity_factor);
  EXPECT_EQ(r.counts, (std::vector<int64_t>{4, 0}));  // counted before drops
  EXPECT_EQ(r.kept, (std::vector<uint8_t>{0, 1, 1, 0}));  // keeps t1, t2 (s(3)), drops t3 then t0
  EXPECT_EQ(r.dropped, 2);
  // A tie at the capacity boundary goes to the lower token index.
  std::vector<double> tie = {3, -5, 1, -5, 3, -5, 3, -5};
  route_select(r, tie.data(), bias.data(), c, 4);
  route_capacity(r, c.capacity_factor);
  EXPECT_EQ(r.kept, (std::vector<uint8_t>{1, 0, 1, 0}));
}

TEST(Router, BalanceLossValuesByHand) {
  // 2 tokens (one row), 2 experts, K=1, softmax: p = s.
  auto c = cfg({{"n_routed_experts", 2}, {"num_experts_per_tok", 1}, {"scoring_func", "softmax"},
                {"topk_method", "greedy"}, {"aux_loss_coeff", 1.0}, {"seq_aux_loss_coeff", 1.0},
                {"z_loss_coeff", 1.0}});
  std::vector<double> logits = {std::log(3.0), 0.0, 0.0, std::log(3.0)};  // s = (.75,.25), (.25,.75)
  std::vector<float> bias(2, 0.f);
  Routing<double> r;
  route_select(r, logits.data(), bias.data(), c, 2);
  auto L = balance_forward(r, logits.data(), c, 1, 2, BalanceScales{1.0, 1.0, 1.0});
  // switch: E * sum f_i P_i = 2 * (0.5*0.5 + 0.5*0.5) = 1
  EXPECT_NEAR(L.aux, 1.0, 1e-14);
  // seq: f_i = E/(K T) n_i = 2/2 * 1 = 1; P_i = 0.5 -> sum = 1
  EXPECT_NEAR(L.seq, 1.0, 1e-14);
  // z: mean lse^2 = log(4)^2
  EXPECT_NEAR(L.z, std::log(4.0) * std::log(4.0), 1e-14);
}
