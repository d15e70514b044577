// ParallelTrainer: layout-independent data + expert parallel training steps.
#include "dist/parallel_trainer.hpp"

#include <array>
#include <chrono>
#include <cmath>
#include <limits>

#include "kernels/parallel.hpp"
#include "moe/error.hpp"
#include "moe/profile.hpp"

namespace moetune::dist {
namespace {

using clock_type = std::chrono::steady_clock;
double since(clock_type::time_point t0) { return std::chrono::duration<double>(clock_type::now() - t0).count(); }

// The gradient norm's sum of squares of a tensor goes chunk by chunk: kSqChunk elements
// from the tensor's start, 8 interleaved double accumulators per chunk (chunk_sq), the
// chunks' sums then added in order. It depends only on the tensor's values, and a rank
// holding some of the chunks (a ZeRO-1 shard) computes exactly their part.
constexpr size_t kSqChunk = 4096;
template <class T>
double chunk_sq(const T* g, size_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += double(g[i + j]) * double(g[i + j]);
  for (int j = 0; i < n; ++i, ++j) acc[j] += double(g[i]) * double(g[i]);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// ZeRO-1 split of n elements over `ranks` ranks: equal contiguous shards (the last
// ones may be shorter or empty). Rank q holds [q*per, q*per + sizes[q]).
std::vector<int64_t> shard_sizes(size_t n, int ranks) {
  const size_t per = (n + size_t(ranks) - 1) / size_t(ranks);
  std::vector<int64_t> sizes(ranks);
  for (int q = 0; q < ranks; ++q) {
    const size_t b = std::min(n, per * size_t(q));
    sizes[q] = int64_t(std::min(n, b + per) - b);
  }
  return sizes;
}

// The ZeRO-1 split of the segment [begin, end) of `lay`: shard_sizes, with every
// boundary that falls inside a tensor moved within that tensor: inside a Muon matrix to
// the nearer end of the matrix (ties to its start), so that each Muon matrix lies in one
// shard; inside any other tensor down to a multiple of kSqChunk from the tensor's start,
// so that each chunk of the gradient norm lies in one shard. Each boundary stays in its
// tensor and both moves are monotone, so the boundaries stay in order.
std::vector<int64_t> zero_shard_sizes(const ParamLayout& lay, const OptimizerConfig& oc, size_t begin, size_t end,
                                      int ranks) {
  std::vector<int64_t> sizes = shard_sizes(end - begin, ranks);
  std::vector<size_t> bound(size_t(ranks) + 1, begin);
  for (int q = 0; q < ranks; ++q) bound[q + 1] = bound[q] + size_t(sizes[q]);
  for (int q = 1; q < ranks; ++q)
    for (const auto& t : lay.tensors())
      if (t.offset < bound[q] && bound[q] < t.offset + t.numel) {
        if (oc.muon_enabled() && uses_muon(oc, t))
          bound[q] = bound[q] - t.offset <= t.offset + t.numel - bound[q] ? t.offset : t.offset + t.numel;
        else
          bound[q] = t.offset + (bound[q] - t.offset) / kSqChunk * kSqChunk;
        break;
      }
  for (int q = 0; q < ranks; ++q) sizes[q] = int64_t(bound[q + 1] - bound[q]);
  return sizes;
}

}  // namespace

template <class T>
std::unique_ptr<AllToAllExpertStage<T>> install_expert_stage(ProcessGrid& grid, Model<T>& model) {
  if (grid.ep == 1) return nullptr;
  const ModelConfig& cfg = model.config();
  auto stage = std::make_unique<AllToAllExpertStage<T>>(grid.ep_comm, cfg.E(), cfg.d(), cfg.F(),
                                                        [&model](int l) -> const ExpertViews<T>& { return model.expert_views(l); });
  model.set_expert_stage(stage.get());
  return stage;
}

Reduction parse_reduction(const std::string& name, const std::string& key) {
  if (name == "exact") return Reduction::exact;
  if (name == "fp32") return Reduction::fp32;
  throw Error("key '" + key + "': expected \"exact\" or \"fp32\", got \"" + name + "\"");
}

template <class T>
ParallelTrainer<T>::ParallelTrainer(const ModelConfig& cfg, ProcessGrid& grid, const AdamWConfig& ac, int zero_stage,
                                    Reduction reduction)
    : ParallelTrainer(cfg, grid, OptimizerConfig{"adamw", ac, {}}, zero_stage, reduction) {}

template <class T>
ParallelTrainer<T>::ParallelTrainer(const ModelConfig& cfg, ProcessGrid& grid, const OptimizerConfig& oc,
                                    int zero_stage, Reduction reduction)
    : grid_(grid), cfg_(cfg), zero_(zero_stage), reduction_(reduction) {
  if (zero_stage != 0 && zero_stage != 1)
    throw Error("key 'parallel.zero_stage': must be 0 or 1, got " + std::to_string(zero_stage));
  model_ = std::make_unique<Model<T>>(cfg, grid.expert_begin, grid.expert_end);
  const ParamLayout& lay = model_->layout();
  opt_ = std::make_unique<Optimizer<T>>(lay, oc);
  // acc_ (exact reduction) is allocated by the first step that needs it (plan_leaves).
  // Segments: maximal runs of dense or of expert tensors, in layout order.
  for (const auto& t : lay.tensors()) {
    const bool ex = ParamLayout::is_expert_tensor(t.name);
    if (!segments_.empty() && segments_.back().expert == ex)
      segments_.back().end = t.offset + t.numel;
    else
      segments_.push_back({t.offset, t.offset + t.numel, ex});
  }
  // Leaf hooks: each (micro-batch, source rank) contribution to the experts of a
  // layer is flushed into the fixed-point accumulator on its own.
  auto flush_layer = [this](int layer) {
    auto r = model_->layout().expert_region(layer);
    flush_leaf(r.first, r.second);
  };
  model_->local_expert_stage().after_backward = flush_layer;
  stage_ = install_expert_stage(grid_, *model_);
  if (stage_) stage_->after_source = flush_layer;
  if (zero_ == 1) {
    // Shard of every segment over the ranks that replicate it.
    size_t total = 0, total_v = 0;
    for (const auto& s : segments_) {
      const Comm& c = s.expert ? grid_.edp_comm : grid_.world;
      auto sizes = zero_shard_sizes(lay, oc, s.begin, s.end, c.size());
      size_t b = 0;
      for (int q = 0; q < c.rank(); ++q) b += size_t(sizes[q]);
      const size_t len = size_t(sizes[c.rank()]);
      shards_.push_back({s.begin + b, s.begin + b + len, std::move(sizes)});
      total += len;
      total_v += second_moment_count(oc, lay, s.begin + b, s.begin + b + len);
    }
    zm_.assign(total, T(0));
    zv_.assign(total_v, T(0));  // packed: the AdamW tensors' elements of each shard
    opt_->release_state();      // the unsharded state is not needed
  }
}

template <class T>
void ParallelTrainer<T>::plan_leaves(int micro_batches) {
  // Exact reduction (MODEL.md section 13): every element's value is
  // T(from_fixed(sum of to_fixed(leaf)) over all its leaves on all ranks). The three
  // ways below compute exactly that; they differ only in memory traffic.
  bool need_acc = false;
  size_t slots = 0;
  for (auto& seg : segments_) {
    const Comm& c = seg.expert ? grid_.edp_comm : grid_.world;
    seg.leaves = micro_batches * (seg.expert ? grid_.ep : 1);
    if (force_fixed_) {
      seg.sum = LeafSum::fixed;
      need_acc = true;
    } else if (seg.leaves == 1) {
      seg.sum = LeafSum::single;
    } else if (c.size() == 1 && size_t(seg.leaves) * sizeof(T) <= sizeof(int128)) {
      seg.sum = LeafSum::floats;
      seg.slots = slots;
      slots += size_t(seg.leaves) * (seg.end - seg.begin);
    } else {
      seg.sum = LeafSum::fixed;
      need_acc = true;
    }
  }
  if (leaves_.size() < slots) leaves_.resize(slots);
  regions_.clear();
  if (need_acc && acc_.empty()) acc_.resize(model_->layout().total());
  if (need_acc && !force_fixed_ && partial_.empty()) {
    partial_.resize(model_->layout().total());
    in_fixed_.resize(model_->layout().total());
  }
  // The leaves of a fixed segment go through add_leaf (a double running sum per element
  // while exact, int128 from the first leaf that would not be), which needs no zeroed
  // accumulator; force_fixed_leaf_sum (the tests' reference) adds every leaf in int128.
  for (const auto& seg : segments_) {
    if (seg.sum != LeafSum::fixed) continue;
    if (force_fixed_) {
      std::fill(acc_.begin() + seg.begin, acc_.begin() + seg.end, int128(0));
    } else {
      std::fill(partial_.begin() + seg.begin, partial_.begin() + seg.end, 0.0);
      std::fill(in_fixed_.begin() + seg.begin, in_fixed_.begin() + seg.end, std::uint8_t(0));
    }
  }
}

// The int128 accumulator of fixed segment `seg` complete (add_leaf's running sums folded in).
template <class T>
void ParallelTrainer<T>::fold_fixed(const Segment& seg) {
  if (force_fixed_) return;
  const size_t n = seg.end - seg.begin;
  fold_partials(std::span<int128>(acc_.data() + seg.begin, n), std::span<const double>(partial_.data() + seg.begin, n),
                std::span<const std::uint8_t>(in_fixed_.data() + seg.begin, n));
}

template <class T>
void ParallelTrainer<T>::flush_leaf(size_t begin, size_t end) {
  if (reduction_ == Reduction::fp32) return;  // the leaves just add up in the model's buffer
  profile::Scope ps(profile::Phase::grad_accum);
  auto& g = model_->grads();
  size_t si = 0;
  while (!(segments_[si].begin <= begin && end <= segments_[si].end)) ++si;  // always inside one
  const Segment& seg = segments_[si];
  if (seg.sum == LeafSum::single) {
    // The rank's only leaf of these elements: it stays in the model's buffer for
    // allreduce_sum_fixed, or is the whole sum on one rank (its fixed-point round trip).
    const Comm& c = seg.expert ? grid_.edp_comm : grid_.world;
    if (c.size() == 1) nonfinite_ += round_trip_fixed(std::span<T>(g.data() + begin, end - begin));
    return;
  }
  if (seg.sum == LeafSum::floats) {
    size_t k = 0;
    while (k < regions_.size() && regions_[k].begin != begin) ++k;
    if (k == regions_.size()) regions_.push_back({si, begin, end, 0});
    Region& r = regions_[k];
    if (r.end != end || r.count == seg.leaves)
      throw Error("internal error: gradient leaves of elements [" + std::to_string(begin) + ", " +
                  std::to_string(end) + ") do not follow the plan of " + std::to_string(seg.leaves) + " leaves");
    ++r.count;
    // The last planned leaf stays where the backward put it: sum_float_leaves sums it
    // there, in place (nothing writes these elements after their last leaf).
    if (r.count == seg.leaves) return;
    const size_t len = seg.end - seg.begin;
    const size_t slot = seg.slots + size_t(r.count - 1) * len + (begin - seg.begin);
    std::copy(g.begin() + begin, g.begin() + end, leaves_.begin() + slot);
  } else {
    try {
      const size_t n = end - begin;
      const std::span<const T> leaf(g.data() + begin, n);
      if (force_fixed_)
        nonfinite_ += add_fixed(std::span<int128>(acc_.data() + begin, n), leaf);
      else
        nonfinite_ += add_leaf(std::span<double>(partial_.data() + begin, n),
                               std::span<std::uint8_t>(in_fixed_.data() + begin, n),
                               std::span<int128>(acc_.data() + begin, n), leaf);
    } catch (const Error&) {
      ++nonfinite_;  // a gradient beyond the fixed-point range (2^26): treated like inf
    }
  }
  kernels::parallel_fill(g.data() + begin, int64_t(end - begin), T(0));
}

template <class T>
void ParallelTrainer<T>::sum_float_leaves(const Segment& seg, size_t si) {
  // Each flushed range: the exact sum of its leaves, the last of a complete range read
  // (and the sum written) in the model's buffer, the others from leaves_. A range that
  // got fewer leaves than planned sums those it got (all in leaves_; its elements in the
  // model's buffer were zeroed after each); elements never flushed are 0, as load_fixed
  // of an untouched accumulator gives.
  auto& g = model_->grads();
  const size_t len = seg.end - seg.begin;
  size_t covered = 0;
  for (const Region& r : regions_) {
    if (r.segment != si) continue;
    std::array<const T*, sizeof(int128) / sizeof(T)> rows{};  // plan_leaves: at most this many leaves
    const int in_slots = r.count == seg.leaves ? r.count - 1 : r.count;
    for (int k = 0; k < in_slots; ++k)
      rows[size_t(k)] = leaves_.data() + seg.slots + size_t(k) * len + (r.begin - seg.begin);
    if (in_slots < r.count) rows[size_t(in_slots)] = g.data() + r.begin;
    nonfinite_ += sum_fixed_rows(std::span<const T* const>(rows.data(), size_t(r.count)), r.end - r.begin,
                                 g.data() + r.begin);
    covered += r.end - r.begin;
  }
  if (covered == len) return;
  std::vector<uint8_t> hit(len, 0);  // (rare: some range was never flushed)
  for (const Region& r : regions_)
    if (r.segment == si) std::fill(hit.begin() + (r.begin - seg.begin), hit.begin() + (r.end - seg.begin), 1);
  for (size_t i = 0; i < len; ++i)
    if (!hit[i]) g[seg.begin + i] = T(0);
}

template <class T>
StepResult ParallelTrainer<T>::accumulate(const std::vector<MicroBatch>& batch, const LossHead<T>* head) {
  const int W = grid_.world_size, M = int(batch.size());
  if (M % W != 0)
    throw Error("the global batch has " + std::to_string(M) + " micro-batches, which " + std::to_string(W) +
                " ranks cannot share equally (train.global_batch_size / train.micro_batch_size must be a multiple "
                "of the number of ranks)");
  const int A = M / W, first = grid_.world_rank * A;
  const LossNorm norm = global_loss_norm(batch);
  const int nm = cfg_.num_moe_layers(), E = cfg_.E();
  auto t0 = clock_type::now();
  profile::Scope ps(profile::Phase::grad_accum);
  if (stage_) stage_->stats.reset();
  model_->zero_grad();
  if (reduction_ == Reduction::exact) plan_leaves(A);
  nonfinite_ = 0;
  // Per local micro-batch: ce, aux, seq, z, targets, tokens, dropped, mtp.
  constexpr int kStats = 8;
  std::vector<double> local(size_t(A) * kStats, 0.0);
  std::vector<int64_t> counts(size_t(nm) * E, 0);
  for (int a = 0; a < A; ++a) {
    const MicroBatch& mb = batch[first + a];
    MicroStats s;
    if (head) {
      ForwardOptions fo;
      if (head->replay) fo.replay = head->replay(first + a);
      s = model_->forward(mb, norm, fo);
      auto& dl = model_->dlogits_buffer();
      dl.resize(model_->logits().size());
      s.ce = head->loss(first + a, mb, *model_, dl.data());
      model_->backward(dl.data());
    } else {
      s = model_->forward_backward(mb, norm, true);
    }
    // The dense part of this micro-batch's gradient is one leaf (the experts' leaves
    // were flushed layer by layer during the backward).
    for (const auto& seg : segments_)
      if (!seg.expert) flush_leaf(seg.begin, seg.end);
    double* o = local.data() + size_t(a) * kStats;
    o[0] = s.ce;
    o[1] = s.aux_loss;
    o[2] = s.seq_aux_loss;
    o[3] = s.z_loss;
    o[4] = double(s.n_targets);
    o[5] = double(mb.tokens());
    o[6] = double(s.dropped_pairs);
    o[7] = s.mtp_loss;
    for (int j = 0; j < nm; ++j)
      for (int e = 0; e < E; ++e) counts[size_t(j) * E + e] += s.expert_counts[j][e];
  }
  stats.compute_s += since(t0);
  if (stage_) {
    stats.exchange.dispatch_bytes += stage_->stats.dispatch_bytes;
    stats.exchange.combine_bytes += stage_->stats.combine_bytes;
    stats.exchange.dispatch_s += stage_->stats.dispatch_s;
    stats.exchange.combine_s += stage_->stats.combine_s;
    stats.exchange.overlap_s += stage_->stats.overlap_s;
  }

  // A profiled run (moetune bench) waits for the slowest rank first, so that
  // grad_reduce is the reduction's own time and rank_wait the ranks' imbalance (without
  // the barrier the first collective absorbs it).
  if (profile::active() && grid_.world_size > 1) {
    ps.next(profile::Phase::rank_wait);
    grid_.world.barrier();
  }
  // Reduction of the gradient leaves: exact (int128), or in rank order (fp32). Under
  // fp32 a non-finite value propagates through the sums into the gradient norm.
  ps.next(profile::Phase::grad_reduce);
  t0 = clock_type::now();
  for (size_t si = 0; si < segments_.size(); ++si) {
    const Segment& s = segments_[si];
    const Comm& c = s.expert ? grid_.edp_comm : grid_.world;
    if (c.size() == 1) continue;
    if (zero_ == 1) {
      reduce_shard(si, c);
    } else if (reduction_ == Reduction::exact && s.sum == LeafSum::single) {
      nonfinite_ += c.allreduce_sum_fixed(std::span<T>(model_->grads().data() + s.begin, s.end - s.begin));
      stats.reduce_bytes += int64_t(s.end - s.begin) * int64_t(sizeof(T));
    } else if (reduction_ == Reduction::exact) {
      fold_fixed(s);
      c.allreduce_sum(std::span<int128>(acc_.data() + s.begin, s.end - s.begin));
      stats.reduce_bytes += int64_t(s.end - s.begin) * int64_t(sizeof(int128));
    } else {
      c.allreduce_sum_rank_order(std::span<T>(model_->grads().data() + s.begin, s.end - s.begin));
      stats.reduce_bytes += int64_t(s.end - s.begin) * int64_t(sizeof(T));
    }
  }
  stats.reduce_s += since(t0);
  if (reduction_ == Reduction::exact)
    for (size_t si = 0; si < segments_.size(); ++si) {
      const Segment& seg = segments_[si];
      if (zero_ == 1 && (seg.expert ? grid_.edp_comm : grid_.world).size() > 1) continue;  // reduce_shard did it
      if (seg.sum == LeafSum::floats) sum_float_leaves(seg, si);
      if (seg.sum != LeafSum::fixed) continue;
      const size_t n = seg.end - seg.begin;
      const std::span<T> g(model_->grads().data() + seg.begin, n);
      const std::span<const int128> acc(acc_.data() + seg.begin, n);
      if ((seg.expert ? grid_.edp_comm : grid_.world).size() == 1 && !force_fixed_)  // not folded: no exchange
        load_partials(g, std::span<const double>(partial_.data() + seg.begin, n),
                      std::span<const std::uint8_t>(in_fixed_.data() + seg.begin, n), acc);
      else
        load_fixed(g, acc);
    }

  // Loss terms summed in global micro-batch order; expert loads are exact integers.
  std::vector<double> all(size_t(M) * kStats);
  grid_.world.allgather(std::span<const double>(local), std::span<double>(all));
  grid_.world.allreduce_sum(std::span<int64_t>(counts));
  StepResult r;
  for (int m = 0; m < M; ++m) {
    const double* o = all.data() + size_t(m) * kStats;
    r.loss += o[0];
    r.aux_loss += o[1];
    r.seq_aux_loss += o[2];
    r.z_loss += o[3];
    r.n_targets += int64_t(o[4]);
    r.tokens += int64_t(o[5]);
    r.dropped_pairs += int64_t(o[6]);
    r.mtp_loss += o[7];
  }
  r.total_loss = r.loss + r.aux_loss + r.seq_aux_loss + r.z_loss + r.mtp_loss;
  r.expert_counts.assign(nm, std::vector<int64_t>(E));
  for (int j = 0; j < nm; ++j)
    for (int e = 0; e < E; ++e) r.expert_counts[j][e] = counts[size_t(j) * E + e];
  ps.next(profile::Phase::optimizer);
  r.grad_norm = global_grad_norm_exact();
  // A non-finite (or out-of-range) gradient on any rank makes the step non-finite.
  if (!grid_.world.all_true(nonfinite_ == 0)) r.grad_norm = std::numeric_limits<double>::quiet_NaN();
  return r;
}

// ZeRO-1: a reduce-scatter of segment si, so that this rank's shard (only) holds the
// global gradient, the same values as the all-reduce gives there.
template <class T>
void ParallelTrainer<T>::reduce_shard(size_t si, const Comm& c) {
  const Segment& s = segments_[si];
  const Shard& sh = shards_[si];
  T* g = model_->grads().data();
  const size_t n = s.end - s.begin, len = sh.end - sh.begin;
  if (reduction_ == Reduction::exact && s.sum == LeafSum::fixed) {
    fold_fixed(s);
    shard_acc_.resize(len);
    c.reduce_scatter_sum<int128>(std::span<const int128>(acc_.data() + s.begin, n), std::span<int128>(shard_acc_),
                                 sh.counts);
    load_fixed(std::span<T>(g + sh.begin, len), std::span<const int128>(shard_acc_));
    stats.reduce_bytes += int64_t(n) * int64_t(sizeof(int128));
    return;
  }
  // In place: the shard's sum overwrites this rank's own block of the segment.
  const std::span<const T> in(g + s.begin, n);
  const std::span<T> out(g + sh.begin, len);
  if (reduction_ == Reduction::exact)
    nonfinite_ += c.reduce_scatter_sum_fixed<T>(in, out, sh.counts);
  else
    c.reduce_scatter_sum_rank_order<T>(in, out, sh.counts);
  stats.reduce_bytes += int64_t(n) * int64_t(sizeof(T));
}

template <class T>
double ParallelTrainer<T>::global_grad_norm_exact() {
  // One entry per chunk (kSqChunk elements) of every tensor of the FULL layout, filled by
  // exactly one rank: without ZeRO, the ranks holding a tensor (all ranks for a dense
  // one, its expert-data-parallel group for an expert's) take its chunks in turn; under
  // ZeRO-1 the rank whose shard holds the chunk does.
  // The sum of one value and zeros is exact, and the entries are added in the canonical
  // order (a tensor's chunks first, then the tensors), so the norm does not depend on
  // the layout or the ZeRO stage.
  const ParamLayout full = ParamLayout::build(cfg_);
  std::vector<size_t> first(full.tensors().size() + 1, 0);  // each tensor's first entry
  for (size_t i = 0; i < full.tensors().size(); ++i)
    first[i + 1] = first[i] + (full.tensors()[i].numel + kSqChunk - 1) / kSqChunk;
  std::vector<double> sq(first.back(), 0.0);
  const ParamLayout& lay = model_->layout();
  const auto& g = model_->grads();
  // This rank's chunks: (entry, first element, length), then summed over the threads.
  struct Chunk {
    size_t entry, begin, len;
  };
  std::vector<Chunk> mine;
  for (size_t i = 0; i < full.tensors().size(); ++i) {
    const auto& t = full.tensors()[i];
    if (!lay.contains(t.name)) continue;
    const bool ex = ParamLayout::is_expert_tensor(t.name);
    const size_t at = lay.at(t.name).offset;
    const Shard* sh = nullptr;  // under ZeRO-1: this rank's shard of the segment holding t
    if (zero_ == 1)
      for (size_t si = 0; si < segments_.size(); ++si)
        if (segments_[si].begin <= at && at < segments_[si].end) sh = &shards_[si];
    const Comm& holders = ex ? grid_.edp_comm : grid_.world;
    const size_t H = size_t(holders.size()), me = size_t(holders.rank());
    for (size_t c = 0; c * kSqChunk < t.numel; ++c) {
      const size_t b = at + c * kSqChunk;
      if (sh ? sh->begin <= b && b < sh->end : (first[i] + c) % H == me)
        mine.push_back({first[i] + c, b, std::min(kSqChunk, t.numel - c * kSqChunk)});
    }
  }
  kernels::parallel_for(int64_t(mine.size()), [&](int64_t k) {
    const Chunk& c = mine[size_t(k)];
    sq[c.entry] = chunk_sq(g.data() + c.begin, c.len);
  });
  grid_.world.allreduce_sum(std::span<double>(sq));
  double total = 0;
  for (size_t i = 0; i < full.tensors().size(); ++i) {
    double tensor = 0;
    for (size_t e = first[i]; e < first[i + 1]; ++e) tensor += sq[e];
    total += tensor;
  }
  return std::sqrt(total);
}

template <class T>
void ParallelTrainer<T>::zero_step(double lr, double clip) {
  // ZeRO-1: update this rank's shard of every replicated segment with its sharded
  // state, then all-gather the parameters of the segment.
  auto& p = model_->params();
  const auto& g = model_->grads();
  const ParamLayout& lay = model_->layout();
  ++zstep_;
  size_t mo = 0, vo = 0;  // into zm_ (the shard's elements) and zv_ (packed second moments)
  for (size_t si = 0; si < segments_.size(); ++si) {
    const auto& seg = segments_[si];
    const auto& sh = shards_[si];
    // Elements of the shard, tensor by tensor (decay and optimizer differ per tensor;
    // a Muon matrix is always whole in one shard).
    for (const auto& t : lay.tensors()) {
      const size_t b = std::max(sh.begin, t.offset), e = std::min(sh.end, t.offset + t.numel);
      if (b >= e) continue;
      const bool muon = uses_muon(opt_->config(), t);
      optimizer_update(opt_->config(), t, b - t.offset, e - t.offset, p.data() + b, g.data() + b,
                       zm_.data() + mo + (b - sh.begin), muon ? nullptr : zv_.data() + vo, zstep_, lr, work_, clip);
      if (!muon) vo += e - b;
    }
    mo += sh.end - sh.begin;
    const Comm& c = seg.expert ? grid_.edp_comm : grid_.world;
    const size_t n = seg.end - seg.begin;
    c.allgatherv_in_place(std::span<T>(p.data() + seg.begin, n), sh.counts);
  }
  opt_->set_step_count(zstep_);
}

template <class T>
StepResult ParallelTrainer<T>::step(const std::vector<MicroBatch>& batch, double lr, double max_grad_norm,
                                    const LossHead<T>* head) {
  StepResult r = accumulate(batch, head);
  profile::Scope ps(profile::Phase::optimizer);
  finish_step(r, cfg_, model_->expert_bias(), max_grad_norm, [&](double clip) {
    if (zero_ == 1)
      zero_step(lr, clip);
    else
      opt_->step(model_->params(), model_->grads(), lr, clip);
  });
  return r;
}

template <class T>
double ParallelTrainer<T>::evaluate(const std::vector<MicroBatch>& batches) {
  const int W = grid_.world_size, M = int(batches.size());
  if (M == 0 || M % W != 0)
    throw Error("evaluate: " + std::to_string(M) + " micro-batches cannot be shared by " + std::to_string(W) + " ranks");
  const int A = M / W, first = grid_.world_rank * A;
  std::vector<double> local(size_t(A) * 2), all(size_t(M) * 2);
  for (int a = 0; a < A; ++a) {
    const MicroStats s = model_->forward_backward(batches[first + a], LossNorm{}, false);
    local[2 * a] = s.ce_sum;
    local[2 * a + 1] = double(s.n_targets);
  }
  grid_.world.allgather(std::span<const double>(local), std::span<double>(all));
  double ce = 0, n = 0;
  for (int m = 0; m < M; ++m) {
    ce += all[2 * m];
    n += all[2 * m + 1];
  }
  return n > 0 ? ce / n : 0.0;
}

template <class T>
int64_t ParallelTrainer<T>::optimizer_state_bytes() const {
  if (zero_ == 1) return int64_t(zm_.size() + zv_.size()) * int64_t(sizeof(T));
  return int64_t(opt_->state_elements()) * int64_t(sizeof(T));
}

template <class T>
void ParallelTrainer<T>::gather_optimizer_state(std::vector<T>& m, std::vector<T>& v) {
  if (zero_ == 0) {
    m = opt_->exp_avg();
    v = opt_->exp_avg_sq();  // unpacked over the layout
    return;
  }
  const size_t total = model_->layout().total();
  m.assign(total, T(0));
  v.assign(total, T(0));
  const OptimizerConfig& oc = opt_->config();
  const ParamLayout& lay = model_->layout();
  size_t mo = 0, vo = 0;
  std::vector<T> full;
  for (size_t si = 0; si < segments_.size(); ++si) {
    const auto& seg = segments_[si];
    const auto& sh = shards_[si];
    const Comm& c = seg.expert ? grid_.edp_comm : grid_.world;
    const size_t n = seg.end - seg.begin;
    const size_t len = sh.end - sh.begin;
    c.allgatherv(std::span<const T>(zm_.data() + mo, len), std::span<T>(m.data() + seg.begin, n), sh.counts);
    full.resize(len);
    unpack_second_moments(oc, lay, sh.begin, sh.end, zv_.data() + vo, full.data());
    c.allgatherv(std::span<const T>(full), std::span<T>(v.data() + seg.begin, n), sh.counts);
    mo += len;
    vo += second_moment_count(oc, lay, sh.begin, sh.end);
  }
}

template <class T>
void ParallelTrainer<T>::set_optimizer_state(const std::vector<T>& m, const std::vector<T>& v, int64_t step) {
  if (zero_ == 0) {
    opt_->exp_avg() = m;
    opt_->set_exp_avg_sq(v);
    opt_->set_step_count(step);
    return;
  }
  const OptimizerConfig& oc = opt_->config();
  const ParamLayout& lay = model_->layout();
  size_t mo = 0, vo = 0;
  for (const auto& sh : shards_) {
    std::copy(m.begin() + sh.begin, m.begin() + sh.end, zm_.begin() + mo);
    pack_second_moments(oc, lay, sh.begin, sh.end, v.data() + sh.begin, zv_.data() + vo);
    mo += sh.end - sh.begin;
    vo += second_moment_count(oc, lay, sh.begin, sh.end);
  }
  zstep_ = step;
  opt_->set_step_count(step);
}

template class ParallelTrainer<float>;
template class ParallelTrainer<double>;
template std::unique_ptr<AllToAllExpertStage<float>> install_expert_stage(ProcessGrid&, Model<float>&);
template std::unique_ptr<AllToAllExpertStage<double>> install_expert_stage(ProcessGrid&, Model<double>&);

}  // namespace moetune::dist
