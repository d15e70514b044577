// The MoE FFN in one screen: route -> dispatch -> experts -> combine (+ shared expert),
// and its backward in the reverse order. Routed experts run on contiguous per-expert
// slices of the permuted token buffer. Where they run is an ExpertStage: the local
// stage below computes them in-process; dist/ has the all-to-all stage that sends the
// slices to the ranks owning the experts and gets the outputs back.
#pragma once
#include <omp.h>

#include <algorithm>
#include <functional>
#include <unordered_map>
#include <vector>

#include "kernels/gemm.hpp"
#include "moe/dispatch.hpp"
#include "moe/function_ref.hpp"
#include "moe/mlp.hpp"
#include "moe/profile.hpp"
#include "moe/router.hpp"
#include "moe/scratch.hpp"

namespace moetune {

// Gate and shared-expert weights (they stay with the tokens' rank).
template <class T>
struct MoeWeights {
  const T* gate = nullptr;                              // (E,d)
  const T *sg = nullptr, *su = nullptr, *sd = nullptr;  // shared expert (S,d),(S,d),(d,S); null if none
};
template <class T>
struct MoeGrads {
  T* gate = nullptr;
  T *sg = nullptr, *su = nullptr, *sd = nullptr;
};

// Weights and gradients of a contiguous range of routed experts (index 0 = first).
template <class T>
struct ExpertViews {
  std::vector<const T*> wg, wu, wd;  // (F,d), (F,d), (d,F)
  std::vector<T*> dwg, dwu, dwd;
  double swiglu_limit = 0;  // the config's swiglu_limit (0 = off), applied by every expert
};

// The order in which experts_forward / experts_backward run the experts, and whether
// they run them in parallel, one expert per thread (each expert's GEMMs then run alone
// on their thread): when there are at least twice as many non-empty experts as
// threads. Otherwise one expert at a time, each GEMM parallel over its tiles. Either
// way every number is the same (the GEMM and the SwiGLU are thread-invariant, and the
// experts write disjoint rows and gradients): only the speed differs. Largest first,
// so that the dynamic schedule balances.
inline bool experts_in_parallel(const std::vector<int64_t>& offsets, std::vector<int>& order) {
  order.clear();
  for (size_t e = 0; e + 1 < offsets.size(); ++e)
    if (offsets[e + 1] > offsets[e]) order.push_back(int(e));
  const int threads = omp_in_parallel() ? 1 : omp_get_max_threads();
  if (threads < 2 || int(order.size()) < 2 * threads) return false;
  std::sort(order.begin(), order.end(), [&](int a, int b) {  // (stable_sort would allocate)
    const int64_t na = offsets[a + 1] - offsets[a], nb = offsets[b + 1] - offsets[b];
    return na != nb ? na > nb : a < b;
  });
  return true;
}

// In a parallel run, each thread's GEMM packing buffers hold the largest product an
// expert can need (M or K up to all the rows, the other up to max(d,F)): a bound that
// does not change from step to step, so no step allocates for them once warm.
template <class T>
void reserve_expert_gemm(const std::vector<int64_t>& offsets, int64_t d, int64_t F) {
  kernels::gemm_reserve<T>((offsets.back() + 32) * (std::max(d, F) + 32));
}

// Runs fn(e, b, n) for every expert e with n > 0 rows starting at row b of the slices
// offsets delimit: in parallel, one expert per thread, or one after the other (see
// experts_in_parallel).
template <class T, class Fn>
void for_each_expert(const std::vector<int64_t>& offsets, int64_t d, int64_t F, Fn&& fn) {
  static thread_local std::vector<int> order;
  const bool par = experts_in_parallel(offsets, order);
  const int64_t n_run = int64_t(order.size());
  const int* run = order.data();  // this thread's list (the workers' thread_local is another)
#pragma omp parallel if (par)
  {
    if (par) reserve_expert_gemm<T>(offsets, d, F);
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < n_run; ++k) {
      const int e = run[k];
      fn(e, offsets[e], offsets[e + 1] - offsets[e]);
    }
  }
}

// Experts on their slices. offsets (n_experts+1) delimit the rows of each expert in
// xp (rows,d); yp (rows,d) out; cache (rows,F).
template <class T>
void experts_forward(T* yp, MlpCache<T>& cache, const T* xp, const ExpertViews<T>& w,
                     const std::vector<int64_t>& offsets, int64_t d, int64_t F) {
  cache.resize(offsets.back(), F);
  for_each_expert<T>(offsets, d, F, [&](int e, int64_t b, int64_t n) {
    mlp_forward(yp + b * d, cache.gu.data() + 2 * b * F, cache.a.data() + b * F, xp + b * d, w.wg[e], w.wu[e],
                w.wd[e], n, d, F, w.swiglu_limit);
  });
}
// dxp (rows,d) (overwritten), expert weight grads +=; dyp (rows,d).
template <class T>
void experts_backward(T* dxp, const T* dyp, const T* xp, const MlpCache<T>& cache, const ExpertViews<T>& w,
                      const std::vector<int64_t>& offsets, int64_t d, int64_t F, std::vector<T>& scratch) {
  kernels::parallel_fill(dxp, offsets.back() * d, T(0));
  grow_scratch(scratch, size_t(3 * offsets.back() * F));  // expert e uses the rows of its own slice
  T* sc = scratch.data();
  for_each_expert<T>(offsets, d, F, [&](int e, int64_t b, int64_t n) {
    mlp_backward(dxp + b * d, w.dwg[e], w.dwu[e], w.dwd[e], dyp + b * d, xp + b * d, cache.gu.data() + 2 * b * F,
                 cache.a.data() + b * F, w.wg[e], w.wu[e], w.wd[e], n, d, F, sc + 3 * b * F, w.swiglu_limit);
  });
}

// Where the routed experts of each MoE layer run. Each call also takes work of the MoE
// layer that does not depend on the experts (the shared expert, the router's weight
// gradient): a stage that exchanges tokens runs it while they are in flight, the local
// stage just runs it. That work writes none of the stage's inputs or outputs, so where
// it runs changes no bit.
template <class T>
class ExpertStage {
 public:
  virtual ~ExpertStage() = default;
  // xp (P,d): the dispatched rows, grouped by expert as perm.offsets says. yp (P,d) out.
  // to_experts / from_experts: run while the rows travel to / from the experts.
  virtual void forward(int layer, const Permutation& perm, const T* xp, T* yp, Work to_experts,
                       Work from_experts) = 0;
  // dyp (P,d) in, dxp (P,d) out (overwritten); expert weight gradients accumulate.
  // to_experts / from_experts: run while the gradient rows travel to / from the experts.
  virtual void backward(int layer, const Permutation& perm, const T* dyp, T* dxp, Work to_experts,
                        Work from_experts) = 0;
};

// All E experts in this process.
template <class T>
class LocalExpertStage : public ExpertStage<T> {
 public:
  using ViewFn = std::function<const ExpertViews<T>&(int layer)>;  // must outlive the call
  LocalExpertStage(int64_t d, int64_t F, ViewFn views) : d_(d), F_(F), views_(std::move(views)) {}
  void forward(int layer, const Permutation& perm, const T* xp, T* yp, Work to_experts,
               Work from_experts) override {
    to_experts();
    auto& c = cache_[layer];
    c.xp = xp;
    experts_forward(yp, c.mlp, xp, views_(layer), perm.offsets, d_, F_);
    from_experts();
  }
  void backward(int layer, const Permutation& perm, const T* dyp, T* dxp, Work to_experts,
                Work from_experts) override {
    to_experts();
    auto& c = cache_[layer];
    experts_backward(dxp, dyp, c.xp, c.mlp, views_(layer), perm.offsets, d_, F_, scratch_);
    if (after_backward) after_backward(layer);
    from_experts();
  }
  // Called after each layer's expert gradients of one micro-batch are complete
  // (the trainer's deterministic gradient accumulation hooks in here).
  std::function<void(int layer)> after_backward;

 private:
  struct Cache {
    const T* xp = nullptr;  // the MoE layer's dispatched rows, alive until its backward
    MlpCache<T> mlp;
  };
  int64_t d_, F_;
  ViewFn views_;
  std::unordered_map<int, Cache> cache_;
  std::vector<T> scratch_;
};

template <class T>
struct MoeCache {
  std::vector<T> logits;  // (N,E)
  Routing<T> routing;
  Permutation perm;
  std::vector<T> xp, yp;  // (P,d) dispatched inputs, expert outputs
  MlpCache<T> shared;     // (N,S)
  BalanceLosses losses;
};

// Routing replay and recording of one MoE layer (MODEL.md section 11): a given
// selection (idx, kept; (N,K) each) replaces top-K and capacity; the selection made
// is copied out when record_* are set.
struct RouteControl {
  const int32_t* replay_idx = nullptr;
  const uint8_t* replay_kept = nullptr;
  std::vector<int32_t>* record_idx = nullptr;
  std::vector<uint8_t>* record_kept = nullptr;
  const uint8_t* padding = nullptr;  // (N) 1 = padding: in no routing statistic
  // Hash-routed layer (MODEL.md section 12): the table tid2eid (V,K) and the N input
  // token ids select the experts (route_hash); bias unused. A replay still wins.
  const int32_t* tid2eid = nullptr;
  const int32_t* token_ids = nullptr;
};

// out (N,d) = MoE(x) (overwritten); x (N,d) = the normalised hidden states of
// `rows` rows of `seq_len` tokens; bias (E) fp32.
template <class T>
void moe_forward(T* out, MoeCache<T>& c, const T* x, const MoeWeights<T>& w, ExpertStage<T>& experts, int layer,
                 const float* bias, const ModelConfig& cfg, int rows, int seq_len, const BalanceScales& sc,
                 const RouteControl& rc = {}) {
  const int64_t N = int64_t(rows) * seq_len, d = cfg.d(), E = cfg.E(), S = cfg.shared_width();
  // 1. route
  profile::Scope ps(profile::Phase::router);
  grow_scratch(c.logits, size_t(N * E));
  ops::linear_forward(c.logits.data(), x, w.gate, N, d, E);
  if (rc.replay_idx) {
    route_replay(c.routing, c.logits.data(), rc.replay_idx, rc.replay_kept, cfg, N);
  } else if (rc.tid2eid) {
    route_hash(c.routing, c.logits.data(), rc.token_ids, rc.tid2eid, cfg, N);
    route_capacity(c.routing, cfg.capacity_factor);
  } else {
    route_select(c.routing, c.logits.data(), bias, cfg, N);
    route_capacity(c.routing, cfg.capacity_factor);
  }
  if (rc.padding) route_mask_padding(c.routing, rc.padding);
  if (rc.record_idx) *rc.record_idx = c.routing.idx;
  if (rc.record_kept) *rc.record_kept = c.routing.kept;
  c.losses = balance_forward(c.routing, c.logits.data(), cfg, rows, seq_len, sc);
  // 2. dispatch
  ps.next(profile::Phase::dispatch);
  make_permutation(c.perm, c.routing);
  grow_scratch(c.xp, size_t(c.perm.pairs() * d));
  grow_scratch(c.yp, size_t(c.perm.pairs() * d));
  dispatch_forward(c.xp.data(), x, c.perm, d);
  // 3. experts, with the shared expert computed while their outputs travel back
  ps.next(profile::Phase::experts);
  auto shared = [&] {
    profile::Scope pss(profile::Phase::shared);
    if (w.sg) {
      c.shared.resize(N, S);
      mlp_forward(out, c.shared.gu.data(), c.shared.a.data(), x, w.sg, w.su, w.sd, N, d, S, cfg.swiglu_limit);
    } else {
      kernels::parallel_fill(out, N * d, T(0));
    }
  };
  experts.forward(layer, c.perm, c.xp.data(), c.yp.data(), Work(), Work(shared));
  // 4. combine (out = shared expert + the weighted expert outputs)
  ps.next(profile::Phase::combine);
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
                  ExpertStage<T>& experts, int layer, const MoeCache<T>& c, const ModelConfig& cfg, int rows,
                  int seq_len, const BalanceScales& sc, MoeScratch<T>& s) {
  const int64_t N = int64_t(rows) * seq_len, d = cfg.d(), E = cfg.E(), S = cfg.shared_width();
  // combine^T = dispatch of the gradient
  profile::Scope ps(profile::Phase::combine_bwd);
  grow_scratch(s.dyp, size_t(c.perm.pairs() * d));
  grow_scratch(s.dxp, size_t(c.perm.pairs() * d));
  grow_scratch(s.dweight, size_t(N * cfg.K()));
  combine_backward(s.dyp.data(), s.dweight.data(), dout, c.yp.data(), c.routing.weight.data(), c.perm, d);
  // While the gradient rows travel to the experts: the router's backward and the gate's
  // weight gradient. While they travel back: the shared expert (dx += its input gradient
  // first). The dispatch's part of dx follows, then the gate's, in that fixed order.
  auto shared = [&] {
    profile::Scope pss(profile::Phase::shared_bwd);
    if (w.sg)
      mlp_backward(dx, g.sg, g.su, g.sd, dout, x, c.shared.gu.data(), c.shared.a.data(), w.sg, w.su, w.sd, N, d, S,
                   s.mlp, cfg.swiglu_limit);
  };
  auto router = [&] {
    profile::Scope psr(profile::Phase::router_bwd);
    grow_scratch(s.dlogits, size_t(N * E));
    router_backward(s.dlogits.data(), s.dweight.data(), c.logits.data(), c.routing, cfg, rows, seq_len, sc);
    ops::linear_backward(static_cast<T*>(nullptr), g.gate, s.dlogits.data(), x, w.gate, N, d, E);
  };
  ps.next(profile::Phase::experts_bwd);
  experts.backward(layer, c.perm, s.dyp.data(), s.dxp.data(), Work(router), Work(shared));
  // dispatch^T = combine (scatter-add) of the gradient
  ps.next(profile::Phase::dispatch_bwd);
  dispatch_backward(dx, s.dxp.data(), c.perm, d);
  ps.next(profile::Phase::router_bwd);
  ops::linear_backward_input(dx, s.dlogits.data(), w.gate, N, d, E);
}

}  // namespace moetune
