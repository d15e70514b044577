#include "train/sampling.hpp"

#include <algorithm>
#include <cmath>
#include <string>

#include "moe/error.hpp"
#include "train/log_softmax_row.hpp"

namespace moetune {
namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Sampling order: higher value first, ties to the lower id.
bool before(const std::pair<double, int32_t>& a, const std::pair<double, int32_t>& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
}

}  // namespace

void validate(const SamplingConfig& c) {
  if (!std::isfinite(c.temperature) || c.temperature < 0)
    throw Error("rl.temperature must be a finite number >= 0 (0 = greedy), got " + std::to_string(c.temperature));
  if (c.top_k < 0) throw Error("rl.top_k must be >= 0 (0 = off), got " + std::to_string(c.top_k));
  if (!(c.top_p > 0 && c.top_p <= 1))
    throw Error("rl.top_p must be in (0, 1] (1 = off), got " + std::to_string(c.top_p));
}

double sampling_uniform(uint64_t seed, int64_t step, int64_t prompt, int64_t sample, int64_t position) {
  uint64_t h = splitmix64(seed);
  h = splitmix64(h ^ uint64_t(step));
  h = splitmix64(h ^ uint64_t(prompt));
  h = splitmix64(h ^ uint64_t(sample));
  h = splitmix64(h ^ uint64_t(position));
  return double(h >> 11) * (1.0 / 9007199254740992.0);
}

template <class T>
int32_t sample_token(const T* z, int64_t V, const SamplingConfig& c, double u,
                     std::vector<std::pair<double, int32_t>>& scratch) {
  if (V <= 0) throw Error("sample_token: empty vocabulary");
  if (c.temperature == 0) {  // greedy: the first maximum is the lowest id
    int64_t best = 0;
    for (int64_t j = 1; j < V; ++j)
      if (double(z[j]) > double(z[best])) best = j;
    return int32_t(best);
  }
  // 1-2. x = z / tau, then the top_k largest (ties to the lower id).
  scratch.resize(size_t(V));
  for (int64_t j = 0; j < V; ++j) scratch[size_t(j)] = {double(z[j]) / c.temperature, int32_t(j)};
  if (c.top_k > 0 && c.top_k < V) {
    std::nth_element(scratch.begin(), scratch.begin() + (c.top_k - 1), scratch.end(), before);
    scratch.resize(size_t(c.top_k));
  }
  // 3. unnormalised probabilities exp(x - max) of the kept tokens, sorted (desc, ties to
  // the lower id); the sum of the sorted list is the normaliser.
  double mx = scratch[0].first;
  for (const auto& e : scratch) mx = std::max(mx, e.first);
  for (auto& e : scratch) e.first = std::exp(e.first - mx);
  std::sort(scratch.begin(), scratch.end(), before);
  double total = 0;
  for (const auto& e : scratch) total += e.first;
  size_t kept = scratch.size();
  if (c.top_p < 1) {
    double cum = 0;
    for (size_t i = 0; i < scratch.size(); ++i) {
      cum += scratch[i].first / total;
      if (cum >= c.top_p) {
        kept = i + 1;
        break;
      }
    }
  }
  // 4. renormalise over the kept prefix and invert the cumulative distribution at u.
  double kept_total = 0;
  for (size_t i = 0; i < kept; ++i) kept_total += scratch[i].first;
  double cum = 0;
  for (size_t i = 0; i < kept; ++i) {
    cum += scratch[i].first / kept_total;
    if (cum > u) return scratch[i].second;
  }
  return scratch[kept - 1].second;
}

template <class T>
double token_logprob(const T* z, int64_t V, double temperature, int32_t id) {
  if (id < 0 || id >= V) throw Error("token_logprob: token id " + std::to_string(id) + " outside the vocabulary");
  const double tau = detail::logprob_temperature(temperature);
  return double(z[id]) / tau - detail::row_logsumexp(z, V, tau);
}

template int32_t sample_token<float>(const float*, int64_t, const SamplingConfig&, double,
                                     std::vector<std::pair<double, int32_t>>&);
template int32_t sample_token<double>(const double*, int64_t, const SamplingConfig&, double,
                                      std::vector<std::pair<double, int32_t>>&);
template double token_logprob<float>(const float*, int64_t, double, int32_t);
template double token_logprob<double>(const double*, int64_t, double, int32_t);

}  // namespace moetune
