// DeepSeek-V4 attention (MODEL.md section 12, attention_type = "v4"), forward and
// backward of one layer, built from the ops of moe/ops.hpp:
//   qa = RMSNorm_{q_a_norm}(a Wqa^T)                 (N, q_lora_rank)
//   q  = headRMS(qa Wqb^T) per head of head_dim      (N, H, hd), unweighted
//   kv = RMSNorm_{kv_norm}(a Wkv^T)                  (N, hd), one head: key and value
//   RoPE, interleaved pairs, on the last qk_rope_head_dim channels of q and kv
//   o  = causal softmax(q kv^T * hd^-0.5, sink per head, window) kv       (N, H, hd)
//   o's rope channels rotated back by the query's position (-i)
//   out = o_b( o_a_g(o_g) for each of the o_groups groups g )             (N, d)
// The Hugging Face transformers `deepseek_v4` names of the tensors are in moe/params.cpp.
// The matrix products are moetune's GEMM (section 13): a token's values depend on its
// own row and the keys of its own document only.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/gemm.hpp"
#include "moe/config.hpp"
#include "moe/ops.hpp"

namespace moetune {

namespace ops {

// ---------------------------------------------------------------- grouped linear
// The block-diagonal projection of V4's o_a_proj: inp (N, I) is split in G groups of
// I/G columns, group g is mapped by rows [g*r, (g+1)*r) of w (G*r, I/G) to columns
// [g*r, (g+1)*r) of out (N, G*r).
template <class T>
void grouped_linear_forward(T* out, const T* inp, const T* w, int64_t N, int64_t I, int64_t G, int64_t r) {
  const int64_t ig = I / G;
  for (int64_t g = 0; g < G; ++g)
    kernels::gemm_nt(N, r, ig, inp + g * ig, I, w + g * r * ig, ig, out + g * r, G * r, false);
}
// dinp (N, I) +=, dw (G*r, I/G) +=; dout (N, G*r), inp (N, I), w (G*r, I/G).
template <class T>
void grouped_linear_backward(T* dinp, T* dw, const T* dout, const T* inp, const T* w, int64_t N, int64_t I,
                             int64_t G, int64_t r) {
  if (N == 0) return;
  const int64_t ig = I / G;
  for (int64_t g = 0; g < G; ++g) {
    kernels::gemm_nn(N, ig, r, dout + g * r, G * r, w + g * r * ig, ig, dinp + g * ig, I, true);
    kernels::gemm_tn(r, ig, N, dout + g * r, G * r, inp + g * ig, I, dw + g * r * ig, ig, true);
  }
}

}  // namespace ops

// Offsets of one layer's V4 attention tensors in the flat buffers.
struct AttentionV4Offsets {
  size_t q_a = 0, q_a_norm = 0, q_b = 0, kv = 0, kv_norm = 0, o_a = 0, o_b = 0, sinks = 0;
};

// What the forward keeps for the backward (and, in inference, the work buffers).
template <class T>
struct AttentionV4Cache {
  std::vector<T> qa_raw, rstd_qa, qa;  // (N, qr) q_a_proj output, (N) its rstd, (N, qr) normalised
  std::vector<T> q_raw, rstd_q, q;     // (N, H*hd) q_b_proj output, (N*H) per-head rstd, normalised + RoPE
  std::vector<T> kv_raw, rstd_kv, kv;  // (N, hd) kv_proj output, (N) rstd, normalised + RoPE
  std::vector<T> stats, ctx, oa;       // (B,H,S,2) softmax stats, (N, H*hd) attention out rotated back, (N, G*r)
  int64_t bytes() const {
    int64_t b = 0;
    for (const auto* v : {&qa_raw, &rstd_qa, &qa, &q_raw, &rstd_q, &q, &kv_raw, &rstd_kv, &kv, &stats, &ctx, &oa})
      b += int64_t(v->capacity() * sizeof(T));
    return b;
  }
};

// Gradient work buffers of the backward, reused across calls.
template <class T>
struct AttentionV4Scratch {
  std::vector<T> doa, dctx, dq, dkv, dq_raw, dqa, dqa_raw, dkv_raw;
  int64_t bytes() const {
    int64_t b = 0;
    for (const auto* v : {&doa, &dctx, &dq, &dkv, &dq_raw, &dqa, &dqa_raw, &dkv_raw})
      b += int64_t(v->capacity() * sizeof(T));
    return b;
  }
};

// q (rotated, per-head normalised) and the shared kv (rotated) of N tokens at pos from
// a (N, d) = RMSNorm_in(h), into L.
template <class T>
void attention_v4_project(AttentionV4Cache<T>& L, const AttentionV4Offsets& W, const T* P, const T* a,
                          const int32_t* pos, int64_t N, const ModelConfig& c) {
  const int64_t d = c.d(), H = c.H(), hd = c.hd(), qd = H * hd, qr = c.q_lora_rank, rd = c.qk_rope_head_dim;
  const double eps = c.rms_norm_eps;
  L.qa_raw.resize(N * qr);
  L.rstd_qa.resize(N);
  L.qa.resize(N * qr);
  ops::linear_forward(L.qa_raw.data(), a, P + W.q_a, N, d, qr);
  ops::rmsnorm_forward(L.qa.data(), L.rstd_qa.data(), L.qa_raw.data(), P + W.q_a_norm, N, qr, eps);
  L.q_raw.resize(N * qd);
  L.rstd_q.resize(N * H);
  L.q.resize(N * qd);
  ops::linear_forward(L.q_raw.data(), L.qa.data(), P + W.q_b, N, qr, qd);
  ops::rmsnorm_forward(L.q.data(), L.rstd_q.data(), L.q_raw.data(), static_cast<const T*>(nullptr), N * H, hd, eps);
  ops::rope_rotate(L.q.data(), pos, N, H, hd, rd, true, c.rope_theta, +1);
  L.kv_raw.resize(N * hd);
  L.rstd_kv.resize(N);
  L.kv.resize(N * hd);
  ops::linear_forward(L.kv_raw.data(), a, P + W.kv, N, d, hd);
  ops::rmsnorm_forward(L.kv.data(), L.rstd_kv.data(), L.kv_raw.data(), P + W.kv_norm, N, hd, eps);
  ops::rope_rotate(L.kv.data(), pos, N, 1, hd, rd, true, c.rope_theta, +1);
}

// out (N, d) from the attention output in L.ctx (N, H*hd), which is rotated back in place
// (position -pos) and kept as the input of o_a_proj.
template <class T>
void attention_v4_output(T* out, AttentionV4Cache<T>& L, const AttentionV4Offsets& W, const T* P, const int32_t* pos,
                         int64_t N, const ModelConfig& c) {
  const int64_t d = c.d(), H = c.H(), hd = c.hd(), qd = H * hd, G = c.o_groups, r = c.o_lora_rank;
  ops::rope_rotate(L.ctx.data(), pos, N, H, hd, int64_t(c.qk_rope_head_dim), true, c.rope_theta, -1);
  L.oa.resize(N * G * r);
  ops::grouped_linear_forward(L.oa.data(), L.ctx.data(), P + W.o_a, N, qd, G, r);
  ops::linear_forward(out, L.oa.data(), P + W.o_b, N, G * r, d);
}

// The whole sub-block over B rows of S tokens: out (N, d) from a (N, d); pos, doc (N).
template <class T>
void attention_v4_forward(T* out, AttentionV4Cache<T>& L, const AttentionV4Offsets& W, const T* P, const T* a,
                          const int32_t* pos, const int32_t* doc, int64_t B, int64_t S, const ModelConfig& c) {
  const int64_t N = B * S, H = c.H(), hd = c.hd();
  attention_v4_project(L, W, P, a, pos, N, c);
  L.stats.resize(B * H * S * 2);
  L.ctx.resize(N * H * hd);
  ops::attention_forward(L.ctx.data(), L.stats.data(), L.q.data(), L.kv.data(), L.kv.data(), doc, B, S, H,
                         int64_t(1), hd, P + W.sinks, int64_t(c.sliding_window));
  attention_v4_output(out, L, W, P, pos, N, c);
}

// da (N, d) +=, parameter gradients G += from dout (N, d) = d loss / d out, with the
// activations L of the last training forward over the same a, pos, doc.
template <class T>
void attention_v4_backward(T* da, T* Gr, const T* dout, const AttentionV4Cache<T>& L, const AttentionV4Offsets& W,
                           const T* P, const T* a, const int32_t* pos, const int32_t* doc, int64_t B, int64_t S,
                           const ModelConfig& c, AttentionV4Scratch<T>& X) {
  const int64_t N = B * S, d = c.d(), H = c.H(), hd = c.hd(), qd = H * hd, qr = c.q_lora_rank;
  const int64_t G = c.o_groups, r = c.o_lora_rank, rd = c.qk_rope_head_dim;
  const double theta = c.rope_theta;
  // out = o_b(o_a(ctx)); ctx = rotate(o, -pos)
  X.doa.assign(N * G * r, T(0));
  ops::linear_backward(X.doa.data(), Gr + W.o_b, dout, L.oa.data(), P + W.o_b, N, G * r, d);
  X.dctx.assign(N * qd, T(0));
  ops::grouped_linear_backward(X.dctx.data(), Gr + W.o_a, X.doa.data(), L.ctx.data(), P + W.o_a, N, qd, G, r);
  ops::rope_rotate(X.dctx.data(), pos, N, H, hd, rd, true, theta, +1);  // transpose of the rotation by -pos
  // o = attention(q, kv, kv) with sinks and window
  X.dq.assign(N * qd, T(0));
  X.dkv.assign(N * hd, T(0));
  ops::attention_backward(X.dq.data(), X.dkv.data(), X.dkv.data(), X.dctx.data(), L.stats.data(), L.q.data(),
                          L.kv.data(), L.kv.data(), doc, B, S, H, int64_t(1), hd, P + W.sinks, Gr + W.sinks,
                          int64_t(c.sliding_window));
  ops::rope_rotate(X.dq.data(), pos, N, H, hd, rd, true, theta, -1);
  ops::rope_rotate(X.dkv.data(), pos, N, 1, hd, rd, true, theta, -1);
  // q = headRMS(q_b(RMSNorm(q_a(a))))
  X.dq_raw.assign(N * qd, T(0));
  ops::rmsnorm_backward(X.dq_raw.data(), static_cast<T*>(nullptr), X.dq.data(), L.q_raw.data(),
                        static_cast<const T*>(nullptr), L.rstd_q.data(), N * H, hd);
  X.dqa.assign(N * qr, T(0));
  ops::linear_backward(X.dqa.data(), Gr + W.q_b, X.dq_raw.data(), L.qa.data(), P + W.q_b, N, qr, qd);
  X.dqa_raw.assign(N * qr, T(0));
  ops::rmsnorm_backward(X.dqa_raw.data(), Gr + W.q_a_norm, X.dqa.data(), L.qa_raw.data(), P + W.q_a_norm,
                        L.rstd_qa.data(), N, qr);
  ops::linear_backward(da, Gr + W.q_a, X.dqa_raw.data(), a, P + W.q_a, N, d, qr);
  // kv = RMSNorm(kv_proj(a))
  X.dkv_raw.assign(N * hd, T(0));
  ops::rmsnorm_backward(X.dkv_raw.data(), Gr + W.kv_norm, X.dkv.data(), L.kv_raw.data(), P + W.kv_norm,
                        L.rstd_kv.data(), N, hd);
  ops::linear_backward(da, Gr + W.kv, X.dkv_raw.data(), a, P + W.kv, N, d, hd);
}

}  // namespace moetune
