// SwiGLU MLP, used by the dense FFN, the shared expert and each routed expert:
// MLP(u) = down_proj( silu(gate_proj(u)) * up_proj(u) ). `limit` is swiglu_limit
// (MODEL.md section 12; 0 = off): the experts pass it, the dense FFN does not.
//
// The gate and up projections are one grouped linear layer (ops::grouped_linear_*):
// the parameter layout stores up_proj right after gate_proj (ParamLayout), so
// gu = x [gate; up]^T is one (N,2F) product, whose row n holds g then u, with the same
// bits as two GEMMs; a caller with its own, non-adjacent buffers gets two.
#pragma once
#include <array>
#include <vector>

#include "kernels/gemm.hpp"
#include "moe/ops.hpp"
#include "moe/scratch.hpp"

namespace moetune {

// Values kept from the forward for the backward: gu (N,2F) = g and u before the clamp,
// row by row, and a = silu(g)*u (N,F).
template <class T>
struct MlpCache {
  std::vector<T> gu, a;
  void resize(int64_t N, int64_t F) {
    grow_scratch(gu, size_t(2 * N * F));
    grow_scratch(a, size_t(N * F));
  }
};

namespace detail {
// The [gate; up] pair as parts of a grouped linear layer (ops::grouped_linear_forward).
template <class T>
std::array<ops::LinearPart<T>, 2> gate_up_parts(const T* wg, const T* wu, T* dwg, T* dwu, int64_t F) {
  return {ops::LinearPart<T>{wg, dwg, F}, ops::LinearPart<T>{wu, dwu, F}};
}
}  // namespace detail

// out (N,d) = MLP(x); x (N,d); wg, wu (F,d); wd (d,F). Writes gu (N,2F) and a (N,F)
// for the backward.
template <class T>
void mlp_forward(T* out, T* gu, T* a, const T* x, const T* wg, const T* wu, const T* wd, int64_t N, int64_t d,
                 int64_t F, double limit = 0) {
  ops::grouped_linear_forward<T, 2>(gu, x, detail::gate_up_parts<T>(wg, wu, nullptr, nullptr, F), N, d);
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
  kernels::parallel_fill(da, N * F, T(0));  // one thread inside the experts' loop
  ops::linear_backward(da, dwd, dout, a, wd, N, F, d);
  ops::swiglu_backward(dgu, dgu + F, da, gu, gu + F, N, F, 2 * F, limit);
  ops::grouped_linear_backward<T, 2>(dx, dgu, x, detail::gate_up_parts<T>(wg, wu, dwg, dwu, F), N, d);
}
// The same, with the scratch in a vector that grows to 3*N*F as needed.
template <class T>
void mlp_backward(T* dx, T* dwg, T* dwu, T* dwd, const T* dout, const T* x, const T* gu, const T* a, const T* wg,
                  const T* wu, const T* wd, int64_t N, int64_t d, int64_t F, std::vector<T>& scratch,
                  double limit = 0) {
  if (N == 0) return;
  grow_scratch(scratch, size_t(3 * N * F));
  mlp_backward(dx, dwg, dwu, dwd, dout, x, gu, a, wg, wu, wd, N, d, F, scratch.data(), limit);
}

}  // namespace moetune
