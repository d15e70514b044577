// optim.name dispatch: AdamW or Muon per tensor (optimizer.hpp).
#include "optim/optimizer.hpp"

#include <algorithm>

#include "moe/error.hpp"

namespace moetune {

void validate(const OptimizerConfig& c) {
  if (c.name != "adamw" && c.name != "muon")
    throw Error("key 'optim.name': must be one of \"adamw\", \"muon\", got \"" + c.name + "\"");
  validate(c.adamw);
  if (c.muon_enabled()) validate(c.muon);
}

template <class T>
void optimizer_update(const OptimizerConfig& cfg, const TensorInfo& t, size_t b, size_t e, T* p, const T* g, T* m,
                      T* v, int64_t step, double lr, std::vector<T>& work, double clip) {
  if (uses_muon(cfg, t)) {
    if (b != 0 || e != t.numel)
      throw Error("optimizer_update: Muon needs the whole matrix " + t.name + ", got elements [" + std::to_string(b) +
                  ", " + std::to_string(e) + ")");
    muon_update(p, g, m, t.shape[0], t.shape[1], cfg.muon, lr, work, clip);
    return;
  }
  adamw_update(p, g, m, v, int64_t(e - b), t.decay, cfg.adamw, step, lr, clip);
}

std::vector<StateTensorName> optimizer_state_names(const std::string& optimizer, const TensorInfo& t) {
  if (optimizer == "muon" && is_muon_tensor(t)) return {{".momentum_buffer", 0}};
  return {{".exp_avg", 0}, {".exp_avg_sq", 1}};
}

size_t second_moment_count(const OptimizerConfig& cfg, const ParamLayout& layout, size_t b, size_t e) {
  size_t n = 0;
  for (const TensorInfo& t : layout.tensors()) {
    const size_t lo = std::max(b, t.offset), hi = std::min(e, t.offset + t.numel);
    if (lo < hi && !uses_muon(cfg, t)) n += hi - lo;
  }
  return n;
}

template <class T>
void unpack_second_moments(const OptimizerConfig& cfg, const ParamLayout& layout, size_t b, size_t e, const T* packed,
                           T* full) {
  std::fill(full, full + (e - b), T(0));
  for (const TensorInfo& t : layout.tensors()) {
    const size_t lo = std::max(b, t.offset), hi = std::min(e, t.offset + t.numel);
    if (lo >= hi || uses_muon(cfg, t)) continue;
    std::copy(packed, packed + (hi - lo), full + (lo - b));
    packed += hi - lo;
  }
}

template <class T>
void pack_second_moments(const OptimizerConfig& cfg, const ParamLayout& layout, size_t b, size_t e, const T* full,
                         T* packed) {
  for (const TensorInfo& t : layout.tensors()) {
    const size_t lo = std::max(b, t.offset), hi = std::min(e, t.offset + t.numel);
    if (lo >= hi || uses_muon(cfg, t)) continue;
    packed = std::copy(full + (lo - b), full + (hi - b), packed);
  }
}

template <class T>
Optimizer<T>::Optimizer(const ParamLayout& layout, OptimizerConfig cfg)
    : layout_(&layout),
      cfg_(std::move(cfg)),
      m_(layout.total(), T(0)),
      v_(second_moment_count(cfg_, layout, 0, layout.total()), T(0)) {
  validate(cfg_);
  for (size_t i = 0; i < layout.tensors().size(); ++i)
    if (uses_muon(cfg_, layout.tensors()[i])) muon_tensors_.push_back(i);
}

template <class T>
std::vector<T> Optimizer<T>::exp_avg_sq() const {
  std::vector<T> full(layout_->total(), T(0));
  if (v_.size() == second_moment_count(cfg_, *layout_, 0, layout_->total()))  // not released
    unpack_second_moments(cfg_, *layout_, 0, layout_->total(), v_.data(), full.data());
  return full;
}

template <class T>
void Optimizer<T>::set_exp_avg_sq(const std::vector<T>& full) {
  if (full.size() != layout_->total())
    throw Error("Optimizer::set_exp_avg_sq: " + std::to_string(full.size()) + " elements, the layout has " +
                std::to_string(layout_->total()));
  v_.assign(second_moment_count(cfg_, *layout_, 0, layout_->total()), T(0));
  pack_second_moments(cfg_, *layout_, 0, layout_->total(), full.data(), v_.data());
}

template <class T>
void Optimizer<T>::release_state() {
  std::vector<T>().swap(m_);
  std::vector<T>().swap(v_);
}

template <class T>
void Optimizer<T>::step(std::vector<T>& params, const std::vector<T>& grads, double lr, double clip) {
  const size_t n = layout_->total();
  if (params.size() != n || grads.size() != n || m_.size() != n ||
      v_.size() != second_moment_count(cfg_, *layout_, 0, n))
    throw Error("Optimizer::step: buffer sizes (params " + std::to_string(params.size()) + ", grads " +
                std::to_string(grads.size()) + ", state " + std::to_string(m_.size()) + "/" +
                std::to_string(v_.size()) + ") do not match the layout (" + std::to_string(n) + ")");
  ++t_;
  // AdamW tensors one after the other, each update parallel over its elements.
  size_t vo = 0;  // into the packed second moments
  for (const TensorInfo& ti : layout_->tensors()) {
    if (uses_muon(cfg_, ti)) continue;
    optimizer_update(cfg_, ti, 0, ti.numel, params.data() + ti.offset, grads.data() + ti.offset, m_.data() + ti.offset,
                     v_.data() + vo, t_, lr, work_, clip);
    vo += ti.numel;
  }
  // Muon matrices are independent of each other: threads take whole matrices, whose
  // Newton-Schulz GEMMs then run alone on their thread with the same bits
  // (kernels/gemm.hpp), so the result does not depend on who took which.
  const auto& tensors = layout_->tensors();
  const int64_t nt = int64_t(muon_tensors_.size());
#pragma omp parallel for schedule(dynamic, 1) if (nt > 1)
  for (int64_t k = 0; k < nt; ++k) {
    static thread_local std::vector<T> work;
    const TensorInfo& ti = tensors[muon_tensors_[size_t(k)]];
    optimizer_update(cfg_, ti, 0, ti.numel, params.data() + ti.offset, grads.data() + ti.offset, m_.data() + ti.offset,
                     static_cast<T*>(nullptr), t_, lr, work, clip);
  }
}

template void optimizer_update<float>(const OptimizerConfig&, const TensorInfo&, size_t, size_t, float*, const float*,
                                      float*, float*, int64_t, double, std::vector<float>&, double);
template void optimizer_update<double>(const OptimizerConfig&, const TensorInfo&, size_t, size_t, double*,
                                       const double*, double*, double*, int64_t, double, std::vector<double>&, double);
template void unpack_second_moments<float>(const OptimizerConfig&, const ParamLayout&, size_t, size_t, const float*,
                                           float*);
template void unpack_second_moments<double>(const OptimizerConfig&, const ParamLayout&, size_t, size_t,
                                            const double*, double*);
template void pack_second_moments<float>(const OptimizerConfig&, const ParamLayout&, size_t, size_t, const float*,
                                         float*);
template void pack_second_moments<double>(const OptimizerConfig&, const ParamLayout&, size_t, size_t, const double*,
                                          double*);
template class Optimizer<float>;
template class Optimizer<double>;

}  // namespace moetune
