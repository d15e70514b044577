// The RL objective (train/rl_loss.hpp, MODEL.md section 11): finite-difference checks in
// double of the loss head's gradient for every loss_type x importance level x beta, with
// ratios placed on both sides of the clip range for both signs of the advantage; the
// on-policy case (ratio exactly 1); advantages and aggregation weights by hand; the
// log-probabilities and entropies against a naive computation; parity with the float64
// PyTorch reference (tests/reference/rl_ref.py).
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "io/safetensors.hpp"
#include "moe/error.hpp"
#include "test_util.hpp"
#include "train/rl_loss.hpp"
#include "train/sampling.hpp"

using namespace moetune;
using namespace moetune::testing;

namespace {

constexpr int32_t kNo = -100;

// One micro-batch of 4 rows x 6 positions: prompt and padding positions carry -100,
// completion c (0..3) has 3, 4, 2, 3 loss tokens. lp_old = lp - delta with per-token
// deltas chosen so that, with epsilon 0.2 / epsilon_high 0.28, tokens (and, at the
// sequence level, completions) fall inside, above and below the clip range for both
// signs of the advantage, every one at least 0.04 away from a clip boundary.
struct Case {
  static constexpr int64_t N = 24, V = 7;
  std::vector<double> logits;
  std::vector<int32_t> targets, seq;
  std::vector<double> lp_old, lp_ref, adv, weight;
  RlLossConfig cfg;

  Case(const std::string& loss_type, const std::string& level, double beta, double temperature) {
    cfg.loss_type = loss_type;
    cfg.importance_sampling_level = level;
    cfg.epsilon = 0.2;
    cfg.epsilon_high = 0.28;
    cfg.beta = beta;
    cfg.temperature = temperature;
    cfg.max_new_tokens = 5;
    logits = randn(size_t(N * V), 11, 1.5);
    const int first[4] = {2, 1, 3, 2}, len[4] = {3, 4, 2, 3};
    const double A[4] = {0.8, -1.1, 0.5, -0.6};
    const std::vector<std::vector<double>> delta = {
        {0.4, 0.5, 0.05}, {0.1, -0.05, 0.3, -0.28}, {-0.5, -0.6}, {-0.45, -0.4, -0.6}};
    const auto w = completion_token_weights({3, 4, 2, 3}, loss_type, cfg.max_new_tokens);
    targets.assign(N, kNo);
    seq.assign(N, -1);
    adv.assign(N, 0.0);
    weight.assign(N, 0.0);
    std::vector<double> d(N, 0.0);
    auto tgt = randn(N, 12);
    for (int c = 0; c < 4; ++c)
      for (int t = 0; t < len[c]; ++t) {
        const int64_t n = c * 6 + first[c] + t;
        targets[n] = int32_t(std::fabs(tgt[n]) * 1000) % V;
        seq[n] = 10 + 3 * c;  // arbitrary ids
        adv[n] = A[c];
        weight[n] = w[c];
        d[n] = delta[c][t];
      }
    std::vector<double> lp(N);
    token_logprobs(lp.data(), nullptr, logits.data(), targets.data(), N, V, temperature);
    lp_old.assign(N, 0.0);
    lp_ref.assign(N, 0.0);
    auto noise = randn(N, 13, 0.3);
    for (int64_t n = 0; n < N; ++n)
      if (targets[n] >= 0) {
        lp_old[n] = lp[n] - d[n];
        lp_ref[n] = lp[n] + noise[n];
      }
  }
  RlTokens tokens() const {
    return {targets.data(), lp_old.data(), cfg.beta > 0 ? lp_ref.data() : nullptr, adv.data(), weight.data(),
            seq.data()};
  }
};

// d lp_n / d z_nj = (onehot - softmax(z/tau)) / tau, naively.
std::vector<double> naive_dlp_row(const double* z, int64_t V, double tau, int32_t target) {
  double mx = z[0];
  for (int64_t j = 1; j < V; ++j) mx = std::max(mx, z[j]);
  double s = 0;
  for (int64_t j = 0; j < V; ++j) s += std::exp((z[j] - mx) / tau);
  std::vector<double> g(V);
  for (int64_t j = 0; j < V; ++j) g[j] = ((j == target ? 1.0 : 0.0) - std::exp((z[j] - mx) / tau) / s) / tau;
  return g;
}

}  // namespace

TEST(RlLoss, GradientMatchesFiniteDifferences) {
  int cases = 0;
  double worst = 0;
  for (const std::string loss_type : {"token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"})
    for (const std::string level : {"token", "sequence"})
      for (double beta : {0.0, 0.1})
        for (double tau : {1.0, 0.7}) {
          Case k(loss_type, level, beta, tau);
          const RlTokens tok = k.tokens();
          std::vector<double> g(k.N * k.V, 123.0);
          const RlHeadStats st = rl_loss_head(g.data(), k.logits.data(), k.N, k.V, tok, k.cfg);
          const std::string what = loss_type + " / " + level + " / beta " + std::to_string(beta) + " / tau " +
                                   std::to_string(tau);
          ASSERT_EQ(st.tokens, 12) << what;
          // Clipped and unclipped tokens both occur, on both sides.
          EXPECT_GT(st.clipped_low, 0) << what;
          EXPECT_GT(st.clipped_high, 0) << what;
          EXPECT_LT(st.clipped_low + st.clipped_high, st.tokens) << what;
          EXPECT_LT(st.ratio_min, 0.8) << what;
          EXPECT_GT(st.ratio_max, 1.28) << what;
          if (beta == 0) {
            EXPECT_EQ(st.kl_sum, 0.0) << what;
            EXPECT_EQ(st.loss, st.pg_loss) << what;
          } else {
            EXPECT_GT(st.kl_sum, 0.0) << what;
          }
          // Rows without a loss token have a zero gradient.
          for (int64_t n = 0; n < k.N; ++n) {
            if (k.targets[n] >= 0) continue;
            for (int64_t j = 0; j < k.V; ++j) ASSERT_EQ(g[n * k.V + j], 0.0) << what << " row " << n;
          }
          auto f = [&] { return rl_loss_head<double>(nullptr, k.logits.data(), k.N, k.V, tok, k.cfg).loss; };
          // Central differences with h = 1e-5 of a loss of size ~0.1 carry ~1e-12 of
          // rounding: against the 1e-5 * (1 + max|g|) floor that is ~1e-7 relative.
          const double err = check_grad(f, k.logits, g, size_t(k.N * k.V));
          EXPECT_LT(err, 1e-6) << what;
          worst = std::max(worst, err);
          ++cases;
        }
  EXPECT_EQ(cases, 24);
  std::printf("rl_loss_head finite differences: worst relative error %.2e over %d configs\n", worst, cases);
}

TEST(RlLoss, SequenceLevelSharesOneRatioPerCompletion) {
  Case k("token_mean", "sequence", 0.0, 1.0);
  // Completion 0 (deltas 0.4, 0.5, 0.05): every token sees exp(mean delta).
  std::vector<double> lp(k.N);
  rl_loss_head<double>(nullptr, k.logits.data(), k.N, k.V, k.tokens(), k.cfg, lp.data());
  const RlHeadStats st = rl_loss_head<double>(nullptr, k.logits.data(), k.N, k.V, k.tokens(), k.cfg);
  const double r[4] = {std::exp(0.95 / 3), std::exp(0.07 / 4), std::exp(-1.1 / 2), std::exp(-1.45 / 3)};
  EXPECT_NEAR(st.ratio_sum, 3 * r[0] + 4 * r[1] + 2 * r[2] + 3 * r[3], 1e-12);
  EXPECT_NEAR(st.ratio_max, r[0], 1e-13);
  EXPECT_NEAR(st.ratio_min, r[2], 1e-13);
  EXPECT_EQ(st.clipped_high, 3);  // completion 0: ratio 1.37 > 1.28, A > 0
  EXPECT_EQ(st.clipped_low, 3);   // completion 3: ratio 0.62 < 0.8, A < 0
  // pg by hand: completion 0 clipped at 1.28, 1 inside, 2 unclipped below (A > 0), 3 clipped at 0.8.
  const double pg = (-3 * 1.28 * 0.8 + 4 * r[1] * 1.1 - 2 * r[2] * 0.5 + 3 * 0.8 * 0.6) / 12;
  EXPECT_NEAR(st.pg_loss, pg, 1e-13);
  EXPECT_EQ(st.loss, st.pg_loss);
}

TEST(RlLoss, TokenLevelStatsByHand) {
  Case k("seq_mean_token_mean", "token", 0.1, 0.7);
  const RlHeadStats st = rl_loss_head<double>(nullptr, k.logits.data(), k.N, k.V, k.tokens(), k.cfg);
  // Token ratios exp(delta): above 1.28 with A > 0: 0.4, 0.5 (completion 0); below 0.8 with
  // A < 0: -0.28 (completion 1) and all three of completion 3.
  EXPECT_EQ(st.clipped_high, 2);
  EXPECT_EQ(st.clipped_low, 4);
  double pg = 0, kl = 0, loss = 0;
  const double A[4] = {0.8, -1.1, 0.5, -0.6};
  const std::vector<std::vector<double>> delta = {
      {0.4, 0.5, 0.05}, {0.1, -0.05, 0.3, -0.28}, {-0.5, -0.6}, {-0.45, -0.4, -0.6}};
  std::vector<double> lp(k.N);
  token_logprobs(lp.data(), nullptr, k.logits.data(), k.targets.data(), k.N, k.V, 0.7);
  int64_t n = 0;
  for (int c = 0; c < 4; ++c) {
    const double w = 1.0 / (4.0 * double(delta[c].size()));
    for (double d : delta[c]) {
      while (k.targets[n] < 0) ++n;
      const double r = std::exp(d);
      const double t = -std::min(r * A[c], std::min(std::max(r, 0.8), 1.28) * A[c]);
      const double x = k.lp_ref[n] - lp[n];
      pg += w * t;
      kl += std::exp(x) - x - 1;
      loss += w * (t + 0.1 * (std::exp(x) - x - 1));
      ++n;
    }
  }
  EXPECT_NEAR(st.pg_loss, pg, 1e-13);
  EXPECT_NEAR(st.kl_sum, kl, 1e-13);
  EXPECT_NEAR(st.loss, loss, 1e-13);
}

TEST(RlLoss, OnPolicyRatioIsExactlyOne) {
  for (const std::string level : {"token", "sequence"})
    for (double tau : {1.0, 0.7, 0.0}) {
      Case k("seq_mean_token_mean", level, 0.0, tau);
      // pi_old is the same logits: lp_old = token_logprobs of them, bit for bit.
      std::vector<double> lp_old(k.N), ent(k.N);
      token_logprobs(lp_old.data(), ent.data(), k.logits.data(), k.targets.data(), k.N, k.V, tau);
      for (int64_t n = 0; n < k.N; ++n)
        if (k.targets[n] >= 0) {
          k.lp_old[n] = lp_old[n];
          // The rollout's token_logprob gives the same bits.
          const double one = token_logprob(k.logits.data() + n * k.V, k.V, tau, k.targets[n]);
          ASSERT_EQ(std::memcmp(&one, &lp_old[n], sizeof one), 0);
        }
      std::vector<double> g(k.N * k.V), lp(k.N);
      const RlHeadStats st = rl_loss_head(g.data(), k.logits.data(), k.N, k.V, k.tokens(), k.cfg, lp.data());
      EXPECT_EQ(st.ratio_min, 1.0);
      EXPECT_EQ(st.ratio_max, 1.0);
      EXPECT_EQ(st.ratio_sum, 12.0);
      EXPECT_EQ(st.clipped_low + st.clipped_high, 0);
      for (int64_t n = 0; n < k.N; ++n) {
        if (k.targets[n] < 0) {
          EXPECT_TRUE(std::isnan(lp[n]));
          continue;
        }
        EXPECT_EQ(std::memcmp(&lp[n], &lp_old[n], sizeof(double)), 0);
        const double t = tau == 0 ? 1.0 : tau;
        const auto dlp = naive_dlp_row(k.logits.data() + n * k.V, k.V, t, k.targets[n]);
        for (int64_t j = 0; j < k.V; ++j)
          EXPECT_NEAR(g[n * k.V + j], -k.adv[n] * k.weight[n] * dlp[j], 1e-14) << level << " tau " << tau;
      }
      double expect_pg = 0;
      for (int64_t n = 0; n < k.N; ++n)
        if (k.targets[n] >= 0) expect_pg += -k.adv[n] * k.weight[n];
      EXPECT_NEAR(st.pg_loss, expect_pg, 1e-15);
    }
  // In float too: the float logits' own lp_old gives ratio exactly 1.
  Case k("token_mean", "token", 0.0, 0.7);
  std::vector<float> zf(k.logits.begin(), k.logits.end());
  token_logprobs(k.lp_old.data(), nullptr, zf.data(), k.targets.data(), k.N, k.V, 0.7);
  std::vector<float> gf(k.N * k.V);
  const RlHeadStats st = rl_loss_head(gf.data(), zf.data(), k.N, k.V, k.tokens(), k.cfg);
  EXPECT_EQ(st.ratio_min, 1.0);
  EXPECT_EQ(st.ratio_max, 1.0);
}

TEST(RlLoss, KlWithReferenceEqualToPolicyIsZero) {
  Case k("token_mean", "token", 0.1, 1.0);
  std::vector<double> lp(k.N);
  token_logprobs(lp.data(), nullptr, k.logits.data(), k.targets.data(), k.N, k.V, 1.0);
  k.lp_ref = lp;
  std::vector<double> g1(k.N * k.V), g0(k.N * k.V);
  const RlHeadStats s1 = rl_loss_head(g1.data(), k.logits.data(), k.N, k.V, k.tokens(), k.cfg);
  k.cfg.beta = 0;
  const RlHeadStats s0 = rl_loss_head(g0.data(), k.logits.data(), k.N, k.V, k.tokens(), k.cfg);
  EXPECT_EQ(s1.kl_sum, 0.0);
  EXPECT_EQ(s1.loss, s0.loss);
  EXPECT_EQ(g1, g0);
}

TEST(RlLoss, IndependentOfThreadCount) {
  for (const std::string level : {"token", "sequence"}) {
    Case k("seq_mean_token_sum_norm", level, 0.1, 0.7);
    std::vector<float> zf(k.logits.begin(), k.logits.end());
    std::vector<float> g1(k.N * k.V), g3(k.N * k.V);
    const int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    const RlHeadStats a = rl_loss_head(g1.data(), zf.data(), k.N, k.V, k.tokens(), k.cfg);
    omp_set_num_threads(3);
    const RlHeadStats b = rl_loss_head(g3.data(), zf.data(), k.N, k.V, k.tokens(), k.cfg);
    omp_set_num_threads(saved);
    EXPECT_EQ(std::memcmp(&a, &b, sizeof a), 0);
    EXPECT_EQ(std::memcmp(g1.data(), g3.data(), g1.size() * sizeof(float)), 0);
  }
}

TEST(RlLoss, NoLossTokensGiveZeroNotNaN) {
  Case k("token_mean", "sequence", 0.1, 1.0);
  std::fill(k.targets.begin(), k.targets.end(), kNo);
  std::vector<double> g(k.N * k.V, 5.0);
  const RlHeadStats st = rl_loss_head(g.data(), k.logits.data(), k.N, k.V, k.tokens(), k.cfg);
  EXPECT_EQ(st.loss, 0.0);
  EXPECT_EQ(st.tokens, 0);
  for (double v : g) ASSERT_EQ(v, 0.0);
  const auto w = completion_token_weights({0, 0, 0}, "token_mean", 4);
  EXPECT_EQ(w, std::vector<double>(3, 0.0));
}

TEST(RlLoss, AdvantagesByHand) {
  const std::vector<double> r = {1, 2, 3, 0, 0, 1};
  // Groups of 3: means 2 and 1/3; group stds 1 and sqrt(1/3); batch std over all six
  // (mean 7/6): sqrt((1/36 + 25/36 + 121/36 + 49/36 + 49/36 + 1/36) / 5) = sqrt(246/180).
  const double s1 = std::sqrt(1.0 / 3.0), sb = std::sqrt(246.0 / 180.0), e = 1e-4;
  const std::vector<double> group = {-1 / (1 + e), 0, 1 / (1 + e), (-1.0 / 3) / (s1 + e), (-1.0 / 3) / (s1 + e),
                                     (2.0 / 3) / (s1 + e)};
  const std::vector<double> batch = {-1 / (sb + e), 0, 1 / (sb + e), (-1.0 / 3) / (sb + e), (-1.0 / 3) / (sb + e),
                                     (2.0 / 3) / (sb + e)};
  const std::vector<double> none = {-1, 0, 1, -1.0 / 3, -1.0 / 3, 2.0 / 3};
  const auto ag = compute_advantages(r, 3, "group"), ab = compute_advantages(r, 3, "batch"),
             an = compute_advantages(r, 3, "none");
  for (size_t i = 0; i < r.size(); ++i) {
    EXPECT_NEAR(ag[i], group[i], 1e-14) << i;
    EXPECT_NEAR(ab[i], batch[i], 1e-14) << i;
    EXPECT_NEAR(an[i], none[i], 1e-15) << i;
  }
  // A group of equal rewards has advantage exactly 0 (std 0, + 1e-4).
  const auto eq = compute_advantages({0.5, 0.5, 1, 0}, 2, "group");
  EXPECT_EQ(eq[0], 0.0);
  EXPECT_EQ(eq[1], 0.0);
  EXPECT_NEAR(eq[2], 0.5 / (std::sqrt(0.5) + 1e-4), 1e-15);
  // G = 1 is allowed without group scaling (advantage 0: each is its own group mean).
  EXPECT_EQ(compute_advantages({1, 2}, 1, "none"), std::vector<double>({0, 0}));
  EXPECT_EQ(compute_advantages({1, 2}, 1, "batch"), std::vector<double>({0, 0}));
  auto msg = [](const std::vector<double>& rr, int G, const std::string& s) {
    try {
      compute_advantages(rr, G, s);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  const std::string m1 = msg({1, 2}, 1, "group");
  EXPECT_NE(m1.find("rl.num_generations"), std::string::npos) << m1;
  EXPECT_NE(m1.find("rl.scale_rewards"), std::string::npos) << m1;
  EXPECT_NE(msg({1, 2, 3}, 2, "none").find("rl.num_generations"), std::string::npos);
  EXPECT_NE(msg({1, 2}, 0, "none").find("rl.num_generations"), std::string::npos);
  EXPECT_NE(msg({1, 2}, 2, "grop").find("rl.scale_rewards"), std::string::npos);
  EXPECT_NE(msg({1}, 1, "batch").find("rl.scale_rewards"), std::string::npos);
}

TEST(RlLoss, CompletionTokenWeightsPerType) {
  const std::vector<int64_t> n = {3, 0, 5, 2};
  EXPECT_EQ(completion_token_weights(n, "token_mean", 8), std::vector<double>({0.1, 0, 0.1, 0.1}));
  const auto m = completion_token_weights(n, "seq_mean_token_mean", 8);
  EXPECT_DOUBLE_EQ(m[0], 1.0 / 12);
  EXPECT_EQ(m[1], 0.0);
  EXPECT_DOUBLE_EQ(m[2], 1.0 / 20);
  EXPECT_DOUBLE_EQ(m[3], 1.0 / 8);
  EXPECT_EQ(completion_token_weights(n, "seq_mean_token_sum_norm", 8),
            std::vector<double>({1.0 / 32, 0, 1.0 / 32, 1.0 / 32}));
  // Weighted token counts: token_mean and seq_mean_token_mean sum to 1 (when tokens exist).
  double s = 0;
  for (size_t i = 0; i < n.size(); ++i) s += double(n[i]) * m[i];
  EXPECT_NEAR(s, 0.75, 1e-15);  // 3 of 4 completions have tokens; the empty one counts in C
  for (const std::string t : {"token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"}) {
    EXPECT_EQ(completion_token_weights({0, 0}, t, 4), std::vector<double>({0, 0})) << t;
    EXPECT_TRUE(completion_token_weights({}, t, 4).empty()) << t;
  }
  EXPECT_THROW(completion_token_weights(n, "mean", 8), Error);
  EXPECT_THROW(completion_token_weights(n, "seq_mean_token_sum_norm", 0), Error);
  EXPECT_THROW(completion_token_weights({-1}, "token_mean", 1), Error);
}

TEST(RlLoss, ValidateNamesTheKey) {
  auto msg = [](auto mutate) {
    RlLossConfig c;
    mutate(c);
    try {
      validate(c);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_EQ(msg([](RlLossConfig&) {}), "");
  EXPECT_NE(msg([](RlLossConfig& c) { c.loss_type = "dapo"; }).find("rl.loss_type"), std::string::npos);
  EXPECT_NE(msg([](RlLossConfig& c) { c.importance_sampling_level = "seq"; }).find("rl.importance_sampling_level"),
            std::string::npos);
  EXPECT_NE(msg([](RlLossConfig& c) { c.epsilon = -0.1; }).find("rl.epsilon"), std::string::npos);
  EXPECT_NE(msg([](RlLossConfig& c) { c.epsilon = 1.5; }).find("rl.epsilon"), std::string::npos);
  EXPECT_NE(msg([](RlLossConfig& c) { c.epsilon_high = -1; }).find("rl.epsilon_high"), std::string::npos);
  EXPECT_NE(msg([](RlLossConfig& c) { c.beta = -0.01; }).find("rl.beta"), std::string::npos);
  EXPECT_NE(msg([](RlLossConfig& c) { c.beta = NAN; }).find("rl.beta"), std::string::npos);
  EXPECT_NE(msg([](RlLossConfig& c) { c.temperature = -1; }).find("rl.temperature"), std::string::npos);
  EXPECT_NE(msg([](RlLossConfig& c) { c.max_new_tokens = 0; }).find("rl.max_new_tokens"), std::string::npos);
}

TEST(RlLoss, TokenLogprobsAndEntropyMatchNaive) {
  const int64_t N = 5, V = 9;
  auto zd = randn(N * V, 21, 2.0);
  zd[3 * V + 4] = -std::numeric_limits<double>::infinity();  // a masked logit: p = 0, no NaN
  const std::vector<int32_t> targets = {3, kNo, 0, 8, 5};
  for (double tau : {1.0, 0.6, 0.0}) {
    const double t = tau == 0 ? 1.0 : tau;
    std::vector<double> lp(N), ent(N);
    token_logprobs(lp.data(), ent.data(), zd.data(), targets.data(), N, V, tau);
    for (int64_t n = 0; n < N; ++n) {
      if (targets[n] < 0) {
        EXPECT_TRUE(std::isnan(lp[n]) && std::isnan(ent[n]));
        continue;
      }
      double s = 0;
      for (int64_t j = 0; j < V; ++j) s += std::exp(zd[n * V + j] / t);
      double h = 0;
      for (int64_t j = 0; j < V; ++j) {
        const double p = std::exp(zd[n * V + j] / t) / s;
        if (p > 0) h -= p * std::log(p);
      }
      EXPECT_NEAR(lp[n], std::log(std::exp(zd[n * V + targets[n]] / t) / s), 1e-12);
      EXPECT_NEAR(ent[n], h, 1e-12);
    }
  }
  // Statistical: the mean of -lp over tokens sampled from softmax(z / tau) estimates the
  // entropy (sampling and log-probabilities agree on the distribution).
  const double tau = 0.8;
  const double* z = zd.data() + 2 * V;
  std::vector<double> lp_all(V);
  std::vector<int32_t> all(V);
  for (int64_t j = 0; j < V; ++j) all[j] = int32_t(j);
  std::vector<double> rep(V * V);
  for (int64_t j = 0; j < V; ++j) std::copy(z, z + V, rep.begin() + j * V);
  std::vector<double> ent_all(V);
  token_logprobs(lp_all.data(), ent_all.data(), rep.data(), all.data(), V, V, tau);
  SamplingConfig sc;
  sc.temperature = tau;
  std::vector<std::pair<double, int32_t>> scratch;
  const int draws = 100000;
  double m = 0, m2 = 0;
  for (int i = 0; i < draws; ++i) {
    const double x = -lp_all[sample_token(z, V, sc, sampling_uniform(3, 1, 2, 0, i), scratch)];
    m += x;
    m2 += x * x;
  }
  m /= draws;
  const double sd = std::sqrt(m2 / draws - m * m) / std::sqrt(double(draws));
  EXPECT_NEAR(m, ent_all[0], 5 * sd) << "sd of the mean " << sd;
}

// ------------------------------------------------------------------ PyTorch parity
// tests/fixtures/rl_head/*.safetensors, written by tests/reference/rl_ref.py (float64
// torch, autograd gradient): advantages, weights, every loss term and dlogits, in double
// (1e-9 relative) and with float logits (1e-5: the logits are float-representable and
// the head accumulates in double, so only the output rounding differs).
namespace {

std::vector<double> read_all(const SafetensorsReader& r, const std::string& name) {
  const auto& t = r.at(name);
  std::vector<double> v(size_t(t.numel()));
  r.read(name, v.data(), v.size());
  return v;
}

// |a - b| / max(|b|, floor)
double scalar_err(double a, double b, double floor = 1e-12) {
  if (a == b) return 0;  // also +-inf
  return std::fabs(a - b) / std::max(std::fabs(b), floor);
}

template <class T>
double tensor_err(const std::vector<T>& a, const std::vector<double>& b) {
  double diff = 0, scale = 1e-30;
  for (size_t i = 0; i < b.size(); ++i) {
    diff = std::max(diff, std::fabs(double(a[i]) - b[i]));
    scale = std::max(scale, std::fabs(b[i]));
  }
  return diff / scale;
}

struct ParityWorst {
  double terms = 0, dlogits = 0, lp = 0;
};

template <class T>
ParityWorst check_rl_fixture(const std::string& path, double tol) {
  SafetensorsReader r(path);
  const auto& md = r.metadata();
  RlLossConfig c;
  c.loss_type = md.at("loss_type");
  c.importance_sampling_level = md.at("importance_sampling_level");
  c.epsilon = std::stod(md.at("epsilon"));
  c.epsilon_high = std::stod(md.at("epsilon_high"));
  c.beta = std::stod(md.at("beta"));
  c.temperature = std::stod(md.at("temperature"));
  c.max_new_tokens = std::stoi(md.at("max_new_tokens"));
  validate(c);
  EXPECT_GE(std::stod(md.at("clip_margin")), 1e-3) << path;
  const auto logits_d = read_all(r, "logits");
  const auto tgt = read_all(r, "targets"), sq = read_all(r, "seq");
  const int64_t N = int64_t(tgt.size()), V = int64_t(logits_d.size()) / N;
  std::vector<int32_t> targets(N), seq(N);
  for (int64_t n = 0; n < N; ++n) {
    targets[n] = int32_t(tgt[n]);
    seq[n] = int32_t(sq[n]);
  }
  const auto lp_old = read_all(r, "lp_old"), lp_ref = read_all(r, "lp_ref"), adv = read_all(r, "advantage"),
             weight = read_all(r, "weight");
  ParityWorst worst;
  // Advantages and weights of the completions.
  const auto rewards = read_all(r, "rewards"), lt = read_all(r, "loss_tokens");
  const auto adv_c = compute_advantages(rewards, std::stoi(md.at("num_generations")), md.at("scale_rewards"));
  const auto exp_adv = read_all(r, "adv_completion");
  std::vector<int64_t> loss_tokens(lt.begin(), lt.end());
  const auto w_c = completion_token_weights(loss_tokens, c.loss_type, c.max_new_tokens);
  const auto exp_w = read_all(r, "weight_completion");
  for (size_t i = 0; i < adv_c.size(); ++i) {
    worst.terms = std::max(worst.terms, scalar_err(adv_c[i], exp_adv[i]));
    worst.terms = std::max(worst.terms, scalar_err(w_c[i], exp_w[i]));
  }

  std::vector<T> logits(logits_d.begin(), logits_d.end()), dlogits(size_t(N * V));
  std::vector<double> lp(N);
  const RlTokens tok{targets.data(), lp_old.data(), c.beta > 0 ? lp_ref.data() : nullptr, adv.data(), weight.data(),
                     seq.data()};
  const RlHeadStats st = rl_loss_head(dlogits.data(), logits.data(), N, V, tok, c, lp.data());
  const std::pair<const char*, double> terms[] = {
      {"loss", st.loss},           {"pg_loss", st.pg_loss},     {"kl_sum", st.kl_sum},
      {"entropy_sum", st.entropy_sum}, {"ratio_sum", st.ratio_sum}, {"ratio_min", st.ratio_min},
      {"ratio_max", st.ratio_max}, {"lp_sum", st.lp_sum}};
  for (auto [name, got] : terms) {
    const double e = scalar_err(got, read_all(r, name)[0]);
    EXPECT_LT(e, tol) << path << " " << name << ": " << got << " vs " << read_all(r, name)[0];
    worst.terms = std::max(worst.terms, e);
  }
  EXPECT_EQ(double(st.tokens), read_all(r, "tokens")[0]) << path;
  EXPECT_EQ(double(st.clipped_low), read_all(r, "clipped_low")[0]) << path;
  EXPECT_EQ(double(st.clipped_high), read_all(r, "clipped_high")[0]) << path;
  worst.dlogits = tensor_err(dlogits, read_all(r, "dlogits"));
  EXPECT_LT(worst.dlogits, tol) << path << " dlogits";
  auto exp_lp = read_all(r, "lp");
  for (int64_t n = 0; n < N; ++n)
    if (targets[n] < 0) {
      EXPECT_TRUE(std::isnan(lp[n])) << path << " position " << n;
      lp[n] = 0;
    }
  worst.lp = tensor_err(lp, exp_lp);
  EXPECT_LT(worst.lp, tol) << path << " lp";
  return worst;
}

}  // namespace

TEST(RlLoss, ParityWithPyTorchReference) {
  namespace fs = std::filesystem;
  std::string root = std::string(MOETUNE_SOURCE_DIR) + "/tests/fixtures";
  if (const char* env = std::getenv("MOETUNE_FIXTURE_ROOT")) root = env;
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(fs::path(root) / "rl_head"))
    if (e.path().extension() == ".safetensors") files.push_back(e.path().string());
  std::sort(files.begin(), files.end());
  ASSERT_EQ(files.size(), 12u) << "expected one fixture per loss_type x level x beta";
  ParityWorst wd, wf;
  for (const auto& f : files) {
    const ParityWorst d = check_rl_fixture<double>(f, 1e-9);
    const ParityWorst s = check_rl_fixture<float>(f, 1e-5);
    wd = {std::max(wd.terms, d.terms), std::max(wd.dlogits, d.dlogits), std::max(wd.lp, d.lp)};
    wf = {std::max(wf.terms, s.terms), std::max(wf.dlogits, s.dlogits), std::max(wf.lp, s.lp)};
  }
  std::printf("rl_head parity over %zu fixtures, worst relative error: double terms %.2e dlogits %.2e lp %.2e; "
              "float terms %.2e dlogits %.2e lp %.2e\n",
              files.size(), wd.terms, wd.dlogits, wd.lp, wf.terms, wf.dlogits, wf.lp);
}
