// One row of log_softmax(z / tau) in double, shared by sampling.cpp (the rollout's
// log-probabilities) and rl_loss.cpp (pi_old, the reference and the loss head), so that
// the same logits give the same bits everywhere (MODEL.md section 13: the first update
// sees ratio exactly 1). Internal to train/: not part of the public API.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

namespace moetune::detail {

// tau = 0 means 1 (MODEL.md section 10: log-probabilities of a greedy rollout).
inline double logprob_temperature(double tau) { return tau == 0.0 ? 1.0 : tau; }

// x_j = double(z_j) / tau; returns logsumexp_j x_j (max first, then the sum of
// exp(x_j - max) in index order, so it depends on nothing but the row).
template <class T>
double row_logsumexp(const T* z, int64_t V, double tau) {
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < V; ++j) mx = std::fmax(mx, double(z[j]) / tau);
  double s = 0;
  for (int64_t j = 0; j < V; ++j) s += std::exp(double(z[j]) / tau - mx);
  return mx + std::log(s);
}

// Entropy of softmax(x) given its logsumexp: lse - sum_j p_j x_j, with p_j = 0 terms
// (x_j = -inf) skipped.
template <class T>
double row_entropy(const T* z, int64_t V, double tau, double lse) {
  double px = 0;
  for (int64_t j = 0; j < V; ++j) {
    const double x = double(z[j]) / tau;
    const double p = std::exp(x - lse);
    if (p > 0) px += p * x;
  }
  return lse - px;
}

}  // namespace moetune::detail
