// MTP, multi-token prediction (MODEL.md section 12; DeepSeek-V3/V4's MTP module): the
// input of the MTP block at position t combines the embedding of token t+1 with the
// main model's final hidden state h_t (before its final norm):
//   h'_t = e_proj(enorm(embed(x_{t+1}))) + h_proj(hnorm(h_t))
// The block itself is the model's decoder-block code (moe/model.cpp), followed by its
// own norm and the shared LM head. Forward / backward pair in llm.c style.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernels/gemm.hpp"
#include "moe/ops.hpp"

namespace moetune {

// out (N,d) = e_n e_proj^T + h_n h_proj^T with e_n = RMSNorm(e; enorm), h_n =
// RMSNorm(h; hnorm) (kept, with their rstd (N), for the backward); e, h (N,d); enorm,
// hnorm (d); e_proj, h_proj (d,d).
template <class T>
void mtp_input_forward(T* out, T* e_n, T* e_rstd, T* h_n, T* h_rstd, const T* e, const T* h, const T* enorm,
                       const T* hnorm, const T* e_proj, const T* h_proj, int64_t N, int64_t d, double eps) {
  ops::rmsnorm_forward(e_n, e_rstd, e, enorm, N, d, eps);
  ops::rmsnorm_forward(h_n, h_rstd, h, hnorm, N, d, eps);
  if (N == 0) return;
  kernels::gemm_nt(N, d, d, e_n, d, e_proj, d, out, d, false);
  kernels::gemm_nt(N, d, d, h_n, d, h_proj, d, out, d, true);
}

// de, dh (N,d) += the input gradients; denorm, dhnorm (d) +=, de_proj, dh_proj (d,d) +=;
// dout (N,d). work: scratch (grown, reused).
template <class T>
void mtp_input_backward(T* de, T* dh, T* denorm, T* dhnorm, T* de_proj, T* dh_proj, const T* dout, const T* e,
                        const T* h, const T* e_n, const T* e_rstd, const T* h_n, const T* h_rstd, const T* enorm,
                        const T* hnorm, const T* e_proj, const T* h_proj, int64_t N, int64_t d,
                        std::vector<T>& work) {
  work.assign(size_t(N * d), T(0));
  ops::linear_backward(work.data(), de_proj, dout, e_n, e_proj, N, d, d);
  ops::rmsnorm_backward(de, denorm, work.data(), e, enorm, e_rstd, N, d);
  std::fill(work.begin(), work.end(), T(0));
  ops::linear_backward(work.data(), dh_proj, dout, h_n, h_proj, N, d, d);
  ops::rmsnorm_backward(dh, dhnorm, work.data(), h, hnorm, h_rstd, N, d);
}

}  // namespace moetune
