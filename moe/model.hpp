// The DeepSeek-style MoE transformer of MODEL.md sections 2-3: hand-written forward
// and backward for one micro-batch, gradients accumulated (+=) into a flat buffer.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "moe/batch.hpp"
#include "moe/config.hpp"
#include "moe/params.hpp"

namespace moetune {

// Normalisers of the whole global batch (every micro-batch on every rank), so that
// the loss and its gradient are the global-batch quantities of MODEL.md section 3.
struct LossNorm {
  double n_targets = 1;  // non-ignored targets in the global batch (0 is treated as 1)
  int n_micro = 1;       // micro-batches in the global batch
  int n_rows = 1;        // batch rows (sequences) in the global batch
};

// What one micro-batch's forward produced. Losses are this micro-batch's
// contribution to the global-batch loss (already divided by the LossNorm).
struct MicroStats {
  double ce = 0;        // sum of CE over targets / norm.n_targets
  double ce_sum = 0;    // raw sum of CE over targets
  int64_t n_targets = 0;
  double aux_loss = 0, seq_aux_loss = 0, z_loss = 0;
  // [moe layer j][expert e]: routed pairs (before capacity drops).
  std::vector<std::vector<int64_t>> expert_counts;
  int64_t dropped_pairs = 0;
  double total() const { return ce + aux_loss + seq_aux_loss + z_loss; }
};

template <class T>
class ExpertStage;
template <class T>
class LocalExpertStage;
template <class T>
struct ExpertViews;

template <class T>
class Model {
 public:
  // The whole model, or (expert parallelism) the dense part plus routed experts
  // [expert_begin, expert_end) of every MoE layer.
  explicit Model(const ModelConfig& cfg, int expert_begin = 0, int expert_end = -1);
  ~Model();
  Model(const Model&) = delete;  // the local expert stage points back at this object
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const { return cfg_; }
  const ParamLayout& layout() const { return layout_; }
  std::vector<T>& params() { return params_; }
  const std::vector<T>& params() const { return params_; }
  std::vector<T>& grads() { return grads_; }
  const std::vector<T>& grads() const { return grads_; }
  // Aux-loss-free routing bias, [moe layer j][E], fp32, never trained by gradient.
  // MoE layer j is model layer first_k_dense_replace + j.
  std::vector<std::vector<float>>& expert_bias() { return bias_; }
  const std::vector<std::vector<float>>& expert_bias() const { return bias_; }

  void init(uint64_t seed);  // MODEL.md section 6
  void zero_grad();

  // Forward (and, if `backward`, backward accumulating into grads()) for one micro-batch.
  MicroStats forward_backward(const MicroBatch& mb, const LossNorm& norm, bool backward = true);
  // Logits (tokens, V) of the last forward, row-major.
  const std::vector<T>& logits() const;

  // Where the routed experts run: by default the local stage over this model's
  // experts (all E unless an expert range was given); dist/ installs the all-to-all
  // stage. The model does not own a stage set here.
  void set_expert_stage(ExpertStage<T>* stage);
  LocalExpertStage<T>& local_expert_stage();
  // Views of this model's routed experts of model layer l (index 0 = expert_begin).
  ExpertViews<T> expert_views(int layer);

 private:
  struct Impl;
  ModelConfig cfg_;
  ParamLayout layout_;
  std::vector<T> params_, grads_;
  std::vector<std::vector<float>> bias_;
  std::unique_ptr<Impl> impl_;
  std::unique_ptr<LocalExpertStage<T>> local_stage_;
  ExpertStage<T>* stage_ = nullptr;
};

extern template class Model<float>;
extern template class Model<double>;

}  // namespace moetune
