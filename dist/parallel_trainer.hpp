// One optimizer step over the process grid (data + expert parallelism), with results
// that do not depend on the layout. How:
//  - every rank builds the same global batch, a fixed sequence of M micro-batches;
//    rank r runs micro-batches [r*M/W, (r+1)*M/W);
//  - each micro-batch's gradient (and, under expert parallelism, each source rank's
//    contribution to an expert) is one "leaf", computed on exactly the rows rank 1
//    would use; leaves are summed in 128-bit fixed point (value * 2^100), which is
//    exact, so the sum is the same in any order and over any reduction tree;
//  - dense gradients are reduced over all W ranks, expert gradients over their
//    expert-data-parallel group (MPI_Allreduce on the 128-bit integers);
//  - loss terms are gathered per micro-batch and summed in global micro-batch order;
//    the gradient norm is summed per tensor in the canonical tensor order.
// Each rank's GEMMs see the same shapes as on one rank, so with the same number of
// threads per rank every layout gives bit-identical weights.
#pragma once
#include <functional>
#include <memory>
#include <vector>

#include "dist/a2a_stage.hpp"
#include "dist/grid.hpp"
#include "dist/int128.hpp"
#include "moe/model.hpp"
#include "optim/adamw.hpp"
#include "optim/optimizer.hpp"
#include "train/step.hpp"

namespace moetune::dist {

struct ParallelStats {
  ExchangeStats exchange;     // dispatch/combine bytes and seconds (this rank)
  int64_t reduce_bytes = 0;   // gradient bytes this rank contributed to reductions
  double reduce_s = 0;        // seconds in gradient reduction
  double compute_s = 0;       // seconds in forward/backward (including exchanges)
};

// A loss other than cross-entropy (the RL objective): for micro-batch m (index in the
// global batch) after the model's forward, `loss` writes d loss / d logits (tokens, V)
// into dlogits and returns the micro-batch's contribution to the step's loss (already
// normalised over the whole global batch). `replay`, if set, gives the routing to
// replay in micro-batch m's forward (nullptr = route live).
template <class T>
struct LossHead {
  std::function<double(int m, const MicroBatch& mb, const Model<T>& model, T* dlogits)> loss;
  std::function<const RoutingTrace*(int m)> replay;
};

// The all-to-all expert stage of `model` over the grid's expert-parallel group,
// installed in the model (nullptr and nothing installed when ep == 1).
template <class T>
std::unique_ptr<AllToAllExpertStage<T>> install_expert_stage(ProcessGrid& grid, Model<T>& model);

// How the gradient leaves become the global gradient (parallel.reduction):
//   exact: int128 fixed-point sums, the same bits on every layout (docs/parallel.md);
//   fp32:  the micro-batches' gradients accumulate in the model's own buffer (T) and
//          are all-reduced in rank order (Comm::allreduce_sum_rank_order): faster,
//          deterministic for a given layout, but not layout-invariant.
enum class Reduction { exact, fp32 };
// "exact" | "fp32"; Error naming `key` otherwise.
Reduction parse_reduction(const std::string& name, const std::string& key);

template <class T>
class ParallelTrainer {
 public:
  // zero_stage 1 shards the optimizer state of each replicated tensor over the ranks
  // that replicate it (all W for dense tensors, the EDP group for experts). Under Muon
  // a shard holds whole matrices (the orthogonalisation needs the whole matrix): shard
  // boundaries that would cut a Muon matrix move to one of its ends, and the rank whose
  // shard holds a matrix alone computes its update (for an expert: a rank of the EP
  // group that owns the expert), then all-gathers it.
  ParallelTrainer(const ModelConfig& cfg, ProcessGrid& grid, const OptimizerConfig& oc, int zero_stage = 0,
                  Reduction reduction = Reduction::exact);
  // AdamW (optim.name = "adamw").
  ParallelTrainer(const ModelConfig& cfg, ProcessGrid& grid, const AdamWConfig& ac, int zero_stage = 0,
                  Reduction reduction = Reduction::exact);

  Model<T>& model() { return *model_; }
  Optimizer<T>& optimizer() { return *opt_; }
  ProcessGrid& grid() { return grid_; }
  int zero_stage() const { return zero_; }
  Reduction reduction() const { return reduction_; }

  // Collective. Forward/backward of this rank's share of the global batch and the
  // exact reduction; afterwards model().grads() holds the global gradient of this
  // rank's tensors (identical on every rank that holds a tensor). Under ZeRO-1 the
  // reduction is a reduce-scatter: only this rank's shards hold the global gradient
  // (the rest of the buffer keeps this rank's own contribution, which nothing reads).
  // `head` replaces the cross-entropy (StepResult::loss is then its loss).
  StepResult accumulate(const std::vector<MicroBatch>& global_batch, const LossHead<T>* head = nullptr);
  // Collective. accumulate + clip + optimizer (AdamW or Muon) + expert-bias update.
  StepResult step(const std::vector<MicroBatch>& global_batch, double lr, double max_grad_norm,
                  const LossHead<T>* head = nullptr);

  // Collective. Cross-entropy (mean over every target) of a fixed set of micro-batches,
  // forward only; their number must be a multiple of the number of ranks.
  double evaluate(const std::vector<MicroBatch>& batches);

  // Bytes of optimizer state this rank holds (exp_avg, and exp_avg_sq of the AdamW tensors).
  int64_t optimizer_state_bytes() const;
  // Full (unsharded) optimizer state of this rank's tensors (Optimizer's exp_avg /
  // exp_avg_sq buffers), gathered for checkpoints; collective when zero_stage == 1.
  void gather_optimizer_state(std::vector<T>& exp_avg, std::vector<T>& exp_avg_sq);
  // Install full moments (from a checkpoint) into this rank's (possibly sharded) state.
  void set_optimizer_state(const std::vector<T>& exp_avg, const std::vector<T>& exp_avg_sq, int64_t step);

  // Bytes of the int128 gradient accumulator this rank holds (0 until a step needs it:
  // exact reduction with more than one rank or micro-batch).
  int64_t accumulator_bytes() const { return int64_t(acc_.size() * sizeof(int128)); }

  // For tests: sum every leaf in the int128 accumulator (LeafSum::fixed), the plain
  // form the faster ways must match bit for bit.
  // parallel.overlap_a2a: run the MoE layers' expert-independent work while the tokens
  // are in flight (dist/a2a_stage.hpp; the same bits either way). No effect at ep = 1.
  void set_overlap_a2a(bool on) {
    if (stage_) stage_->overlap = on;
  }
  void force_fixed_leaf_sum(bool on) { force_fixed_ = on; }

  ParallelStats stats;

 private:
  // How the exact reduction sums a segment's leaves this step (plan_leaves). Each
  // element of a segment gets the same number of leaves on this rank: one per local
  // micro-batch, times the ep source ranks for an expert segment.
  enum class LeafSum {
    single,  // one leaf: it stays in the model's buffer (round_trip_fixed / allreduce_sum_fixed)
    floats,  // 2..4 leaves and no other rank: kept as T in leaves_, summed by sum_fixed_rows
    fixed,   // otherwise: added into the int128 acc_ (add_fixed), all-reduced, load_fixed
  };
  struct Segment {  // a contiguous run of the flat buffer reduced over one communicator
    size_t begin, end;
    bool expert;
    LeafSum sum = LeafSum::fixed;
    int leaves = 0;       // leaves per element on this rank, this step
    size_t slots = 0;     // LeafSum::floats: offset of its `leaves` rows in leaves_
  };
  struct Region {  // a flushed range of a LeafSum::floats segment, and its leaves so far
    size_t segment, begin, end;
    int count;
  };
  void plan_leaves(int micro_batches);
  void flush_leaf(size_t begin, size_t end);
  void sum_float_leaves(const Segment& seg, size_t si);
  void reduce_shard(size_t si, const Comm& c);
  void fold_fixed(const Segment& seg);
  double global_grad_norm_exact();
  void zero_step(double lr, double clip);

  ProcessGrid& grid_;
  ModelConfig cfg_;
  std::unique_ptr<Model<T>> model_;
  std::unique_ptr<Optimizer<T>> opt_;
  std::unique_ptr<AllToAllExpertStage<T>> stage_;
  std::vector<int128> acc_;  // exact reduction only, allocated when first needed
  std::vector<double> partial_;         // add_leaf's running sums (fixed segments), allocated with acc_
  std::vector<std::uint8_t> in_fixed_;  // 1 where an element's sum moved to acc_
  std::vector<T> leaves_;      // LeafSum::floats: the leaves, row after row per segment
  std::vector<Region> regions_;  // LeafSum::floats: the ranges flushed this step
  bool force_fixed_ = false;
  std::vector<Segment> segments_;
  int zero_ = 0;
  Reduction reduction_ = Reduction::exact;
  size_t nonfinite_ = 0;  // non-finite gradient values met in this step's leaves
  // ZeRO-1: per segment, this rank's shard [begin, end), the shard sizes of every rank
  // of the segment's communicator, and the optimizer state of the shards.
  struct Shard {
    size_t begin, end;
    std::vector<int64_t> counts;
  };
  std::vector<Shard> shards_;
  std::vector<T> work_;  // Newton-Schulz scratch
  std::vector<T> zm_, zv_;  // state of the shards, concatenated (zv_ packed: AdamW tensors only)
  std::vector<int128> shard_acc_;    // the same for a segment summed in the int128 accumulator
  int64_t zstep_ = 0;
};

extern template class ParallelTrainer<float>;
extern template class ParallelTrainer<double>;

}  // namespace moetune::dist
