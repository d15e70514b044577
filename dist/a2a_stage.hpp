// All-to-all expert stage (the token dispatcher of expert parallelism). Phases, as
// in Megatron-Core: the MoE layer has routed and permuted the tokens into
// per-expert slices (experts of one rank are contiguous, so the slices are also
// grouped by destination rank) -> exchange per-expert counts (MPI_Alltoall) ->
// exchange token rows (MPI_Alltoallv) -> the owner runs its local experts on
// contiguous slices, one GEMM chain per (source rank, expert) -> reverse exchange.
// The backward of dispatch is a combine and vice versa: the gradient rows travel
// the same way. Gate weights and the combine weights stay on the source rank.
//
// Overlap: the MoE layer hands each call work that needs no expert output (the shared
// expert forward while the outputs come back; the router backward and the gate's weight
// gradient while the output gradient goes out, the shared expert backward while the
// input gradient comes back: the exchanges after the experts are where a rank waits for
// slower ones). With `overlap` on (parallel.overlap_a2a, the default) that
// exchange is an MPI_Ialltoallv, the work runs, and then the exchange is waited for, so
// the work fills what would be waiting for the other ranks. Off: a blocking exchange,
// then the work. The work touches no buffer of the exchange, so either way every bit is
// the same; stats says how long the exchanges took and how much work ran in flight.
//
// Determinism: the owner computes each source's slice separately, on exactly the
// rows (and in the order) that rank 1 would use for that micro-batch, and hands each
// source's expert-gradient contribution to `after_source` as its own leaf, so the
// fixed-point gradient sum is the same for every layout.
#pragma once
#include <algorithm>
#include <chrono>
#include <functional>
#include <unordered_map>
#include <vector>

#include "dist/comm.hpp"
#include "moe/moe_layer.hpp"
#include "moe/profile.hpp"
#include "moe/scratch.hpp"

namespace moetune::dist {

struct ExchangeStats {
  int64_t dispatch_bytes = 0, combine_bytes = 0;  // sent to other ranks (forward + backward)
  double dispatch_s = 0, combine_s = 0;           // time in the exchanges (posting + waiting), not in their overlap
  double overlap_s = 0;                           // time of the layer's work run while an exchange was in flight
  void reset() { *this = ExchangeStats{}; }
};

template <class T>
class AllToAllExpertStage : public ExpertStage<T> {
 public:
  using ViewFn = std::function<const ExpertViews<T>&(int layer)>;  // must outlive the call
  // ep_comm: this rank's expert-parallel group; the rank owns experts
  // [ep_comm.rank() * E/ep, ...). views(layer) gives this rank's local experts.
  AllToAllExpertStage(const Comm& ep_comm, int E, int64_t d, int64_t F, ViewFn views)
      : comm_(ep_comm), E_(E), ep_(ep_comm.size()), local_(E / ep_comm.size()), d_(d), F_(F), views_(std::move(views)) {}

  // See the header: run the work in flight, or after a blocking exchange.
  bool overlap = true;

  void forward(int layer, const Permutation& perm, const T* xp, T* yp, Work to_experts,
               Work from_experts) override {
    profile::Scope ps(profile::Phase::dispatch);
    auto t0 = clock::now();
    auto& c = cache_[layer];
    // 1. per-expert counts to the owners: block q of the send vector = q's experts.
    auto& send_counts = send_counts_;
    auto& recv_counts = c.recv_counts;
    send_counts.resize(E_);
    recv_counts.resize(E_);
    for (int e = 0; e < E_; ++e) send_counts[e] = perm.offsets[e + 1] - perm.offsets[e];
    comm_.alltoall(std::span<const int64_t>(send_counts), std::span<int64_t>(recv_counts));
    // recv_counts[q*local + j] = rows source q sends for local expert j.
    c.send_rows.assign(ep_, 0);
    c.recv_rows.assign(ep_, 0);
    for (int q = 0; q < ep_; ++q)
      for (int j = 0; j < local_; ++j) {
        c.send_rows[q] += send_counts[q * local_ + j];
        c.recv_rows[q] += recv_counts[q * local_ + j];
      }
    int64_t total_recv = 0;
    for (auto r : c.recv_rows) total_recv += r;
    stats.dispatch_s += seconds_since(t0);
    // 2. token rows. The routing moves rows between ranks from step to step, so the
    // received rows and each source's expert caches are sized at once for twice their
    // mean (a rank receives as many rows as it sends on average, a source sends it
    // 1/ep of its pairs) and grow from there with headroom (moe/scratch.hpp): they do not
    // reallocate and touch fresh pages each time a rank's share reaches a new high.
    const int64_t room = 2 * perm.pairs(), room_source = (room + ep_ - 1) / ep_;
    grow_scratch(c.x, size_t(std::max(total_recv, room) * d_));
    exchange(xp, c.send_rows, c.x.data(), c.recv_rows, stats.dispatch_bytes, stats.dispatch_s, to_experts);
    // 3. local experts, one source at a time.
    ps.next(profile::Phase::experts);
    auto& y = rows_a_;
    grow_scratch(y, size_t(std::max(total_recv, room) * d_));
    c.mlp.resize(ep_);
    int64_t row = 0;
    for (int q = 0; q < ep_; ++q) {
      c.mlp[q].resize(std::max(c.recv_rows[q], room_source), F_);
      local_forward(layer, q, source_offsets(c, q), c.x.data() + row * d_, y.data() + row * d_);
      row += c.recv_rows[q];
    }
    // 4. outputs back to the sources.
    ps.next(profile::Phase::combine);
    exchange(y.data(), c.recv_rows, yp, c.send_rows, stats.combine_bytes, stats.combine_s, from_experts);
  }

  void backward(int layer, const Permutation& perm, const T* dyp, T* dxp, Work to_experts,
                Work from_experts) override {
    auto& c = cache_[layer];
    int64_t total_recv = 0;
    for (auto r : c.recv_rows) total_recv += r;
    // Backward of combine = dispatch of the output gradient.
    profile::Scope ps(profile::Phase::combine_bwd);
    auto &dy = rows_a_, &dx = rows_b_;
    const int64_t room = 2 * perm.pairs(), rows = std::max(total_recv, room);  // as in forward
    grow_scratch(dy, size_t(rows * d_));
    grow_scratch(dx, size_t(rows * d_));
    int64_t per_source = (room + ep_ - 1) / ep_;  // experts_backward's scratch holds one source's rows
    for (auto r : c.recv_rows) per_source = std::max(per_source, r);
    grow_scratch(scratch_, size_t(3 * per_source * F_));
    exchange(dyp, c.send_rows, dy.data(), c.recv_rows, stats.combine_bytes, stats.combine_s, to_experts);
    ps.next(profile::Phase::experts_bwd);
    int64_t row = 0;
    for (int q = 0; q < ep_; ++q) {
      local_backward(layer, q, source_offsets(c, q), c.x.data() + row * d_, dy.data() + row * d_,
                     dx.data() + row * d_);
      if (after_source) after_source(layer);
      row += c.recv_rows[q];
    }
    // Backward of dispatch = combine of the input gradient.
    ps.next(profile::Phase::dispatch_bwd);
    exchange(dx.data(), c.recv_rows, dxp, c.send_rows, stats.dispatch_bytes, stats.dispatch_s, from_experts);
  }

  // Called after one source rank's expert-gradient contribution of `layer` is
  // complete (each is one leaf of the deterministic gradient sum).
  std::function<void(int layer)> after_source;
  ExchangeStats stats;

 protected:
  // The owner's computation on the rows received from source rank q: offsets
  // (local+1) delimit the rows of each local expert in x (rows,d); y (rows,d) out.
  virtual void local_forward(int layer, int q, const std::vector<int64_t>& offsets, const T* x, T* y) {
    experts_forward(y, cache_[layer].mlp[q], x, views_(layer), offsets, d_, F_);
  }
  // dy (rows,d) in, dx (rows,d) out; expert weight gradients accumulate.
  virtual void local_backward(int layer, int q, const std::vector<int64_t>& offsets, const T* x, const T* dy, T* dx) {
    experts_backward(dx, dy, x, cache_[layer].mlp[q], views_(layer), offsets, d_, F_, scratch_);
  }
  int rank() const { return comm_.rank(); }
  int experts_per_rank() const { return local_; }

 private:
  using clock = std::chrono::steady_clock;
  static double seconds_since(clock::time_point t0) {
    return std::chrono::duration<double>(clock::now() - t0).count();
  }
  struct Cache {
    std::vector<int64_t> recv_counts;         // (ep * local)
    std::vector<int64_t> send_rows, recv_rows;  // (ep)
    std::vector<T> x;                          // received rows, by source then local expert
    std::vector<MlpCache<T>> mlp;              // per source
  };
  const std::vector<int64_t>& source_offsets(const Cache& c, int q) {
    auto& offs = offsets_;
    offs.assign(local_ + 1, 0);
    for (int j = 0; j < local_; ++j) offs[j + 1] = offs[j] + c.recv_counts[q * local_ + j];
    return offs;
  }
  // Row exchange: `send` holds rows for each rank in rank order (send_rows[q] rows of
  // d values each); `recv` gets recv_rows[q] rows from each rank q. `work` runs in
  // flight (overlap) or after; `seconds` gets the time of the exchange itself.
  void exchange(const T* send, const std::vector<int64_t>& send_rows, T* recv, const std::vector<int64_t>& recv_rows,
                int64_t& bytes, double& seconds, Work work) {
    auto t0 = clock::now();
    auto &sc = sc_, &rc = rc_;
    sc.resize(ep_);
    rc.resize(ep_);
    int64_t ns = 0, nr = 0;
    for (int q = 0; q < ep_; ++q) {
      sc[q] = send_rows[q] * d_;
      rc[q] = recv_rows[q] * d_;
      ns += sc[q];
      nr += rc[q];
      if (q != comm_.rank()) bytes += sc[q] * int64_t(sizeof(T));
    }
    const std::span<const T> s(send, ns);
    const std::span<T> r(recv, nr);
    if (overlap && work) {
      comm_.ialltoallv(s, sc, r, rc, request_);
      request_.test();  // Open MPI moves data only inside MPI calls: start the transfer now
      seconds += seconds_since(t0);
      const auto t1 = clock::now();
      work();
      stats.overlap_s += seconds_since(t1);
      t0 = clock::now();
      request_.wait();
      seconds += seconds_since(t0);
    } else {
      comm_.alltoallv(s, sc, r, rc);
      seconds += seconds_since(t0);
      work();
    }
  }

  const Comm& comm_;
  int E_, ep_, local_;
  int64_t d_, F_;
  ViewFn views_;
  std::unordered_map<int, Cache> cache_;
  std::vector<T> scratch_;
  // Reused from call to call (no allocation in the steady state): the per-expert send
  // counts, the owner's output rows (forward) or gradient rows (backward), the offsets
  // of one source's rows, the exchange's counts.
  std::vector<int64_t> send_counts_, offsets_, sc_, rc_;
  std::vector<T> rows_a_, rows_b_;
  Request request_;  // the exchange in flight
};

}  // namespace moetune::dist
