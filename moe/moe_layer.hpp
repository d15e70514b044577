// The MoE FFN in one screen: route -> dispatch -> experts -> combine (+ shared expert),
// and its backward in the reverse order. Routed experts run on contiguous per-expert
// slices of the permuted token buffer (the layout the all-to-all dispatcher exchanges).
#pragma once
#include <vector>

#include "moe/dispatch.hpp"
#include "moe/mlp.hpp"
#include "moe/router.hpp"

namespace moetune {

template <class T>
struct MoeWeights {
  const T* gate = nullptr;                // (E,d)
  std::vector<const T*> wg, wu, wd;       // per expert: (F,d), (F,d), (d,F)
  const T *sg = nullptr, *su = nullptr, *sd = nullptr;  // shared expert (S,d),(S,d),(d,S); null if none
};
template <class T>
struct MoeGrads {
  T* gate = nullptr;
  std::vector<T*> wg, wu, wd;
  T *sg = nullptr, *su = nullptr, *sd = nullptr;
};

template <class T>
struct MoeCache {
  std::vector<T> logits;      // (N,E)
  Routing<T> routing;
  Permutation perm;
  std::vector<T> xp, yp;      // (P,d) dispatched inputs, expert outputs
  MlpCache<T> experts;        // (P,F)
  MlpCache<T> shared;         // (N,S)
  BalanceLosses losses;
};

// Experts on their slices: yp (P,d) from xp (P,d); cache (P,F).
template <class T>
void experts_forward(T* yp, MlpCache<T>& cache, const T* xp, const MoeWeights<T>& w, const Permutation& p,
                     int64_t d, int64_t F) {
  cache.resize(p.pairs(), F);
  for (int e = 0; e < p.E; ++e) {
    const int64_t b = p.offsets[e], n = p.offsets[e + 1] - b;
    if (n == 0) continue;
    mlp_forward(yp + b * d, cache.g.data() + b * F, cache.u.data() + b * F, cache.a.data() + b * F, xp + b * d,
                w.wg[e], w.wu[e], w.wd[e], n, d, F);
  }
}
// dxp (P,d) (overwritten), expert weight grads +=; dyp (P,d).
template <class T>
void experts_backward(T* dxp, const MoeGrads<T>& g, const T* dyp, const T* xp, const MlpCache<T>& cache,
                      const MoeWeights<T>& w, const Permutation& p, int64_t d, int64_t F, std::vector<T>& scratch) {
  std::fill_n(dxp, p.pairs() * d, T(0));
  for (int e = 0; e < p.E; ++e) {
    const int64_t b = p.offsets[e], n = p.offsets[e + 1] - b;
    if (n == 0) continue;
    mlp_backward(dxp + b * d, g.wg[e], g.wu[e], g.wd[e], dyp + b * d, xp + b * d, cache.g.data() + b * F,
                 cache.u.data() + b * F, cache.a.data() + b * F, w.wg[e], w.wu[e], w.wd[e], n, d, F, scratch);
  }
}

// out (N,d) = MoE(x) (overwritten); x (N,d) = the normalised hidden states of
// `rows` rows of `seq_len` tokens; bias (E) fp32.
template <class T>
void moe_forward(T* out, MoeCache<T>& c, const T* x, const MoeWeights<T>& w, const float* bias,
                 const ModelConfig& cfg, int rows, int seq_len, const BalanceScales& sc) {
  const int64_t N = int64_t(rows) * seq_len, d = cfg.d(), E = cfg.E(), F = cfg.F(), S = cfg.shared_width();
  // 1. route
  c.logits.resize(N * E);
  ops::linear_forward(c.logits.data(), x, w.gate, N, d, E);
  route_select(c.routing, c.logits.data(), bias, cfg, N);
  route_capacity(c.routing, cfg.capacity_factor);
  c.losses = balance_forward(c.routing, c.logits.data(), cfg, rows, seq_len, sc);
  // 2. dispatch
  c.perm = make_permutation(c.routing);
  c.xp.resize(c.perm.pairs() * d);
  c.yp.resize(c.perm.pairs() * d);
  dispatch_forward(c.xp.data(), x, c.perm, d);
  // 3. experts
  experts_forward(c.yp.data(), c.experts, c.xp.data(), w, c.perm, d, F);
  // 4. combine (+ shared expert)
  if (w.sg) {
    c.shared.resize(N, S);
    mlp_forward(out, c.shared.g.data(), c.shared.u.data(), c.shared.a.data(), x, w.sg, w.su, w.sd, N, d, S);
  } else {
    std::fill_n(out, N * d, T(0));
  }
  combine_forward(out, c.yp.data(), c.routing.weight.data(), c.perm, d);
}

// Reusable buffers of the backward (kept between calls to avoid re-allocation).
template <class T>
struct MoeScratch {
  std::vector<T> dyp, dxp, dweight, dlogits, mlp;
};

// dx (N,d) +=; weight grads +=; dout (N,d).
template <class T>
void moe_backward(T* dx, const MoeGrads<T>& g, const T* dout, const T* x, const MoeWeights<T>& w,
                  const MoeCache<T>& c, const ModelConfig& cfg, int rows, int seq_len, const BalanceScales& sc,
                  MoeScratch<T>& s) {
  const int64_t N = int64_t(rows) * seq_len, d = cfg.d(), E = cfg.E(), F = cfg.F(), S = cfg.shared_width();
  if (w.sg)
    mlp_backward(dx, g.sg, g.su, g.sd, dout, x, c.shared.g.data(), c.shared.u.data(), c.shared.a.data(), w.sg, w.su,
                 w.sd, N, d, S, s.mlp);
  // combine^T = dispatch of the gradient
  s.dyp.resize(c.perm.pairs() * d);
  s.dxp.resize(c.perm.pairs() * d);
  s.dweight.resize(N * cfg.K());
  combine_backward(s.dyp.data(), s.dweight.data(), dout, c.yp.data(), c.routing.weight.data(), c.perm, d);
  experts_backward(s.dxp.data(), g, s.dyp.data(), c.xp.data(), c.experts, w, c.perm, d, F, s.mlp);
  // dispatch^T = combine (scatter-add) of the gradient
  dispatch_backward(dx, s.dxp.data(), c.perm, d);
  // router
  s.dlogits.resize(N * E);
  router_backward(s.dlogits.data(), s.dweight.data(), c.logits.data(), c.routing, cfg, rows, seq_len, sc);
  ops::linear_backward(dx, g.gate, s.dlogits.data(), x, w.gate, N, d, E);
}

}  // namespace moetune
