// AdamW exactly as torch.optim.AdamW (MODEL.md section 5), global-norm gradient
// clipping as torch.nn.utils.clip_grad_norm_, over the flat buffers of a ParamLayout.
#pragma once
#include <cstdint>
#include <span>
#include <vector>

#include "moe/params.hpp"

namespace moetune {

struct AdamWConfig {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.0;  // applied to tensors with TensorInfo::decay only
};
// Throws moetune::Error naming the key (optim.beta1, optim.beta2, optim.eps,
// optim.weight_decay) when a value is out of range.
void validate(const AdamWConfig& c);

template <class T>
class AdamW {
 public:
  AdamW(const ParamLayout& layout, AdamWConfig cfg);
  // One step at learning rate lr: t += 1, then for every tensor of the layout
  // p *= 1 - lr*wd (decay tensors only); m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
  // p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)   (torch's operation order).
  // clip: the gradient clipping coefficient (clip_coefficient), applied as each element
  // is read: g * T(clip), the bits scale_grads would have left in grads, without a pass
  // of its own (grads is not changed).
  void step(std::vector<T>& params, const std::vector<T>& grads, double lr, double clip = 1.0);

  std::vector<T>& exp_avg() { return m_; }
  std::vector<T>& exp_avg_sq() { return v_; }
  const std::vector<T>& exp_avg() const { return m_; }
  const std::vector<T>& exp_avg_sq() const { return v_; }
  int64_t step_count() const { return t_; }
  void set_step_count(int64_t t) { t_ = t; }
  const AdamWConfig& config() const { return cfg_; }

 private:
  const ParamLayout* layout_;
  AdamWConfig cfg_;
  std::vector<T> m_, v_;
  int64_t t_ = 0;
};

// The per-element AdamW update of n contiguous elements at step `step` (>= 1): what
// AdamW::step does to each tensor; ZeRO-1 applies it to a shard. clip as in AdamW::step.
template <class T>
void adamw_update(T* p, const T* g, T* m, T* v, int64_t n, bool decay, const AdamWConfig& cfg, int64_t step,
                  double lr, double clip = 1.0);

// L2 norm over all elements of grads (accumulated in double). Partial sums over fixed
// chunks of the flat buffer are added in chunk order, so the result is bit-identical
// for any number of OpenMP threads.
template <class T>
double global_grad_norm(const std::vector<T>& grads);
// clip_grad_norm_: coefficient min(1, max_norm / (norm + 1e-6)); max_norm <= 0 = off (1).
// A NaN norm gives a NaN coefficient (torch.clamp propagates NaN too).
double clip_coefficient(double norm, double max_norm);
template <class T>
void scale_grads(std::vector<T>& grads, double coef);
template <class T>
void scale_grads(std::span<T> grads, double coef);

extern template class AdamW<float>;
extern template class AdamW<double>;

}  // namespace moetune
