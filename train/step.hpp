// One optimizer step over a global batch (MODEL.md sections 3-5): forward/backward
// of every micro-batch with global normalisers, global-norm clipping, AdamW, then the
// aux-loss-free bias update. Non-finite loss or gradient norm skips the update.
#pragma once
#include <cstdint>
#include <functional>
#include <span>
#include <utility>
#include <vector>

#include "moe/batch.hpp"
#include "moe/model.hpp"
#include "optim/adamw.hpp"
#include "optim/optimizer.hpp"

namespace moetune {

struct StepResult {
  double loss = 0;  // cross-entropy over the global batch (the reported "loss")
  double aux_loss = 0, seq_aux_loss = 0, z_loss = 0;
  double mtp_loss = 0;  // mtp_loss_weight * the MTP block's cross-entropy (0 without MTP)
  double total_loss = 0;
  double grad_norm = 0;    // before clipping
  double clip_coef = 1;
  int64_t tokens = 0;      // rows * seq_len over the global batch
  int64_t n_targets = 0;
  int64_t dropped_pairs = 0;
  std::vector<std::vector<int64_t>> expert_counts;  // [moe layer][E], global batch, before drops
  bool skipped = false;    // non-finite loss or grad norm: nothing was updated
};

// Sum of the micro-batches' statistics needed before any forward: target and row counts.
LossNorm global_loss_norm(const std::vector<MicroBatch>& batch);

// Forward/backward over the global batch into model.grads() (zeroed first).
template <class T>
StepResult accumulate_gradients(Model<T>& model, const std::vector<MicroBatch>& batch);

// accumulate_gradients + clip + AdamW at lr + bias update.
template <class T>
StepResult train_step(Model<T>& model, AdamW<T>& opt, const std::vector<MicroBatch>& batch, double lr,
                      double max_grad_norm);
// The same with the optimizer of optim.name (AdamW, or Muon for the matrices).
template <class T>
StepResult train_step(Model<T>& model, Optimizer<T>& opt, const std::vector<MicroBatch>& batch, double lr,
                      double max_grad_norm);

// What follows the gradient in every step (single process and dist::ParallelTrainer):
// a non-finite loss or gradient norm marks r skipped and changes nothing; otherwise
// r.clip_coef = the clipping coefficient for max_grad_norm, update(clip) (the optimizer,
// which scales each gradient element by clip as it reads it: the bits of
// scale_grads(grads, clip) then a step, without the pass over the gradients) and the
// aux-loss-free bias update (noaux_tc).
void finish_step(StepResult& r, const ModelConfig& cfg, std::vector<std::vector<float>>& bias, double max_grad_norm,
                 const std::function<void(double clip)>& update);

// b_i += rate * sign(mean(c) - c_i) per MoE layer (noaux_tc only), computed in double
// and stored as fp32.
void update_expert_bias(std::vector<std::vector<float>>& bias, const std::vector<std::vector<int64_t>>& counts,
                        double rate);

}  // namespace moetune
