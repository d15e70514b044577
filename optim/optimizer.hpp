// The training optimizer chosen by optim.name: "adamw" (MODEL.md section 5, every
// tensor) or "muon" (section 12: Muon for the rank-2 matrices of is_muon_tensor, AdamW
// for the embedding, the LM head and the RMSNorm weights). One per-tensor dispatch,
// optimizer_update, serves the single-process step (Optimizer::step) and the sharded
// ZeRO-1 step of dist/parallel_trainer.cpp.
//
// State: exp_avg, one flat buffer over the ParamLayout, holds AdamW's m of an AdamW
// tensor and Muon's momentum buffer of a Muon tensor; AdamW's v is kept only for the
// AdamW tensors, packed in layout order ("compact"; under Muon the matrices have none).
// exp_avg_sq() unpacks it over the layout (zero elsewhere) for checkpoints, which name
// the tensors by optimizer_state_names.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "moe/params.hpp"
#include "optim/adamw.hpp"
#include "optim/muon.hpp"

namespace moetune {

struct OptimizerConfig {
  std::string name = "adamw";  // "adamw" | "muon"
  AdamWConfig adamw;
  MuonConfig muon;
  bool muon_enabled() const { return name == "muon"; }
};
// Throws moetune::Error naming the key (optim.name, then those of the AdamW/Muon configs).
void validate(const OptimizerConfig& c);

// Whether cfg updates tensor t with Muon (else AdamW).
inline bool uses_muon(const OptimizerConfig& cfg, const TensorInfo& t) {
  return cfg.muon_enabled() && is_muon_tensor(t);
}

// The update of elements [t.offset + b, t.offset + e) of tensor t at step `step` (>= 1)
// and scheduled learning rate lr; p, g, m, v point at element b (v is not used, and may
// be null, for a Muon tensor). A Muon tensor must be given whole (b = 0, e = t.numel):
// its orthogonalisation needs the whole matrix. clip: the gradient clipping
// coefficient, applied to each gradient element as it is read (AdamW::step).
template <class T>
void optimizer_update(const OptimizerConfig& cfg, const TensorInfo& t, size_t b, size_t e, T* p, const T* g, T* m,
                      T* v, int64_t step, double lr, std::vector<T>& work, double clip = 1.0);

// The optimizer-state tensors of parameter t as saved in optimizer.safetensors:
// (suffix, slot) with slot 0 = the exp_avg buffer, 1 = the exp_avg_sq buffer. AdamW:
// ".exp_avg" (0) and ".exp_avg_sq" (1); a Muon tensor under "muon": ".momentum_buffer"
// (0), the name torch.optim.SGD and the common Muon implementations give it.
struct StateTensorName {
  std::string suffix;
  int slot;
};
std::vector<StateTensorName> optimizer_state_names(const std::string& optimizer, const TensorInfo& t);

// The second moments of the flat range [b, e) of `layout`, packed: the elements of the
// AdamW tensors (not Muon matrices, not padding) in layout order. second_moment_count
// is their number; unpack writes them into full[0, e - b) (zero elsewhere), pack reads
// them back.
size_t second_moment_count(const OptimizerConfig& cfg, const ParamLayout& layout, size_t b, size_t e);
template <class T>
void unpack_second_moments(const OptimizerConfig& cfg, const ParamLayout& layout, size_t b, size_t e, const T* packed,
                           T* full);
template <class T>
void pack_second_moments(const OptimizerConfig& cfg, const ParamLayout& layout, size_t b, size_t e, const T* full,
                         T* packed);

template <class T>
class Optimizer {
 public:
  Optimizer(const ParamLayout& layout, OptimizerConfig cfg);
  // One step at the scheduled learning rate lr: t += 1, then optimizer_update of every
  // tensor of the layout (padding between tensors is never touched), the gradients
  // clipped by `clip` as they are read.
  void step(std::vector<T>& params, const std::vector<T>& grads, double lr, double clip = 1.0);

  std::vector<T>& exp_avg() { return m_; }
  const std::vector<T>& exp_avg() const { return m_; }
  // AdamW's v over the whole layout (layout.total(); zero over Muon matrices and padding).
  std::vector<T> exp_avg_sq() const;
  void set_exp_avg_sq(const std::vector<T>& full);
  // Elements of state held (exp_avg + the packed second moments).
  size_t state_elements() const { return m_.size() + v_.size(); }
  // Frees the state (ZeRO-1 keeps its own shards).
  void release_state();
  int64_t step_count() const { return t_; }
  void set_step_count(int64_t t) { t_ = t; }
  const OptimizerConfig& config() const { return cfg_; }

 private:
  const ParamLayout* layout_;
  OptimizerConfig cfg_;
  std::vector<T> m_, v_, work_;  // v_: packed second moments
  std::vector<size_t> muon_tensors_;  // indices (layout order) of the tensors Muon updates
  int64_t t_ = 0;
};

extern template class Optimizer<float>;
extern template class Optimizer<double>;

}  // namespace moetune
