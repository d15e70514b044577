// Helpers shared by the tests: deterministic random fills, central finite
// differences in double precision, and a relative-error measure.
#pragma once
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "moe/batch.hpp"

namespace moetune::testing {

inline std::vector<double> randn(size_t n, uint64_t seed, double scale = 1.0) {
  std::mt19937_64 g(seed);
  std::normal_distribution<double> nd(0.0, scale);
  std::vector<double> v(n);
  for (auto& x : v) x = nd(g);
  return v;
}

// |a-b| / max(|a|, |b|, floor)
inline double rel_err(double a, double b, double floor = 1e-8) {
  return std::fabs(a - b) / std::max({std::fabs(a), std::fabs(b), floor});
}

// Central difference of f with respect to x[i] (x restored afterwards).
inline double fd(const std::function<double()>& f, double& xi, double h = 1e-6) {
  const double old = xi;
  xi = old + h;
  const double fp = f();
  xi = old - h;
  const double fm = f();
  xi = old;
  return (fp - fm) / (2 * h);
}

// Checks every element of x (or `max_checks` evenly spaced ones) against the analytic
// gradient g; returns the worst relative error. The floor of the denominator is
// 1e-5 * (1 + max|g|), so elements whose gradient is tiny compared with the rest of
// the tensor are compared in absolute terms (central differences with h = 1e-5 have
// an absolute error of about 1e-10 * |f|).
inline double check_grad(const std::function<double()>& f, std::vector<double>& x, const std::vector<double>& g,
                         size_t max_checks = 64, double h = 1e-5) {
  double gmax = 0;
  for (double v : g) gmax = std::max(gmax, std::fabs(v));
  const double floor = 1e-5 * (1.0 + gmax);
  double worst = 0;
  const size_t n = x.size();
  const size_t step = n <= max_checks ? 1 : n / max_checks;
  for (size_t i = 0; i < n; i += step) worst = std::max(worst, rel_err(fd(f, x[i], h), g[i], floor));
  return worst;
}

// A micro-batch of `rows` rows: random tokens, two documents in row 0 (packing),
// some ignored labels, and padding at the end of the last row.
inline MicroBatch make_batch(int rows, int seq_len, int vocab, uint64_t seed) {
  std::mt19937_64 g(seed);
  MicroBatch mb;
  mb.rows = rows;
  mb.seq_len = seq_len;
  const int64_t N = int64_t(rows) * seq_len;
  mb.input_ids.resize(N);
  mb.labels.resize(N);
  mb.doc_ids.resize(N);
  for (int64_t i = 0; i < N; ++i) {
    mb.input_ids[i] = int32_t(g() % vocab);
    mb.labels[i] = (g() % 7 == 0) ? kIgnoreIndex : mb.input_ids[i];
    const int r = int(i / seq_len), t = int(i % seq_len);
    mb.doc_ids[i] = (r == 0 && t >= seq_len / 2) ? 1 : 0;
    if (r == rows - 1 && t >= seq_len - 2) {  // padding
      mb.doc_ids[i] = 7;
      mb.labels[i] = kIgnoreIndex;
      mb.input_ids[i] = 0;
    }
  }
  return mb;
}

}  // namespace moetune::testing
