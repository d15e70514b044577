// Muon's Newton-Schulz orthogonalisation and its per-matrix update (MODEL.md section 12).
//
// The iteration works on X (r, c) with r <= c (the matrix transposed when it has more
// rows than columns), so the Gram matrices XX^T are the small (r, r) ones:
//   A = X X^T;  B = b A + c A A;  X = a X + B X.
// Every product (matmul_rows) computes each output element as one sum in a fixed order,
// and the OpenMP split is over output rows only, so the result does not depend on the
// thread count (MODEL.md section 13): every rank that holds a matrix computes the same
// bits.
#include "optim/muon.hpp"

#include <algorithm>
#include <cmath>

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

namespace {

// C (n, m) = L (n, q) R (q, m), row-major: C_ij = sum over k of L_ik R_kj, added in k
// order from 0. Tiles of kMr x kNr elements of C are kept in registers (one broadcast of
// L and one row piece of R per k); the edge tiles use the same sum. Threads split the
// rows of C, so no element's order of additions depends on the thread count.
constexpr int kMr = 8, kNr = 32;

// One tile: rows [i0, i0 + mr), columns [j0, j0 + nr) of C (mr <= kMr, nr <= kNr).
template <class T>
void matmul_tile(T* __restrict C, const T* __restrict L, const T* __restrict R, int64_t q, int64_t m, int64_t i0,
                 int64_t j0, int mr, int nr) {
  T acc[kMr][kNr] = {};
  T r[kNr] = {};
  for (int64_t k = 0; k < q; ++k) {
    const T* rk = R + k * m + j0;
    for (int b = 0; b < nr; ++b) r[b] = rk[b];
    for (int a = 0; a < mr; ++a) {
      const T l = L[(i0 + a) * q + k];
#pragma omp simd
      for (int b = 0; b < kNr; ++b) acc[a][b] += l * r[b];  // columns past nr are never stored
    }
  }
  for (int a = 0; a < mr; ++a) std::copy(acc[a], acc[a] + nr, C + (i0 + a) * m + j0);
}

template <class T>
void matmul_rows(T* C, const T* L, const T* R, int64_t n, int64_t q, int64_t m, bool par) {
  const int64_t row_tiles = (n + kMr - 1) / kMr;
#pragma omp parallel for schedule(static) if (par)
  for (int64_t it = 0; it < row_tiles; ++it) {
    const int64_t i0 = it * kMr;
    const int mr = int(std::min<int64_t>(kMr, n - i0));
    for (int64_t j0 = 0; j0 < m; j0 += kNr) matmul_tile(C, L, R, q, m, i0, j0, mr, int(std::min<int64_t>(kNr, m - j0)));
  }
}

}  // namespace

template <class T>
void newton_schulz(T* x, int64_t rows, int64_t cols, std::vector<T>& work) {
  const bool transposed = rows > cols;
  const int64_t r = transposed ? cols : rows, c = transposed ? rows : cols;
  const int64_t n = r * c;
  work.resize(size_t(3 * n + 3 * r * r));
  T* X = work.data();  // (r, c)
  T* Y = X + n;        // (r, c)
  T* XT = Y + n;       // (c, r)
  T* A = XT + n;       // (r, r)
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
  const bool par = r * r * c > (int64_t(1) << 15);
  for (int it = 0; it < kMuonNsSteps; ++it) {
    const T a = static_cast<T>(it < 8 ? 3.4445 : 2.0);
    const T b = static_cast<T>(it < 8 ? -4.7750 : -1.5);
    const T cc = static_cast<T>(it < 8 ? 2.0315 : 0.5);
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < c; ++j) XT[j * r + i] = X[i * c + j];
    matmul_rows(A, X, XT, r, c, r, par);   // A = X X^T (exactly symmetric: same products, same order)
    matmul_rows(AA, A, A, r, r, r, par);   // A A
    for (int64_t i = 0; i < r * r; ++i) B[i] = b * A[i] + cc * AA[i];
    matmul_rows(Y, B, X, r, r, c, par);    // B X
    for (int64_t i = 0; i < n; ++i) Y[i] = a * X[i] + Y[i];
    std::swap(X, Y);
  }
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) x[i * cols + j] = transposed ? X[j * c + i] : X[i * c + j];
}

template <class T>
void muon_update(T* p, const T* g, T* momentum, int64_t rows, int64_t cols, const MuonConfig& cfg, double lr_t,
                 std::vector<T>& work) {
  const int64_t n = rows * cols;
  std::vector<T> o(static_cast<size_t>(n));
  const T mu = static_cast<T>(cfg.momentum);
  for (int64_t i = 0; i < n; ++i) {
    const T m = mu * momentum[i] + g[i];
    momentum[i] = m;
    o[size_t(i)] = mu * m + g[i];  // Nesterov
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
                                 std::vector<float>&);
template void muon_update<double>(double*, const double*, double*, int64_t, int64_t, const MuonConfig&, double,
                                  std::vector<double>&);

}  // namespace moetune
