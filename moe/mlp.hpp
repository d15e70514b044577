// SwiGLU MLP, used by the dense FFN, the shared expert and each routed expert:
// MLP(u) = down_proj( silu(gate_proj(u)) * up_proj(u) ). `limit` is swiglu_limit
// (MODEL.md section 12; 0 = off): the experts pass it, the dense FFN does not.
#pragma once
#include <vector>

#include "moe/ops.hpp"

namespace moetune {

// Values kept from the forward for the backward: g, u, a = silu(g)*u, each (N,F).
template <class T>
struct MlpCache {
  std::vector<T> g, u, a;
  void resize(int64_t N, int64_t F) {
    g.resize(N * F);
    u.resize(N * F);
    a.resize(N * F);
  }
};

// out (N,d) = MLP(x); x (N,d); wg, wu (F,d); wd (d,F). Writes cache at offset 0 (g, u
// before the clamp).
template <class T>
void mlp_forward(T* out, T* g, T* u, T* a, const T* x, const T* wg, const T* wu, const T* wd, int64_t N, int64_t d,
                 int64_t F, double limit = 0) {
  ops::linear_forward(g, x, wg, N, d, F);
  ops::linear_forward(u, x, wu, N, d, F);
  ops::swiglu_forward(a, g, u, N * F, limit);
  ops::linear_forward(out, a, wd, N, F, d);
}

// dx (N,d) += (may be null), dwg, dwu (F,d) +=, dwd (d,F) +=; dout (N,d). scratch: 3*N*F
// values (overwritten).
template <class T>
void mlp_backward(T* dx, T* dwg, T* dwu, T* dwd, const T* dout, const T* x, const T* g, const T* u, const T* a,
                  const T* wg, const T* wu, const T* wd, int64_t N, int64_t d, int64_t F, T* scratch,
                  double limit = 0) {
  if (N == 0) return;
  T* da = scratch;
  T* dg = da + N * F;
  T* du = dg + N * F;
  std::fill_n(da, N * F, T(0));
  ops::linear_backward(da, dwd, dout, a, wd, N, F, d);
  ops::swiglu_backward(dg, du, da, g, u, N * F, limit);
  ops::linear_backward(dx, dwg, dg, x, wg, N, d, F);
  ops::linear_backward(dx, dwu, du, x, wu, N, d, F);
}
// The same, with the scratch in a vector that grows to 3*N*F as needed.
template <class T>
void mlp_backward(T* dx, T* dwg, T* dwu, T* dwd, const T* dout, const T* x, const T* g, const T* u, const T* a,
                  const T* wg, const T* wu, const T* wd, int64_t N, int64_t d, int64_t F, std::vector<T>& scratch,
                  double limit = 0) {
  if (N == 0) return;
  scratch.resize(3 * N * F);
  mlp_backward(dx, dwg, dwu, dwd, dout, x, g, u, a, wg, wu, wd, N, d, F, scratch.data(), limit);
}

}  // namespace moetune
