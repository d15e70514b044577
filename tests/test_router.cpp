// Router unit tests against hand-computed cases: selection, bias, groups, ties,
// weight normalisation/scaling, capacity drops, expert counts; DeepSeek-V4's
// sqrtsoftplus scores, hash routing and its default table.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "moe/init.hpp"
#include "moe/router.hpp"
#include "test_util.hpp"

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

// DeepSeek-V4 (MODEL.md section 12) ------------------------------------------------

TEST(Router, SqrtSoftplusScoresBiasedSelectionNormalisedWeights) {
  auto c = cfg({{"n_routed_experts", 4}, {"num_experts_per_tok", 2}, {"scoring_func", "sqrtsoftplus"},
                {"topk_method", "noaux_tc"}, {"routed_scaling_factor", 2.0}});
  std::vector<double> logits = {0.1, 2.0, -1.0, 1.0};
  std::vector<float> bias = {0.f, 0.f, 1.0f, 0.f};  // s2 + 1 = 1.56 > s3 = 1.15 and > s1 = 1.46
  auto ssp = [](double x) { return std::sqrt(std::log1p(std::exp(x))); };
  Routing<double> r;
  route_select(r, logits.data(), bias.data(), c, 1);
  for (int e = 0; e < 4; ++e) EXPECT_NEAR(r.scores[e], ssp(logits[e]), 1e-15);
  EXPECT_EQ(r.idx, (std::vector<int32_t>{2, 1}));
  const double s2 = ssp(-1.0), s1 = ssp(2.0);  // weights from the unbiased scores
  EXPECT_NEAR(r.weight[0], 2.0 * s2 / (s2 + s1), 1e-15);
  EXPECT_NEAR(r.weight[1], 2.0 * s1 / (s2 + s1), 1e-15);
  // Large logits do not overflow: sqrt(softplus(x)) = sqrt(x) + O(e^-x).
  std::vector<double> big = {800.0, -800.0, 0.0, 30.0};
  route_select(r, big.data(), bias.data(), c, 1);
  EXPECT_NEAR(r.scores[0], std::sqrt(800.0), 1e-12);
  EXPECT_EQ(r.scores[1], 0.0);  // softplus underflows to 0: a score of exactly 0, no NaN
  EXPECT_NEAR(r.scores[2], std::sqrt(std::log(2.0)), 1e-15);
  std::vector<double> dl(4), dw = {1.0, 1.0};
  router_backward(dl.data(), dw.data(), big.data(), r, c, 1, 1, BalanceScales{});
  for (double v : dl) EXPECT_TRUE(std::isfinite(v));
}

TEST(Router, HashRoutingTakesTheTableRowIgnoringBiasAndGroups) {
  // 6 experts in 3 groups, topk_group 1: a live layer could only pick inside one group.
  auto c = cfg({{"n_routed_experts", 6}, {"num_experts_per_tok", 2}, {"n_group", 3}, {"topk_group", 1},
                {"vocab_size", 3}, {"num_hash_layers", 1}, {"scoring_func", "sqrtsoftplus"}});
  const std::vector<int32_t> table = {5, 0, 2, 3, 1, 4};  // token 0 -> {5, 0} spans two groups
  const std::vector<int32_t> ids = {0, 2, 0};
  std::vector<double> logits(3 * 6);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = 0.3 * double(i % 7) - 1.0;
  Routing<double> r;
  route_hash(r, logits.data(), ids.data(), table.data(), c, 3);
  EXPECT_EQ(r.idx, (std::vector<int32_t>{5, 0, 1, 4, 5, 0}));
  EXPECT_EQ(r.counts, (std::vector<int64_t>{2, 1, 0, 0, 1, 2}));
  EXPECT_EQ(r.kept, (std::vector<uint8_t>(6, 1)));
  for (int t = 0; t < 3; ++t) {
    const double* s = r.scores.data() + t * 6;
    const int32_t* id = r.idx.data() + t * 2;
    EXPECT_NEAR(r.weight[t * 2], s[id[0]] / (s[id[0]] + s[id[1]]), 1e-15);
    EXPECT_NEAR(r.weight[t * 2 + 1], s[id[1]] / (s[id[0]] + s[id[1]]), 1e-15);
  }
  std::vector<int32_t> bad_ids = {0, 3, 0};
  EXPECT_THROW(route_hash(r, logits.data(), bad_ids.data(), table.data(), c, 3), std::out_of_range);
}

TEST(Router, DefaultHashTableIsDistinctDeterministicAndSeeded) {
  auto c = cfg({{"n_routed_experts", 8}, {"num_experts_per_tok", 3}, {"vocab_size", 50}, {"num_hash_layers", 2}});
  const auto a = init_tid2eid(c, 7, 1), b = init_tid2eid(c, 7, 1), other_seed = init_tid2eid(c, 8, 1),
             other_layer = init_tid2eid(c, 7, 2);
  ASSERT_EQ(a.size(), 150u);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, other_seed);
  EXPECT_NE(a, other_layer);
  std::vector<int64_t> load(8, 0);
  for (int v = 0; v < 50; ++v) {
    std::vector<int32_t> row(a.begin() + v * 3, a.begin() + v * 3 + 3);
    for (int32_t e : row) {
      ASSERT_GE(e, 0);
      ASSERT_LT(e, 8);
      load[e]++;
    }
    std::sort(row.begin(), row.end());
    EXPECT_EQ(std::unique(row.begin(), row.end()), row.end()) << "token " << v << " repeats an expert";
  }
  for (int e = 0; e < 8; ++e) EXPECT_GT(load[e], 5) << "expert " << e << " is (almost) never drawn";
  // K = E: every row is a permutation.
  auto full = cfg({{"n_routed_experts", 4}, {"num_experts_per_tok", 4}, {"vocab_size", 5}, {"num_hash_layers", 1}});
  const auto p = init_tid2eid(full, 1, 1);
  for (int v = 0; v < 5; ++v) {
    std::vector<int32_t> row(p.begin() + v * 4, p.begin() + v * 4 + 4);
    std::sort(row.begin(), row.end());
    EXPECT_EQ(row, (std::vector<int32_t>{0, 1, 2, 3}));
  }
}

TEST(Router, V4ConfigKeysAreValidatedByName) {
  using moetune::testing::error_of;
  auto msg = [](nlohmann::json j) {
    j["hidden_size"] = 8;
    j["num_attention_heads"] = 2;
    return error_of([&] { ModelConfig::from_json(j, "cfg.json"); });
  };
  EXPECT_CONTAINS(msg({{"scoring_func", "sqrt_softplus"}}), "key 'scoring_func'");
  EXPECT_CONTAINS(msg({{"num_hash_layers", -1}}), "key 'num_hash_layers'");
  // 4 layers, first one dense: 3 MoE layers.
  EXPECT_CONTAINS(msg({{"num_hash_layers", 4}}), "key 'num_hash_layers'");
  EXPECT_EQ(msg({{"num_hash_layers", 3}}), moetune::testing::kNoError);
  EXPECT_EQ(msg({{"num_hash_layers", 4}, {"first_k_dense_replace", 0}}), moetune::testing::kNoError);
  EXPECT_CONTAINS(msg({{"swiglu_limit", -1.0}}), "key 'swiglu_limit'");
  EXPECT_CONTAINS(msg({{"swiglu_limit", "7"}}), "key 'swiglu_limit'");
  EXPECT_EQ(msg({{"scoring_func", "sqrtsoftplus"}, {"n_group", 2}, {"topk_group", 1}, {"swiglu_limit", 7.0}}),
            moetune::testing::kNoError);
  // The new keys round-trip through config.json.
  auto c = cfg({{"num_hash_layers", 2}, {"swiglu_limit", 10.0}, {"scoring_func", "sqrtsoftplus"}});
  auto back = ModelConfig::from_json(c.to_json());
  EXPECT_EQ(back.num_hash_layers, 2);
  EXPECT_EQ(back.swiglu_limit, 10.0);
  EXPECT_TRUE(back.sqrtsoftplus());
  // --set re-validates against the layer count.
  EXPECT_CONTAINS(error_of([&] { c.set("first_k_dense_replace", "3"); }), "key 'num_hash_layers'");
}
