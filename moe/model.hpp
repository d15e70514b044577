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
  double n_mtp_targets = 1;  // MTP targets (token t+2) in the global batch (0 is treated as 1)
};

// What one micro-batch's forward produced. Losses are this micro-batch's
// contribution to the global-batch loss (already divided by the LossNorm).
struct MicroStats {
  double ce = 0;        // sum of CE over targets / norm.n_targets
  double ce_sum = 0;    // raw sum of CE over targets
  int64_t n_targets = 0;
  double aux_loss = 0, seq_aux_loss = 0, z_loss = 0;
  // MTP (MODEL.md section 12): mtp_loss_weight * sum of the MTP block's CE over its
  // targets / norm.n_mtp_targets; 0 when the block did not run.
  double mtp_loss = 0;
  int64_t n_mtp_targets = 0;
  // [moe layer j][expert e]: routed pairs (before capacity drops).
  std::vector<std::vector<int64_t>> expert_counts;
  int64_t dropped_pairs = 0;
  double total() const { return ce + aux_loss + seq_aux_loss + z_loss + mtp_loss; }
};

// The expert selections of every MoE layer for the N tokens of one forward (or one
// cached extension): idx[j] and kept[j], (N*K) each, of MoE layer j. Recorded by a
// forward, replayed by another (routing replay, MODEL.md section 11).
struct RoutingTrace {
  std::vector<std::vector<int32_t>> idx;
  std::vector<std::vector<uint8_t>> kept;
};

struct ForwardOptions {
  // Keep every activation the backward needs. false (inference): only work buffers
  // shared by all layers; backward() must not follow.
  bool train = true;
  const RoutingTrace* replay = nullptr;  // force these expert selections
  RoutingTrace* record = nullptr;        // copy out the selections made
  // Also run the MTP block (num_nextn_predict_layers = 1) and its loss (MicroStats::
  // mtp_loss; its gradient is added by backward()). forward_backward() sets it; a forward
  // for a caller's own loss head (RL) runs the main model only: the MTP MoE layer then
  // routes nothing (zero counts, empty trace).
  bool mtp = false;
};

// Keys (after RoPE) and values of every cached position (MODEL.md section 10):
// row r's position p of layer l is at k[l][(r * capacity + p) * Hkv*hd]. V4 attention
// (MODEL.md 12) caches its one shared key/value head, after RoPE, in k (hd per
// position); its v is empty.
template <class T>
struct KvCache {
  int rows = 0, capacity = 0;
  std::vector<int32_t> len;          // (rows) positions cached per row
  std::vector<std::vector<T>> k, v;  // [layer] (rows * capacity, Hkv*hd)
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
  // MoE layer j is model layer cfg.moe_layer(j): first_k_dense_replace + j, and the MTP
  // block's MoE layer last (j = num_moe_layers() - 1 with MTP). A hash-routed layer
  // (j < num_hash_layers) has no bias: its row is empty.
  std::vector<std::vector<float>>& expert_bias() { return bias_; }
  const std::vector<std::vector<float>>& expert_bias() const { return bias_; }
  // Hash-routing tables, [hash layer j][V*K] (MoE layer j; MODEL.md section 12): row v
  // holds the K experts of input token v. Set by init() or a checkpoint; never trained.
  std::vector<std::vector<int32_t>>& tid2eid() { return tid2eid_; }
  const std::vector<std::vector<int32_t>>& tid2eid() const { return tid2eid_; }

  void init(uint64_t seed);  // MODEL.md section 6 (and the default tid2eid tables, section 12)
  void zero_grad();

  // Forward of one micro-batch: logits() (tokens, V), the balance losses and expert
  // counts in the result (ce left 0; n_targets counted). `norm` scales the balance
  // losses. The loss head is the caller's: it turns logits() into dlogits.
  MicroStats forward(const MicroBatch& mb, const LossNorm& norm, const ForwardOptions& opt = {});
  // Backward of the last training forward from dlogits (tokens, V) = d loss / d logits;
  // the balance losses' gradients are added; parameter gradients accumulate (+=).
  void backward(const T* dlogits);
  // forward + cross-entropy head (sum over targets / norm.n_targets) + backward (if
  // `backward`): the supervised step of MODEL.md section 3.
  MicroStats forward_backward(const MicroBatch& mb, const LossNorm& norm, bool backward = true);
  // Logits (tokens, V) of the last forward, row-major; targets (tokens) it used
  // (labels shifted by one, -100 where there is none).
  const std::vector<T>& logits() const;
  const std::vector<int32_t>& targets() const;
  // MTP (MODEL.md section 12): logits (tokens, V) of the MTP block in the last forward
  // that ran it (predicting token t+2), and its targets (-100 where there is none).
  const std::vector<T>& mtp_logits() const;
  const std::vector<int32_t>& mtp_targets() const;
  // A work buffer of logits' size for the caller's loss head (reused across calls).
  std::vector<T>& dlogits_buffer();
  // Bytes held by the activation and work buffers of the forward/backward (capacity of
  // the kept activations, MoE caches, logits and gradient work buffers; the expert
  // stage's own caches are not counted). For `moetune bench`'s memory line.
  int64_t activation_bytes() const;

  // Inference with a KV cache (MODEL.md section 10). kv_init sizes an empty cache of
  // `rows` rows of `capacity` positions. extend feeds n new tokens: token i goes to
  // cache row row[i] at its next position (a row's tokens in order); logits (m, V) get
  // the logits of the last new token of each distinct row, in order of first
  // appearance. No backward state is kept. Under expert parallelism every rank of the
  // group must call extend the same number of times (n may be 0).
  void kv_init(KvCache<T>& kv, int rows, int capacity) const;
  void extend(KvCache<T>& kv, const int32_t* row, const int32_t* tokens, int64_t n, std::vector<T>& logits,
              RoutingTrace* record = nullptr);

  // Where the routed experts run: by default the local stage over this model's
  // experts (all E unless an expert range was given); dist/ installs the all-to-all
  // stage. The model does not own a stage set here.
  void set_expert_stage(ExpertStage<T>* stage);
  LocalExpertStage<T>& local_expert_stage();
  // Views of this model's routed experts of model layer l (index 0 = expert_begin).
  // This process's experts of MoE layer `layer` (its index in the model), built once and
  // kept (rebuilt only if the parameter buffers moved): no allocation per call.
  const ExpertViews<T>& expert_views(int layer);

 private:
  struct Impl;
  ModelConfig cfg_;
  ParamLayout layout_;
  std::vector<T> params_, grads_;
  std::vector<std::vector<float>> bias_;
  std::vector<std::vector<int32_t>> tid2eid_;
  std::unique_ptr<Impl> impl_;
  std::unique_ptr<LocalExpertStage<T>> local_stage_;
  ExpertStage<T>* stage_ = nullptr;
};

extern template class Model<float>;
extern template class Model<double>;

}  // namespace moetune
