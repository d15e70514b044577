// AdamW with torch.optim.AdamW's single-tensor (foreach=False) operation order, and
// clip_grad_norm_'s global-norm clipping, over the flat buffers of a ParamLayout.
//
// Per element, as torch 2.x does it (the CPU kernels of mul_, lerp_, addcmul_, sqrt,
// div, add_ and addcdiv_; scalars are computed in double and cast to T, as torch casts
// a Python float to the tensor's dtype):
//   p = p * (1 - lr*wd)                        decay tensors only (others: * 1, exact)
//   m = m + (1-b1) * (g - m)                   exp_avg.lerp_(grad, 1-b1), weight < 0.5
//   v = v * b2 + ((1-b2) * g) * g              exp_avg_sq.mul_(b2).addcmul_(g, g, 1-b2)
//   denom = sqrt(v) / sqrt(1-b2^t) + eps
//   p = p + ((-lr/(1-b1^t)) * m) / denom       param.addcdiv_(m, denom, -step_size)
// (torch 1.x wrote m.mul_(b1).add_(g, 1-b1); the two differ by an ulp at most.)
#include "optim/adamw.hpp"

#include <algorithm>
#include <cmath>
#include <string>

#include "kernels/multiversion.hpp"
#include "moe/error.hpp"

namespace moetune {

void validate(const AdamWConfig& c) {
  auto fail = [](const char* key, const std::string& msg) { throw Error(std::string("key '") + key + "': " + msg); };
  if (!(c.beta1 >= 0.0 && c.beta1 < 1.0)) fail("optim.beta1", "must be in [0, 1)");
  if (!(c.beta2 >= 0.0 && c.beta2 < 1.0)) fail("optim.beta2", "must be in [0, 1)");
  if (!(c.eps >= 0.0 && std::isfinite(c.eps))) fail("optim.eps", "must be a finite number >= 0");
  if (!(c.weight_decay >= 0.0 && std::isfinite(c.weight_decay)))
    fail("optim.weight_decay", "must be a finite number >= 0");
}

template <class T>
AdamW<T>::AdamW(const ParamLayout& layout, AdamWConfig cfg)
    : layout_(&layout), cfg_(cfg), m_(layout.total(), T(0)), v_(layout.total(), T(0)) {
  validate(cfg_);
}

namespace {
// The elementwise update of n elements, built for the widest vectors the CPU has
// (kernels/multiversion.hpp): the same IEEE operations per element in every build.
template <class T>
MOETUNE_CPU_CLONES void adamw_elements(T* p, const T* g, T* m, T* v, int64_t n, T mul, T lerp_w, T beta2,
                                       T one_minus_beta2, T bc2_sqrt, T eps, T neg_step_size, T clip) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T gi = g[i] * clip;  // scale_grads' product (times 1, exact, when not clipping)
    const T pi = p[i] * mul;
    const T mi = m[i] + lerp_w * (gi - m[i]);
    const T vi = v[i] * beta2 + one_minus_beta2 * gi * gi;
    const T denom = std::sqrt(vi) / bc2_sqrt + eps;
    m[i] = mi;
    v[i] = vi;
    p[i] = pi + neg_step_size * mi / denom;
  }
}
}  // namespace

template <class T>
void adamw_update(T* p, const T* g, T* m, T* v, int64_t n, bool decay, const AdamWConfig& cfg, int64_t step,
                  double lr, double clip) {
  // Scalars in double (as Python computes them), then cast to T like torch does.
  const double t = static_cast<double>(step);
  const double bias_correction1 = 1.0 - std::pow(cfg.beta1, t);
  const double bias_correction2 = 1.0 - std::pow(cfg.beta2, t);
  const T neg_step_size = static_cast<T>(-(lr / bias_correction1));
  const T bc2_sqrt = static_cast<T>(std::sqrt(bias_correction2));
  const T mul = decay ? static_cast<T>(1.0 - lr * cfg.weight_decay) : T(1);
  const T lerp_w = static_cast<T>(1.0 - cfg.beta1);
  const T beta2 = static_cast<T>(cfg.beta2);
  const T one_minus_beta2 = static_cast<T>(1.0 - cfg.beta2);
  const T eps = static_cast<T>(cfg.eps);
  // Elements are independent: the static split over threads changes nothing.
  constexpr int64_t kChunk = 4096;
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (nchunks > 1)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t b = c * kChunk, len = std::min(kChunk, n - b);
    adamw_elements(p + b, g + b, m + b, v + b, len, mul, lerp_w, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step_size,
                   static_cast<T>(clip));
  }
}

template <class T>
void AdamW<T>::step(std::vector<T>& params, const std::vector<T>& grads, double lr, double clip) {
  const size_t n = layout_->total();
  if (params.size() != n || grads.size() != n || m_.size() != n || v_.size() != n)
    throw Error("AdamW::step: buffer sizes (params " + std::to_string(params.size()) + ", grads " +
                std::to_string(grads.size()) + ", moments " + std::to_string(m_.size()) + "/" +
                std::to_string(v_.size()) + ") do not match the layout (" + std::to_string(n) + ")");
  ++t_;
  // Padding between tensors is never touched.
  for (const TensorInfo& ti : layout_->tensors())
    adamw_update(params.data() + ti.offset, grads.data() + ti.offset, m_.data() + ti.offset, v_.data() + ti.offset,
                 static_cast<int64_t>(ti.numel), ti.decay, cfg_, t_, lr, clip);
}

template void adamw_update<float>(float*, const float*, float*, float*, int64_t, bool, const AdamWConfig&, int64_t,
                                  double, double);
template void adamw_update<double>(double*, const double*, double*, double*, int64_t, bool, const AdamWConfig&,
                                   int64_t, double, double);

template <class T>
double global_grad_norm(const std::vector<T>& grads) {
  // Fixed chunks of the flat buffer; each chunk's sum of squares uses 8 interleaved
  // double accumulators combined in a fixed tree, and the chunk sums are added in
  // index order. Nothing depends on the thread count.
  constexpr int64_t kChunk = 1 << 14;
  const int64_t n = static_cast<int64_t>(grads.size());
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(static_cast<size_t>(nchunks), 0.0);
  const T* g = grads.data();
#pragma omp parallel for schedule(static) if (nchunks > 1)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t begin = c * kChunk, end = std::min(n, begin + kChunk);
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = begin;
    for (; i + 8 <= end; i += 8)
      for (int j = 0; j < 8; ++j) {
        const double x = static_cast<double>(g[i + j]);
        acc[j] += x * x;
      }
    for (int j = 0; i < end; ++i, ++j) {
      const double x = static_cast<double>(g[i]);
      acc[j] += x * x;
    }
    partial[static_cast<size_t>(c)] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  }
  double sum = 0.0;
  for (double s : partial) sum += s;
  return std::sqrt(sum);
}

double clip_coefficient(double norm, double max_norm) {
  if (max_norm <= 0.0) return 1.0;
  const double coef = max_norm / (norm + 1e-6);
  if (std::isnan(coef)) return coef;  // torch.clamp(nan, max=1) is nan
  return std::min(1.0, coef);
}

template <class T>
void scale_grads(std::vector<T>& grads, double coef) {
  scale_grads(std::span<T>(grads), coef);
}

template <class T>
void scale_grads(std::span<T> grads, double coef) {
  if (coef == 1.0) return;  // multiplying by 1 is exact: skip the pass
  const T c = static_cast<T>(coef);
  T* g = grads.data();
  const int64_t n = static_cast<int64_t>(grads.size());
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) g[i] *= c;
}

template class AdamW<float>;
template class AdamW<double>;
template double global_grad_norm<float>(const std::vector<float>&);
template double global_grad_norm<double>(const std::vector<double>&);
template void scale_grads<float>(std::vector<float>&, double);
template void scale_grads<double>(std::vector<double>&, double);
template void scale_grads<float>(std::span<float>, double);
template void scale_grads<double>(std::span<double>, double);

}  // namespace moetune
