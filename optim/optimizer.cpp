// optim.name dispatch: AdamW or Muon per tensor (optimizer.hpp).
#include "optim/optimizer.hpp"

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
                      T* v, int64_t step, double lr, std::vector<T>& work) {
  if (uses_muon(cfg, t)) {
    if (b != 0 || e != t.numel)
      throw Error("optimizer_update: Muon needs the whole matrix " + t.name + ", got elements [" + std::to_string(b) +
                  ", " + std::to_string(e) + ")");
    muon_update(p, g, m, t.shape[0], t.shape[1], cfg.muon, lr, work);
    return;
  }
  adamw_update(p, g, m, v, int64_t(e - b), t.decay, cfg.adamw, step, lr);
}

std::vector<StateTensorName> optimizer_state_names(const std::string& optimizer, const TensorInfo& t) {
  if (optimizer == "muon" && is_muon_tensor(t)) return {{".momentum_buffer", 0}};
  return {{".exp_avg", 0}, {".exp_avg_sq", 1}};
}

template <class T>
Optimizer<T>::Optimizer(const ParamLayout& layout, OptimizerConfig cfg)
    : layout_(&layout), cfg_(std::move(cfg)), m_(layout.total(), T(0)), v_(layout.total(), T(0)) {
  validate(cfg_);
}

template <class T>
void Optimizer<T>::step(std::vector<T>& params, const std::vector<T>& grads, double lr) {
  const size_t n = layout_->total();
  if (params.size() != n || grads.size() != n || m_.size() != n || v_.size() != n)
    throw Error("Optimizer::step: buffer sizes (params " + std::to_string(params.size()) + ", grads " +
                std::to_string(grads.size()) + ", state " + std::to_string(m_.size()) + "/" +
                std::to_string(v_.size()) + ") do not match the layout (" + std::to_string(n) + ")");
  ++t_;
  for (const TensorInfo& ti : layout_->tensors())
    optimizer_update(cfg_, ti, 0, ti.numel, params.data() + ti.offset, grads.data() + ti.offset, m_.data() + ti.offset,
                     v_.data() + ti.offset, t_, lr, work_);
}

template void optimizer_update<float>(const OptimizerConfig&, const TensorInfo&, size_t, size_t, float*, const float*,
                                      float*, float*, int64_t, double, std::vector<float>&);
template void optimizer_update<double>(const OptimizerConfig&, const TensorInfo&, size_t, size_t, double*,
                                       const double*, double*, double*, int64_t, double, std::vector<double>&);
template class Optimizer<float>;
template class Optimizer<double>;

}  // namespace moetune
