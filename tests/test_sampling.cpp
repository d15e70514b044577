// Sampling of rollout tokens (train/sampling.hpp, MODEL.md section 10): hand-computed
// cases for each filter and its ties, the u -> token mapping at its boundaries, the
// counter-based uniform, and a statistical check of the sampled frequencies.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <set>
#include <vector>

#include "moe/error.hpp"
#include "train/sampling.hpp"

using namespace moetune;

namespace {

using Scratch = std::vector<std::pair<double, int32_t>>;

template <class T>
int32_t draw(const std::vector<T>& z, SamplingConfig c, double u) {
  Scratch s;
  return sample_token(z.data(), int64_t(z.size()), c, u, s);
}

SamplingConfig cfg(double temperature, int top_k = 0, double top_p = 1.0) {
  SamplingConfig c;
  c.temperature = temperature;
  c.top_k = top_k;
  c.top_p = top_p;
  return c;
}

// The filtered distribution of section 10 written out naively: indices sorted by
// (-x, id) with x = z / tau, top_k, softmax, top_p prefix, renormalised.
std::vector<std::pair<int32_t, double>> filtered(const std::vector<double>& z, SamplingConfig c) {
  std::vector<int32_t> ids(z.size());
  for (size_t i = 0; i < z.size(); ++i) ids[i] = int32_t(i);
  std::stable_sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return z[a] > z[b]; });
  if (c.top_k > 0 && size_t(c.top_k) < ids.size()) ids.resize(size_t(c.top_k));
  std::vector<double> p;
  double s = 0;
  for (int32_t i : ids) s += std::exp(z[i] / c.temperature - z[ids[0]] / c.temperature);
  for (int32_t i : ids) p.push_back(std::exp(z[i] / c.temperature - z[ids[0]] / c.temperature) / s);
  size_t keep = ids.size();
  double cum = 0;
  for (size_t i = 0; i < ids.size() && c.top_p < 1; ++i) {
    cum += p[i];
    if (cum >= c.top_p) {
      keep = i + 1;
      break;
    }
  }
  double ks = 0;
  for (size_t i = 0; i < keep; ++i) ks += p[i];
  std::vector<std::pair<int32_t, double>> out;
  for (size_t i = 0; i < keep; ++i) out.push_back({ids[i], p[i] / ks});
  return out;
}

}  // namespace

TEST(Sampling, GreedyTiesGoToLowerId) {
  const std::vector<double> z = {0.5, 2.0, -1.0, 2.0, 1.9};
  for (double u : {0.0, 0.5, 0.999999}) EXPECT_EQ(draw(z, cfg(0.0), u), 1);
  const std::vector<float> zf = {3.f, 3.f, 3.f};
  EXPECT_EQ(draw(zf, cfg(0.0, 2, 0.5), 0.9), 0);  // top_k/top_p do not matter when greedy
  const std::vector<double> last = {-5, -4, -3, -2, 7};
  EXPECT_EQ(draw(last, cfg(0.0), 0.3), 4);
}

TEST(Sampling, TopKTiesGoToLowerId) {
  // Four equal logits and one lower: top_k = 2 keeps ids 0 and 2 (ties to the lower id),
  // each with probability 1/2.
  const std::vector<double> z = {1.0, -3.0, 1.0, 1.0, 1.0};
  EXPECT_EQ(draw(z, cfg(1.0, 2), 0.0), 0);
  EXPECT_EQ(draw(z, cfg(1.0, 2), 0.4999), 0);
  EXPECT_EQ(draw(z, cfg(1.0, 2), 0.5), 2);  // the cumulative must exceed u
  EXPECT_EQ(draw(z, cfg(1.0, 2), 0.9999), 2);
  // top_k = 1 is greedy (lowest id among the maxima), whatever u.
  EXPECT_EQ(draw(z, cfg(1.0, 1), 0.99), 0);
  // top_k >= V keeps everything: the sorted order is 0, 2, 3, 4, 1.
  const double e = std::exp(-4.0), tot = 4 + e;
  EXPECT_EQ(draw(z, cfg(1.0, 5), 3.5 / tot), 4);
  EXPECT_EQ(draw(z, cfg(1.0, 9), (4 + 0.5 * e) / tot), 1);
  EXPECT_EQ(draw(z, cfg(1.0, 0), (4 + 0.5 * e) / tot), 1);
}

TEST(Sampling, TopPPrefixBoundaries) {
  // Four equal logits: probabilities exactly 1/4 each, sorted order 0, 1, 2, 3.
  const std::vector<double> z = {0.0, 0.0, 0.0, 0.0};
  // top_p = 0.5 exactly: the prefix {0, 1} reaches 0.5 (>= p), renormalised to 1/2 each.
  EXPECT_EQ(draw(z, cfg(1.0, 0, 0.5), 0.4999), 0);
  EXPECT_EQ(draw(z, cfg(1.0, 0, 0.5), 0.5), 1);
  EXPECT_EQ(draw(z, cfg(1.0, 0, 0.5), 0.9999), 1);
  // Just above 0.5: three tokens kept, 1/3 each.
  EXPECT_EQ(draw(z, cfg(1.0, 0, 0.5000001), 0.9999), 2);
  EXPECT_EQ(draw(z, cfg(1.0, 0, 0.5000001), 0.6), 1);
  // A tiny p keeps at least one token: always id 0.
  EXPECT_EQ(draw(z, cfg(1.0, 0, 1e-9), 0.9999), 0);
  // Probabilities 1/2, 1/4, 1/8, 1/8 (logits log2 of those): top_p = 0.7 keeps {3, 1}
  // (cumulative 0.5, 0.75), renormalised 2/3, 1/3. Sorting is by probability, not id.
  const std::vector<double> w = {std::log(0.125), std::log(0.25), std::log(0.125), std::log(0.5)};
  EXPECT_EQ(draw(w, cfg(1.0, 0, 0.7), 0.66), 3);
  EXPECT_EQ(draw(w, cfg(1.0, 0, 0.7), 0.67), 1);
  EXPECT_EQ(draw(w, cfg(1.0, 0, 0.7), 0.9999), 1);
  // top_p = 0.8: {3, 1, 0} (0 before 2: equal probability, lower id).
  EXPECT_EQ(draw(w, cfg(1.0, 0, 0.8), 0.9999), 0);
  // top_p = 1 keeps all four; the last of the sorted order is id 2.
  EXPECT_EQ(draw(w, cfg(1.0, 0, 1.0), 0.9999), 2);
  EXPECT_EQ(draw(w, cfg(1.0, 0, 1.0), 0.8), 0);
  // top_k then top_p: top_k = 3 keeps {3, 1, 0} (0 wins the tie with 2), renormalised to
  // 4/7, 2/7, 1/7; top_p = 0.8 then keeps two (4/7 + 2/7 = 0.857 >= 0.8), 0.9 all three.
  EXPECT_EQ(draw(w, cfg(1.0, 3, 0.8), 0.9999), 1);
  EXPECT_EQ(draw(w, cfg(1.0, 3, 0.9), 0.9999), 0);
}

TEST(Sampling, TemperatureScalesLogits) {
  // z = (0, log 3): at tau = 1 probabilities 1/4, 3/4; at tau = 0.5 they are 1/10, 9/10;
  // at tau = 2, 1/(1+sqrt3), sqrt3/(1+sqrt3). Sorted order is 1, 0.
  const std::vector<double> z = {0.0, std::log(3.0)};
  EXPECT_EQ(draw(z, cfg(1.0), 0.7499), 1);
  EXPECT_EQ(draw(z, cfg(1.0), 0.7501), 0);
  EXPECT_EQ(draw(z, cfg(0.5), 0.8999), 1);
  EXPECT_EQ(draw(z, cfg(0.5), 0.9001), 0);
  const double p2 = std::sqrt(3.0) / (1 + std::sqrt(3.0));
  EXPECT_EQ(draw(z, cfg(2.0), p2 - 1e-4), 1);
  EXPECT_EQ(draw(z, cfg(2.0), p2 + 1e-4), 0);
  // top_p sees the tempered distribution: 0.8 keeps only id 1 at tau = 0.5, both at 1.
  EXPECT_EQ(draw(z, cfg(0.5, 0, 0.8), 0.9999), 1);
  EXPECT_EQ(draw(z, cfg(1.0, 0, 0.8), 0.9999), 0);
  // Float logits give the same draws.
  const std::vector<float> zf = {0.f, float(std::log(3.0))};
  EXPECT_EQ(draw(zf, cfg(0.5), 0.85), 1);
  EXPECT_EQ(draw(zf, cfg(0.5), 0.95), 0);
}

TEST(Sampling, UniformBoundaryMapping) {
  // u = 0 gives the most probable token; u just below 1 the last kept one, even when
  // rounding of the cumulative sum leaves it short of 1.
  const std::vector<double> z = {0.1, 0.7, -0.3, 0.2, 0.7, -2.0, 0.0};
  const double below_one = std::nextafter(1.0, 0.0);
  EXPECT_EQ(draw(z, cfg(1.0), 0.0), 1);
  EXPECT_EQ(draw(z, cfg(1.0), below_one), 5);
  EXPECT_EQ(draw(z, cfg(1.0, 3), below_one), 3);
  // Every u of a fine grid maps to the token whose cumulative interval contains it.
  auto f = filtered(z, cfg(0.8, 0, 0.9));
  double lo = 0;
  for (auto [id, p] : f) {
    const double hi = lo + p;
    EXPECT_EQ(draw(z, cfg(0.8, 0, 0.9), lo + 0.01 * p), id);
    EXPECT_EQ(draw(z, cfg(0.8, 0, 0.9), hi - 0.01 * p), id);
    lo = hi;
  }
}

TEST(Sampling, UniformDependsOnEveryKeyPart) {
  const double base = sampling_uniform(7, 3, 11, 2, 40);
  EXPECT_EQ(base, sampling_uniform(7, 3, 11, 2, 40));
  EXPECT_NE(base, sampling_uniform(8, 3, 11, 2, 40));
  EXPECT_NE(base, sampling_uniform(7, 4, 11, 2, 40));
  EXPECT_NE(base, sampling_uniform(7, 3, 12, 2, 40));
  EXPECT_NE(base, sampling_uniform(7, 3, 11, 3, 40));
  EXPECT_NE(base, sampling_uniform(7, 3, 11, 2, 41));
  // Swapping two parts changes the value too (the key is ordered).
  EXPECT_NE(sampling_uniform(1, 2, 3, 4, 5), sampling_uniform(1, 3, 2, 4, 5));
  // In [0, 1), all distinct over a small grid, with mean about 1/2.
  std::set<double> seen;
  double sum = 0;
  int n = 0;
  for (int64_t step = 0; step < 4; ++step)
    for (int64_t prompt = 0; prompt < 8; ++prompt)
      for (int64_t sample = 0; sample < 4; ++sample)
        for (int64_t pos = 0; pos < 32; ++pos) {
          const double u = sampling_uniform(0, step, prompt, sample, pos);
          ASSERT_GE(u, 0.0);
          ASSERT_LT(u, 1.0);
          seen.insert(u);
          sum += u;
          ++n;
        }
  EXPECT_EQ(int(seen.size()), n);
  EXPECT_NEAR(sum / n, 0.5, 0.02);  // sd of the mean: 0.29 / sqrt(4096) = 0.0045
}

TEST(Sampling, FrequenciesMatchFilteredDistribution) {
  const std::vector<double> z = {1.2, -0.4, 0.3, 2.0, 0.3, -1.5, 0.9, 0.0, 1.7, -0.8};
  const SamplingConfig configs[] = {cfg(1.0), cfg(0.7, 5), cfg(1.3, 0, 0.85), cfg(0.9, 6, 0.7)};
  Scratch s;
  for (const auto& c : configs) {
    const auto f = filtered(z, c);
    const int n = 200000;
    std::map<int32_t, int> count;
    for (int i = 0; i < n; ++i) ++count[sample_token(z.data(), int64_t(z.size()), c, sampling_uniform(5, 0, 0, 0, i), s)];
    double chi2 = 0;
    int total = 0;
    for (auto [id, p] : f) {
      const double e = p * n;
      chi2 += (count[id] - e) * (count[id] - e) / e;
      total += count[id];
    }
    EXPECT_EQ(total, n) << "a token outside the filtered set was drawn";
    // chi-squared with at most 9 degrees of freedom: P(chi2 > 30) < 5e-4.
    EXPECT_LT(chi2, 30.0) << "temperature " << c.temperature << " top_k " << c.top_k << " top_p " << c.top_p;
  }
}

TEST(Sampling, TokenLogprobIsTemperedLogSoftmax) {
  const std::vector<double> z = {0.5, -1.0, 2.0, 0.0};
  for (double tau : {1.0, 0.7, 2.5}) {
    double s = 0;
    for (double v : z) s += std::exp(v / tau);
    for (int32_t id = 0; id < 4; ++id) EXPECT_NEAR(token_logprob(z.data(), 4, tau, id), z[id] / tau - std::log(s), 1e-14);
  }
  // tau = 0 (greedy rollouts) uses tau = 1.
  EXPECT_EQ(token_logprob(z.data(), 4, 0.0, 2), token_logprob(z.data(), 4, 1.0, 2));
  const std::vector<float> zf = {0.5f, -1.0f, 2.0f, 0.0f};
  EXPECT_NEAR(token_logprob(zf.data(), 4, 0.7, 1), token_logprob(z.data(), 4, 0.7, 1), 1e-12);
  EXPECT_THROW(token_logprob(z.data(), 4, 1.0, 4), Error);
}

TEST(Sampling, ValidateNamesTheKey) {
  auto msg = [](SamplingConfig c) {
    try {
      validate(c);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_EQ(msg(cfg(1.0, 0, 1.0)), "");
  EXPECT_EQ(msg(cfg(0.0, 3, 0.5)), "");
  EXPECT_NE(msg(cfg(-0.1)).find("rl.temperature"), std::string::npos);
  EXPECT_NE(msg(cfg(NAN)).find("rl.temperature"), std::string::npos);
  EXPECT_NE(msg(cfg(1.0, -1)).find("rl.top_k"), std::string::npos);
  EXPECT_NE(msg(cfg(1.0, 0, 0.0)).find("rl.top_p"), std::string::npos);
  EXPECT_NE(msg(cfg(1.0, 0, 1.01)).find("rl.top_p"), std::string::npos);
  EXPECT_NE(msg(cfg(1.0, 0, NAN)).find("rl.top_p"), std::string::npos);
}
