// SwiGLU MLP, used by the dense FFN, the shared expert and each routed expert:
// MLP(u) = down_proj( silu(gate_proj(u)) * up_proj(u) ). `limit` is swiglu_limit
// (MODEL.md section 12; 0 = off): the experts pass it, the dense FFN does not.
//
// The gate and up projections run as one GEMM: the parameter layout stores up_proj
// right after gate_proj (ParamLayout), so [gate; up] is one (2F,d) matrix and
// gu = x [gate; up]^T one (N,2F) product, whose row n holds g then u. Each element is
// the same dot product in the same order as with two GEMMs (kernels/gemm.hpp: a
// column's result never depends on the others), so fusing changes no bit; it packs x
// once instead of twice and gives the threads twice the tiles. The weight gradient
// fuses the same way, d[gate; up] += dgu^T x; the input gradient dx += dgu [gate; up]
// reduces over 2F, which is the two GEMMs' order exactly when F is a multiple of the
// GEMM's K block, and is two GEMMs otherwise. Weights that are not adjacent (a caller
// with its own buffers) take two GEMMs everywhere, with the same results.
#pragma once
#include <vector>

#include "kernels/gemm.hpp"
#include "moe/ops.hpp"

namespace moetune {

// Values kept from the forward for the backward: gu (N,2F) = g and u before the clamp,
// row by row, and a = silu(g)*u (N,F).
template <class T>
struct MlpCache {
  std::vector<T> gu, a;
  void resize(int64_t N, int64_t F) {
    gu.resize(2 * N * F);
    a.resize(N * F);
  }
};

namespace detail {
// gu (N,2F) = x [wg; wu]^T.
template <class T>
void gate_up_forward(T* gu, const T* x, const T* wg, const T* wu, int64_t N, int64_t d, int64_t F) {
  if (wu == wg + F * d) {
    kernels::gemm_nt(N, 2 * F, d, x, d, wg, d, gu, 2 * F, false);
  } else {
    kernels::gemm_nt(N, F, d, x, d, wg, d, gu, 2 * F, false);
    kernels::gemm_nt(N, F, d, x, d, wu, d, gu + F, 2 * F, false);
  }
}
// dx (N,d) += dgu [wg; wu] (dx may be null); dwg, dwu (F,d) += dgu^T x.
template <class T>
void gate_up_backward(T* dx, T* dwg, T* dwu, const T* dgu, const T* x, const T* wg, const T* wu, int64_t N,
                      int64_t d, int64_t F) {
  if (dx) {
    if (wu == wg + F * d && F % kernels::kGemmKc == 0) {
      kernels::gemm_nn(N, d, 2 * F, dgu, 2 * F, wg, d, dx, d, true);
    } else {
      kernels::gemm_nn(N, d, F, dgu, 2 * F, wg, d, dx, d, true);
      kernels::gemm_nn(N, d, F, dgu + F, 2 * F, wu, d, dx, d, true);
    }
  }
  if (dwu == dwg + F * d) {
    kernels::gemm_tn(2 * F, d, N, dgu, 2 * F, x, d, dwg, d, true);
  } else {
    kernels::gemm_tn(F, d, N, dgu, 2 * F, x, d, dwg, d, true);
    kernels::gemm_tn(F, d, N, dgu + F, 2 * F, x, d, dwu, d, true);
  }
}
}  // namespace detail

// out (N,d) = MLP(x); x (N,d); wg, wu (F,d); wd (d,F). Writes gu (N,2F) and a (N,F)
// for the backward.
template <class T>
void mlp_forward(T* out, T* gu, T* a, const T* x, const T* wg, const T* wu, const T* wd, int64_t N, int64_t d,
                 int64_t F, double limit = 0) {
  detail::gate_up_forward(gu, x, wg, wu, N, d, F);
  ops::swiglu_forward(a, gu, gu + F, N, F, 2 * F, limit);
  ops::linear_forward(out, a, wd, N, F, d);
}

// dx (N,d) += (may be null), dwg, dwu (F,d) +=, dwd (d,F) +=; dout (N,d). scratch: 3*N*F
// values (overwritten).
template <class T>
void mlp_backward(T* dx, T* dwg, T* dwu, T* dwd, const T* dout, const T* x, const T* gu, const T* a, const T* wg,
                  const T* wu, const T* wd, int64_t N, int64_t d, int64_t F, T* scratch, double limit = 0) {
  if (N == 0) return;
  T* da = scratch;
  T* dgu = da + N * F;  // (N,2F)
  std::fill_n(da, N * F, T(0));
  ops::linear_backward(da, dwd, dout, a, wd, N, F, d);
  ops::swiglu_backward(dgu, dgu + F, da, gu, gu + F, N, F, 2 * F, limit);
  detail::gate_up_backward(dx, dwg, dwu, dgu, x, wg, wu, N, d, F);
}
// The same, with the scratch in a vector that grows to 3*N*F as needed.
template <class T>
void mlp_backward(T* dx, T* dwg, T* dwu, T* dwd, const T* dout, const T* x, const T* gu, const T* a, const T* wg,
                  const T* wu, const T* wd, int64_t N, int64_t d, int64_t F, std::vector<T>& scratch,
                  double limit = 0) {
  if (N == 0) return;
  scratch.resize(3 * N * F);
  mlp_backward(dx, dwg, dwu, dwd, dout, x, gu, a, wg, wu, wd, N, d, F, scratch.data(), limit);
}

}  // namespace moetune
