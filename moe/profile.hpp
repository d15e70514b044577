// Phase timers for `moetune bench`: seconds per phase of a training step (attention,
// router, dispatch, experts, ...), accumulated into a PhaseTimes that the caller
// activates on its thread. Off by default: with no active PhaseTimes a Scope is one
// thread-local load and a branch, so the instrumented code pays nothing measurable.
//
// Times are exclusive: a Scope opened inside another (the all-to-all exchanges of
// dist/a2a_stage.hpp inside the MoE layer's experts call, the gradient-leaf flushes
// inside the expert backward) pauses its parent, so the phases of a step are disjoint
// intervals and their sum never exceeds the step's wall time. Only the thread that
// activated a PhaseTimes records into it (OpenMP worker threads see none).
//
//   profile::PhaseTimes t;
//   profile::Activate on(t);               // this thread records into t until `on` ends
//   { profile::Scope s(profile::Phase::router); ...; s.next(profile::Phase::dispatch); ... }
#pragma once
#include <array>
#include <chrono>

namespace moetune::profile {

enum class Phase : int {
  embedding,       // token embedding lookup and input preparation (positions, targets)
  attention,       // RMSNorm, q/k/v projections, RoPE, attention, o projection, residual
  dense_ffn,       // FFN RMSNorm, the dense FFN of dense layers, FFN residual
  router,          // gate logits, routing, capacity, balance losses
  dispatch,        // permutation into per-expert slices + all-to-all dispatch (ep > 1)
  experts,         // routed expert SwiGLUs on this rank
  combine,         // all-to-all combine (ep > 1) + weighted un-permute
  shared,          // shared expert
  lm_head,         // final RMSNorm, LM head, cross-entropy (and its gradient)
  embedding_bwd,
  attention_bwd,
  dense_ffn_bwd,
  router_bwd,
  dispatch_bwd,
  experts_bwd,
  combine_bwd,
  shared_bwd,
  lm_head_bwd,
  grad_accum,      // zeroing gradients, fixed-point accumulation of the gradient leaves
  rank_wait,       // waiting for the slowest rank before the gradient reduction (a barrier, profiled runs only)
  grad_reduce,     // MPI_Allreduce of the 128-bit gradients, back to float, loss gather
  optimizer,       // gradient norm, clipping, AdamW (or ZeRO-1 shards + all-gather), bias update
  count
};
inline constexpr int kPhases = int(Phase::count);

// Names used in `moetune bench`'s table and JSON.
inline const char* phase_name(Phase p) {
  static constexpr const char* names[kPhases] = {
      "embedding",     "attention",     "dense_ffn",    "router",     "dispatch",    "experts",     "combine",
      "shared_expert", "lm_head_loss",  "embedding_bwd", "attention_bwd", "dense_ffn_bwd", "router_bwd",
      "dispatch_bwd",  "experts_bwd",   "combine_bwd",  "shared_expert_bwd", "lm_head_loss_bwd", "grad_accum",
      "rank_wait",     "grad_reduce",   "optimizer"};
  return names[int(p)];
}

// Whether this thread records phases (an Activate is alive).
inline bool active();

struct PhaseTimes {
  std::array<double, kPhases> seconds{};  // accumulated exclusive seconds per phase
  void reset() { seconds.fill(0.0); }
  double total() const {
    double s = 0;
    for (double v : seconds) s += v;
    return s;
  }
};

namespace detail {
using clock = std::chrono::steady_clock;
struct State {
  PhaseTimes* times = nullptr;  // null: profiling off on this thread
  int current = -1;             // the open phase, -1 = none
  clock::time_point mark;       // when `current` last started counting
};
inline thread_local State state;
}  // namespace detail

inline bool active() { return detail::state.times != nullptr; }

// Records phases of this thread into `t` for its lifetime.
class Activate {
 public:
  explicit Activate(PhaseTimes& t) : saved_(detail::state) { detail::state = {&t, -1, detail::clock::now()}; }
  ~Activate() { detail::state = saved_; }
  Activate(const Activate&) = delete;
  Activate& operator=(const Activate&) = delete;

 private:
  detail::State saved_;
};

// Time from construction (or next()) to destruction goes to the phase, minus the
// time of Scopes opened inside it.
class Scope {
 public:
  explicit Scope(Phase p) {
    auto& s = detail::state;
    if (!s.times) return;
    on_ = true;
    const auto now = detail::clock::now();
    if (s.current >= 0) s.times->seconds[s.current] += std::chrono::duration<double>(now - s.mark).count();
    parent_ = s.current;
    s.current = int(p);
    s.mark = now;
  }
  // Ends the current phase and starts `p` in the same scope.
  void next(Phase p) {
    if (!on_) return;
    auto& s = detail::state;
    const auto now = detail::clock::now();
    s.times->seconds[s.current] += std::chrono::duration<double>(now - s.mark).count();
    s.current = int(p);
    s.mark = now;
  }
  ~Scope() {
    if (!on_) return;
    auto& s = detail::state;
    if (!s.times) return;  // the Activate ended first
    const auto now = detail::clock::now();
    s.times->seconds[s.current] += std::chrono::duration<double>(now - s.mark).count();
    s.current = parent_;
    s.mark = now;
  }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  bool on_ = false;
  int parent_ = -1;
};

}  // namespace moetune::profile
