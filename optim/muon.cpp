// Muon's Newton-Schulz orthogonalisation and its per-matrix update (MODEL.md section 12).
//
// The iteration works on X (r, c) with r <= c (the matrix transposed when it has more
// rows than columns), so the Gram matrices XX^T are the small (r, r) ones:
//   A = X X^T;  B = b A + c A A;  X = a X + B X.
// Every product runs on moetune's GEMM (kernels/gemm.hpp), which reduces each output
// element in a fixed order and splits the work over output tiles only, so the result
// does not depend on the thread count (MODEL.md section 13): every rank that holds a
// matrix computes the same bits.
#include "optim/muon.hpp"

#include <algorithm>
#include <cmath>

#include "kernels/gemm.hpp"

#include "moe/error.hpp"

namespace moetune {

void validate(const MuonConfig& c) {
  auto fail = [](const char* key, const std::string& msg) { throw Error(std::string("key '") + key + "': " + msg); };
  if (!(c.momentum >= 0.0 && c.momentum < 1.0)) fail("optim.muon_momentum", "must be in [0, 1)");
  if (!(c.weight_decay >= 0.0 && std::isfinite(c.weight_decay)))
    fail("optim.muon_weight_decay", "must be a finite number >= 0");
  if (!(c.lr_ratio > 0.0 && std::isfinite(c.lr_ratio))) fail("optim.muon_lr", "must be a finite number > 0");
}

bool is_muon_tensor(const TensorInfo& t) {
  return t.shape.size() == 2 && t.name != "model.embed_tokens.weight" && t.name != "lm_head.weight";
}


template <class T>
void newton_schulz(T* x, int64_t rows, int64_t cols, std::vector<T>& work) {
  const bool transposed = rows > cols;
  const int64_t r = transposed ? cols : rows, c = transposed ? rows : cols;
  const int64_t n = r * c;
  work.resize(size_t(2 * n + 3 * r * r));
  T* X = work.data();  // (r, c)
  T* Y = X + n;        // (r, c)
  T* A = Y + n;        // (r, r)
  T* AA = A + r * r;   // (r, r)
  T* B = AA + r * r;   // (r, r)
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += double(x[i]) * double(x[i]);
  if (ss == 0) return;  // all zero (an expert no token reached, at step 1): NS(0) = 0
  const T norm = static_cast<T>(std::sqrt(ss));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      const T v = x[i * cols + j] / norm;
      if (transposed)
        X[j * c + i] = v;
      else
        X[i * c + j] = v;
    }
  for (int it = 0; it < kMuonNsSteps; ++it) {
    const T a = static_cast<T>(it < 8 ? 3.4445 : 2.0);
    const T b = static_cast<T>(it < 8 ? -4.7750 : -1.5);
    const T cc = static_cast<T>(it < 8 ? 2.0315 : 0.5);
    // moetune's GEMM (kernels/gemm.hpp): fixed reduction order, so the result does not
    // depend on the thread count, and A = X X^T is exactly symmetric (fma commutes).
    kernels::gemm_nt(r, r, c, X, c, X, c, A, r, false);   // A = X X^T
    kernels::gemm_nn(r, r, r, A, r, A, r, AA, r, false);  // A A
    for (int64_t i = 0; i < r * r; ++i) B[i] = b * A[i] + cc * AA[i];
    kernels::gemm_nn(r, c, r, B, r, X, c, Y, c, false);   // B X
    for (int64_t i = 0; i < n; ++i) Y[i] = a * X[i] + Y[i];
    std::swap(X, Y);
  }
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) x[i * cols + j] = transposed ? X[j * c + i] : X[i * c + j];
}

template <class T>
void muon_update(T* p, const T* g, T* momentum, int64_t rows, int64_t cols, const MuonConfig& cfg, double lr_t,
                 std::vector<T>& work, double clip) {
  const int64_t n = rows * cols;
  static thread_local std::vector<T> o;  // reused: no allocation per step
  o.resize(static_cast<size_t>(n));
  const T mu = static_cast<T>(cfg.momentum), c = static_cast<T>(clip);
  for (int64_t i = 0; i < n; ++i) {
    const T gi = g[i] * c;
    const T m = mu * momentum[i] + gi;
    momentum[i] = m;
    o[size_t(i)] = mu * m + gi;  // Nesterov
  }
  newton_schulz(o.data(), rows, cols, work);
  const T scale = static_cast<T>(0.18 * std::sqrt(double(std::max(rows, cols))));
  const double lr = cfg.lr_ratio * lr_t;
  const T mul = static_cast<T>(1.0 - lr * cfg.weight_decay);
  const T tlr = static_cast<T>(lr);
  for (int64_t i = 0; i < n; ++i) p[i] = p[i] * mul - tlr * (o[size_t(i)] * scale);
}

template void newton_schulz<float>(float*, int64_t, int64_t, std::vector<float>&);
template void newton_schulz<double>(double*, int64_t, int64_t, std::vector<double>&);
template void muon_update<float>(float*, const float*, float*, int64_t, int64_t, const MuonConfig&, double,
                                 std::vector<float>&, double);
template void muon_update<double>(double*, const double*, double*, int64_t, int64_t, const MuonConfig&, double,
                                  std::vector<double>&, double);

}  // namespace moetune
