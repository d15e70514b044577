// Local token dispatch and combine (no communication): permute the kept (token,
// expert) pairs into contiguous per-expert slices, and the weighted un-permute that
// sums the expert outputs back per token. The backward of dispatch is a combine
// (scatter-add) and the backward of combine is a dispatch (gather, times weight).
// The all-to-all dispatcher of dist/ exchanges these same slices between ranks.
#pragma once
#include <cstdint>
#include <vector>

#include "moe/ops.hpp"
#include "moe/router.hpp"

namespace moetune {

// Pair p of the permuted buffer (P rows) is (token pair_token[p], slot pair_slot[p]);
// expert e owns rows [offsets[e], offsets[e+1]), pairs in increasing token order.
struct Permutation {
  int64_t N = 0;
  int K = 0, E = 0;
  std::vector<int64_t> offsets;       // (E+1)
  std::vector<int32_t> pair_token;    // (P)
  std::vector<int32_t> pair_slot;     // (P)
  std::vector<int64_t> slot_to_pair;  // (N*K): row of pair (t,k), -1 if dropped
  int64_t pairs() const { return offsets.empty() ? 0 : offsets.back(); }
};

// Fills p (reusing its buffers: no allocation once they are large enough).
template <class T>
void make_permutation(Permutation& p, const Routing<T>& r) {
  p.N = r.N;
  p.K = r.K;
  p.E = r.E;
  p.offsets.assign(r.E + 1, 0);
  for (int64_t i = 0; i < r.N * r.K; ++i)
    if (r.kept[i]) p.offsets[r.idx[i] + 1]++;
  for (int e = 0; e < r.E; ++e) p.offsets[e + 1] += p.offsets[e];
  static thread_local std::vector<int64_t> fill;
  fill.assign(p.offsets.begin(), p.offsets.end() - 1);
  p.pair_token.resize(p.pairs());
  p.pair_slot.resize(p.pairs());
  p.slot_to_pair.assign(r.N * r.K, -1);
  for (int64_t i = 0; i < r.N * r.K; ++i) {
    if (!r.kept[i]) continue;
    const int64_t row = fill[r.idx[i]]++;
    p.pair_token[row] = int32_t(i / r.K);
    p.pair_slot[row] = int32_t(i % r.K);
    p.slot_to_pair[i] = row;
  }
}
template <class T>
Permutation make_permutation(const Routing<T>& r) {
  Permutation p;
  make_permutation(p, r);
  return p;
}

// Dispatch: xp (P,d) = x[pair_token] ; x (N,d).
template <class T>
void dispatch_forward(T* xp, const T* x, const Permutation& p, int64_t d) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < p.pairs(); ++i) std::copy_n(x + int64_t(p.pair_token[i]) * d, d, xp + i * d);
}
// Backward of dispatch: dx (N,d) += sum over the token's kept slots (in slot order) of dxp.
template <class T>
void dispatch_backward(T* dx, const T* dxp, const Permutation& p, int64_t d) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < p.N; ++t)
    for (int k = 0; k < p.K; ++k) {
      const int64_t row = p.slot_to_pair[t * p.K + k];
      if (row < 0) continue;
      for (int64_t j = 0; j < d; ++j) dx[t * d + j] += dxp[row * d + j];
    }
}

// Combine: out (N,d) += sum_k weight[t,k] * yp[pair(t,k)]; yp (P,d), weight (N,K).
template <class T>
void combine_forward(T* out, const T* yp, const T* weight, const Permutation& p, int64_t d) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < p.N; ++t)
    for (int k = 0; k < p.K; ++k) {
      const int64_t row = p.slot_to_pair[t * p.K + k];
      if (row < 0) continue;
      const T w = weight[t * p.K + k];
      for (int64_t j = 0; j < d; ++j) out[t * d + j] += w * yp[row * d + j];
    }
}
// Backward of combine: dyp (P,d) = weight * dout[token] (overwritten);
// dweight (N,K) = <dout[t], yp[pair]> (overwritten; 0 for dropped pairs).
template <class T>
void combine_backward(T* dyp, T* dweight, const T* dout, const T* yp, const T* weight, const Permutation& p,
                      int64_t d) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < p.N; ++t)
    for (int k = 0; k < p.K; ++k) {
      const int64_t row = p.slot_to_pair[t * p.K + k];
      if (row < 0) {
        dweight[t * p.K + k] = T(0);
        continue;
      }
      const T w = weight[t * p.K + k];
      const T* g = dout + t * d;
      const T* y = yp + row * d;
      T* dy = dyp + row * d;
      for (int64_t j = 0; j < d; ++j) dy[j] = w * g[j];
      dweight[t * p.K + k] = ops::row_sum<T>(d, [g, y](int64_t j) { return g[j] * y[j]; });
    }
}

}  // namespace moetune
