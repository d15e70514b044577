// The dense ops of the model, each a pair of free functions X_forward / X_backward
// (llm.c style): arguments are outputs, inputs, weights, then sizes; every pointer
// carries its shape in a comment; backward functions ACCUMULATE (+=) into gradient
// buffers. Templated on the scalar type so gradient checks run in double. Matrix
// products are moetune's own GEMM (kernels/gemm.hpp); other loops use OpenMP.
//
// Batch invariance (MODEL.md section 13): every value a token gets is reduced in an
// order fixed by that token's own row alone: GEMMs reduce in fixed blocks, per-row
// loops (RMSNorm, softmax, cross-entropy) sum in row_sum's fixed order within the row,
// attention reduces over the keys of the token's own document from the document's
// start (under a sliding window: from the window start of the token's query tile, a
// position fixed by the token's place in its document), and reductions over tokens
// (weight gradients) run in token order. So a row's result is the same whatever other
// rows share the batch, on any number of threads, and a decode step against the KV
// cache equals the full forward.
#pragma once
#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels/gemm.hpp"
#include "kernels/multiversion.hpp"
#include "kernels/parallel.hpp"

namespace moetune::ops {

// ---------------------------------------------------------------- exp
// exp in float from +, -, *, comparisons and exponent-bit arithmetic only, so a loop of
// it vectorizes (libm's expf is a call per element: about a tenth of a small model's
// step went to it in SwiGLU and the attention softmax) and gives the same bits on every
// ISA and in every lane: the build contracts no multiply-add (CMakeLists.txt), so SSE2,
// AVX2, AVX-512 and scalar code evaluate the same IEEE operations in the same order.
// Cephes' expf: x = n ln2 + r with n = round(x log2 e), ln2 split in two so n*C1 is
// exact, |r| <= ln2/2, exp(r) from a degree-6 polynomial, then 2^n applied in two
// halves (2^n itself overflows the exponent field at n = 128). Within 2 ulp of the
// correctly rounded result on normal outputs (OpsExp.FloatWithinTwoUlp); below
// -87.3365 (subnormal results) it returns 0, above 88.7228 +inf; NaN stays NaN.
inline float exp_f32(float x) {
  constexpr float kHi = 88.72283935546875f, kLo = -87.33654022216796875f;
  const float xc = x > kHi ? kHi : (x < kLo ? kLo : (x == x ? x : 0.0f));  // NaN -> 0 here, restored below
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer (round to nearest)
  const float n = (xc * 1.44269504088896341f + magic) - magic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t ni = static_cast<int32_t>(n), n1 = ni / 2, n2 = ni - n1;  // both in [-63, 64]
  const float s1 = std::bit_cast<float>((n1 + 127) << 23), s2 = std::bit_cast<float>((n2 + 127) << 23);
  const float y = (p * s1) * s2;
  return x > kHi ? std::numeric_limits<float>::infinity() : (x < kLo ? 0.0f : (x == x ? y : x));
}
// The exp of the model's loops: exp_f32 in float, std::exp in double (the gradient
// checks and the PyTorch comparisons in double keep libm's correctly rounded values).
template <class T>
inline T exp(T x) {
  if constexpr (std::is_same_v<T, float>)
    return exp_f32(x);
  else
    return std::exp(x);
}

// ---------------------------------------------------------------- row sums
// The sum over j < n of term(j), in the one order every per-row reduction of the model
// uses (RMSNorm, softmax, cross-entropy, the attention and combine backward dots): 16
// running sums, term j added to sum j % 16 in increasing j, then the 16 combined
// pairwise (s_l + s_{l+8}, then + 4, + 2, + 1). A row's sum depends on its own values
// and length only (batch invariance, MODEL.md 13), and the loop vectorizes with the
// same bits on every ISA (the 16 sums are one AVX-512 vector, two AVX2 or four SSE2
// vectors; no reassociation, no contraction), where one running sum was a chain of
// dependent adds, four cycles each.
template <class T, class Term>
inline T row_sum(int64_t n, Term term) {
  constexpr int kLanes = 16;
  T acc[kLanes] = {};
  int64_t j0 = 0;
  for (; j0 + kLanes <= n; j0 += kLanes)
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) acc[l] += term(j0 + l);
  for (int l = 0; j0 + l < n; ++l) acc[l] += term(j0 + l);
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] = acc[l] + acc[l + w];
  return acc[0];
}

// The largest of init and term(j) for j < n, in 16 lanes like row_sum, so that the loop
// vectorizes (one running std::max was a chain of dependent maxss). A maximum does not
// depend on the order: this is the value of std::max folded left from init, NaN terms
// skipped as std::max(acc, NaN) skips them (the result is NaN only if init is), except
// that with +0 and -0 both largest it may return the other zero, which no caller can
// tell apart (they subtract it: x - 0 and x + 0 are the same for either sign, and
// exp(+-0) = 1).
template <class T, class Term>
inline T row_max(int64_t n, T init, Term term) {
  constexpr int kLanes = 16;
  T acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = init;
  int64_t j0 = 0;
  for (; j0 + kLanes <= n; j0 += kLanes)
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      const T v = term(j0 + l);
      acc[l] = acc[l] < v ? v : acc[l];
    }
  for (int l = 0; j0 + l < n; ++l) acc[l] = std::max(acc[l], term(j0 + l));
  T mx = init;
  for (int l = 0; l < kLanes; ++l) mx = std::max(mx, acc[l]);
  return mx;
}

// ---------------------------------------------------------------- embedding
// out (N,d); ids (N); weight (V,d)
template <class T>
void embedding_forward(T* out, const int32_t* ids, const T* weight, int64_t N, int64_t d) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) std::copy_n(weight + int64_t(ids[i]) * d, d, out + i * d);
}
// dweight (V,d) += scatter of dout (N,d). Sequential over tokens: rows of the same id
// are summed in token order, so the result does not depend on the thread count.
template <class T>
void embedding_backward(T* dweight, const T* dout, const int32_t* ids, int64_t N, int64_t d) {
  for (int64_t i = 0; i < N; ++i) {
    T* dst = dweight + int64_t(ids[i]) * d;
    const T* src = dout + i * d;
    for (int64_t j = 0; j < d; ++j) dst[j] += src[j];
  }
}

// ---------------------------------------------------------------- RMSNorm
// out (N,d), rstd (N); inp (N,d), w (d). out = inp * rstd * w, rstd = 1/sqrt(mean(inp^2)+eps).
// w = nullptr: the unweighted normalisation out = inp * rstd (V4's per-head q norm).
template <class T>
void rmsnorm_forward(T* out, T* rstd, const T* inp, const T* w, int64_t N, int64_t d, double eps) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const T* x = inp + i * d;
    const T ss = row_sum<T>(d, [x](int64_t j) { return x[j] * x[j]; });
    const T r = T(1) / std::sqrt(ss / T(d) + T(eps));
    rstd[i] = r;
    T* o = out + i * d;
    if (w)
      for (int64_t j = 0; j < d; ++j) o[j] = x[j] * r * w[j];
    else
      for (int64_t j = 0; j < d; ++j) o[j] = x[j] * r;
  }
}
// dinp (N,d) +=, dw (d) +=; dout (N,d), inp (N,d), w (d), rstd (N). w = dw = nullptr:
// the unweighted normalisation (w = 1, no weight gradient).
template <class T>
void rmsnorm_backward(T* dinp, T* dw, const T* dout, const T* inp, const T* w, const T* rstd, int64_t N,
                      int64_t d) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const T* x = inp + i * d;
    const T* g = dout + i * d;
    const T r = rstd[i];
    // mean over j of (g*w)_j * xhat_j
    T dot = w ? row_sum<T>(d, [g, w, x, r](int64_t j) { return g[j] * w[j] * x[j] * r; })
              : row_sum<T>(d, [g, x, r](int64_t j) { return g[j] * x[j] * r; });
    dot /= T(d);
    T* dx = dinp + i * d;
    for (int64_t j = 0; j < d; ++j) dx[j] += r * ((w ? g[j] * w[j] : g[j]) - x[j] * r * dot);
  }
  if (!dw) return;
  // dw_j = sum_i g_ij * xhat_ij, rows summed in order, parallel over blocks of columns:
  // row by row over a block's running sums (contiguous, vectorized) rather than column
  // by column down the rows (a cache line per term); the same sums in the same order.
  constexpr int64_t kCols = 64;
#pragma omp parallel for schedule(static)
  for (int64_t j0 = 0; j0 < d; j0 += kCols) {
    const int64_t nj = std::min(kCols, d - j0);
    T acc[kCols] = {};
    for (int64_t i = 0; i < N; ++i) {
      const T* g = dout + i * d + j0;
      const T* x = inp + i * d + j0;
      const T r = rstd[i];
#pragma omp simd
      for (int64_t j = 0; j < nj; ++j) acc[j] += g[j] * x[j] * r;
    }
    for (int64_t j = 0; j < nj; ++j) dw[j0 + j] += acc[j];
  }
}

// ---------------------------------------------------------------- linear (no bias)
// out (N,O) = inp (N,I) w^T, w (O,I)
template <class T>
void linear_forward(T* out, const T* inp, const T* w, int64_t N, int64_t I, int64_t O) {
  kernels::gemm_nt(N, O, I, inp, I, w, I, out, O, false);
}
// dinp (N,I) += dout (N,O) w; dw (O,I) += dout^T inp. dinp may be null.
template <class T>
void linear_backward(T* dinp, T* dw, const T* dout, const T* inp, const T* w, int64_t N, int64_t I, int64_t O) {
  if (N == 0) return;
  if (dinp) kernels::gemm_nn(N, I, O, dout, O, w, I, dinp, I, true);
  kernels::gemm_tn(O, I, N, dout, O, inp, I, dw, I, true);
}
// Its input-gradient half alone: dinp (N,I) += dout (N,O) w.
template <class T>
void linear_backward_input(T* dinp, const T* dout, const T* w, int64_t N, int64_t I, int64_t O) {
  if (N > 0) kernels::gemm_nn(N, I, O, dout, O, w, I, dinp, I, true);
}

// ---------------------------------------------------------------- grouped linear
// Several linear layers of the same input whose outputs sit side by side in one row
// (the MLP's [gate; up], attention's [q; k; v]): part p is a weight (rows_p, d) with its
// gradient, and its outputs are the columns [c_p, c_p + rows_p) of out (N, sum rows).
// When the weights are adjacent in memory (the parameter layout stores them one after
// the other) the forward is one GEMM over all of them: each column is the same dot
// product in the same order as with one GEMM per part (kernels/gemm.hpp: a column
// never depends on the others), so fusing changes no bit; it packs x once instead of
// once per part and gives the threads more tiles. The weight gradient fuses the same
// way when the gradients are adjacent too. The input gradient dx += dout [W_0; W_1; ...]
// reduces over all the parts' rows, which is the per-part GEMMs' order exactly when
// every part but the last spans whole K blocks (rows_p % kGemmKc == 0), and is one GEMM
// per part otherwise. Weights that are not adjacent take one GEMM per part everywhere,
// with the same results.
template <class T>
struct LinearPart {
  const T* w;     // (rows, d)
  T* dw;          // (rows, d) +=, or null for a forward
  int64_t rows;
};
template <class T, size_t P>
void grouped_linear_forward(T* out, const T* x, const std::array<LinearPart<T>, P>& parts, int64_t N, int64_t d) {
  int64_t ld = 0;
  bool adjacent = true;
  for (size_t p = 0; p < P; ++p) {
    if (p > 0 && parts[p].w != parts[p - 1].w + parts[p - 1].rows * d) adjacent = false;
    ld += parts[p].rows;
  }
  if (adjacent) return kernels::gemm_nt(N, ld, d, x, d, parts[0].w, d, out, ld, false);
  for (int64_t p = 0, c = 0; p < int64_t(P); c += parts[size_t(p)].rows, ++p)
    kernels::gemm_nt(N, parts[size_t(p)].rows, d, x, d, parts[size_t(p)].w, d, out + c, ld, false);
}
// dx (N,d) += dout [W_0; W_1; ...] (dx may be null); dW_p += dout_p^T x. dout (N, sum rows).
template <class T, size_t P>
void grouped_linear_backward(T* dx, const T* dout, const T* x, const std::array<LinearPart<T>, P>& parts, int64_t N,
                             int64_t d) {
  if (N == 0) return;
  int64_t ld = 0;
  bool w_adjacent = true, dw_adjacent = true, whole_blocks = true;
  for (size_t p = 0; p < P; ++p) {
    if (p > 0 && parts[p].w != parts[p - 1].w + parts[p - 1].rows * d) w_adjacent = false;
    if (p > 0 && parts[p].dw != parts[p - 1].dw + parts[p - 1].rows * d) dw_adjacent = false;
    if (p + 1 < P && parts[p].rows % kernels::kGemmKc != 0) whole_blocks = false;
    ld += parts[p].rows;
  }
  if (dx) {
    if (w_adjacent && whole_blocks) {
      kernels::gemm_nn(N, d, ld, dout, ld, parts[0].w, d, dx, d, true);
    } else {
      for (int64_t p = 0, c = 0; p < int64_t(P); c += parts[size_t(p)].rows, ++p)
        kernels::gemm_nn(N, d, parts[size_t(p)].rows, dout + c, ld, parts[size_t(p)].w, d, dx, d, true);
    }
  }
  if (dw_adjacent) {
    kernels::gemm_tn(ld, d, N, dout, ld, x, d, parts[0].dw, d, true);
  } else {
    for (int64_t p = 0, c = 0; p < int64_t(P); c += parts[size_t(p)].rows, ++p)
      kernels::gemm_tn(parts[size_t(p)].rows, d, N, dout + c, ld, x, d, parts[size_t(p)].dw, d, true);
  }
}

// ---------------------------------------------------------------- SwiGLU
namespace detail {
// One row of each, with the limit's clamps compiled in or out; values are loaded once
// and every branch is a select, so each row is one vectorized loop (ops::exp), built
// for the widest vectors the CPU has (kernels/multiversion.hpp).
template <class T, bool kClamp>
MOETUNE_CPU_CLONES inline void swiglu_forward_row(T* o, const T* gr, const T* ur, int64_t cols, T c) {
#pragma omp simd  // distinct buffers: no alias check
  for (int64_t i = 0; i < cols; ++i) {
    T gi = gr[i], ui = ur[i];
    if constexpr (kClamp) {
      gi = c < gi ? c : gi;                         // std::min(g, c)
      ui = ui < -c ? -c : (c < ui ? c : ui);        // std::clamp(u, -c, c)
    }
    const T sg = T(1) / (T(1) + ops::exp(-gi));
    o[i] = gi * sg * ui;
  }
}
template <class T, bool kClamp>
MOETUNE_CPU_CLONES inline void swiglu_backward_row(T* dgr, T* dur, const T* dr, const T* gr, const T* ur, int64_t cols,
                                                    T c) {
#pragma omp simd  // distinct buffers: no alias check
  for (int64_t i = 0; i < cols; ++i) {
    const T g = gr[i], u = ur[i], d = dr[i];
    bool g_in = true, u_in = true;
    T gi = g, ui = u;
    if constexpr (kClamp) {
      g_in = g <= c;
      u_in = (u >= -c) & (u <= c);
      gi = g_in ? g : c;
      ui = u_in ? u : (u < -c ? -c : (c < u ? c : u));
    }
    const T sg = T(1) / (T(1) + ops::exp(-gi));
    const T silu = gi * sg;
    dur[i] = u_in ? d * silu : T(0);
    dgr[i] = g_in ? d * ui * sg * (T(1) + gi * (T(1) - sg)) : T(0);
  }
}
}  // namespace detail

// out (rows,cols) = silu(g) * u, where g and u are (rows,cols) with row stride ld (the
// MLP's g and u are the two halves of one (rows,2F) buffer; ld = cols for plain
// arrays); out is contiguous. limit c > 0 (swiglu_limit, MODEL.md section 12) first
// clamps g = min(g, c) and u = clamp(u, -c, c); 0 = off.
template <class T>
void swiglu_forward(T* out, const T* g, const T* u, int64_t rows, int64_t cols, int64_t ld, double limit = 0) {
  const T c = T(limit);
  kernels::parallel_for(rows, [&](int64_t r) {  // no team inside the experts' one-per-thread loop
    if (c > 0)
      detail::swiglu_forward_row<T, true>(out + r * cols, g + r * ld, u + r * ld, cols, c);
    else
      detail::swiglu_forward_row<T, false>(out + r * cols, g + r * ld, u + r * ld, cols, c);
  });
}
// dg, du (overwritten, not accumulated: they are scratch; row stride ld, as g and u)
// from dout (rows,cols, contiguous); g, u are the unclamped inputs. Under a limit the
// gradient is 0 where a value was clamped (torch.clamp's convention: it passes at the
// bound itself).
template <class T>
void swiglu_backward(T* dg, T* du, const T* dout, const T* g, const T* u, int64_t rows, int64_t cols, int64_t ld,
                     double limit = 0) {
  const T c = T(limit);
  kernels::parallel_for(rows, [&](int64_t r) {
    if (c > 0)
      detail::swiglu_backward_row<T, true>(dg + r * ld, du + r * ld, dout + r * cols, g + r * ld, u + r * ld, cols, c);
    else
      detail::swiglu_backward_row<T, false>(dg + r * ld, du + r * ld, dout + r * cols, g + r * ld, u + r * ld, cols,
                                            c);
  });
}

// ---------------------------------------------------------------- RoPE
// In place on x (N, nh, hd), Hugging Face Llama rotate_half convention:
// x1 = x[:hd/2], x2 = x[hd/2:]; out = (x1 c - x2 s, x2 c + x1 s), angle = pos * theta^(-2i/hd).
// pos (N). sign = +1 forward, -1 applies the inverse rotation (the backward).
// cos and sin of every (position, frequency) come from a table of the calling thread,
// computed in double once per (theta, hd) and extended as longer positions appear:
// the same values as computing them on the spot, without N*hd/2 pow/cos/sin per call.
namespace detail {
struct RopeTable {
  double theta = 0;
  int64_t hd = 0, positions = 0;
  std::vector<double> cos, sin;  // (positions, hd/2)
};
inline const RopeTable& rope_table(double theta, int64_t hd, int64_t positions) {
  static thread_local RopeTable t;
  if (t.theta != theta || t.hd != hd) t = RopeTable{theta, hd, 0, {}, {}};
  if (positions > t.positions) {
    const int64_t half = hd / 2;
    t.cos.resize(positions * half);
    t.sin.resize(positions * half);
    for (int64_t p = t.positions; p < positions; ++p)
      for (int64_t f = 0; f < half; ++f) {
        const double inv_freq = std::pow(theta, -2.0 * double(f) / double(hd));
        const double ang = double(p) * inv_freq;
        t.cos[p * half + f] = std::cos(ang);
        t.sin[p * half + f] = std::sin(ang);
      }
    t.positions = positions;
  }
  return t;
}
}  // namespace detail

// The rotation itself, on the rd channels [hd - rd, hd) of each head of x (N, nh, hd):
// frequency f (angle pos * theta^(-2f/rd)) rotates the pair (f, f + rd/2) (rotate_half,
// Llama) or, `interleaved`, the adjacent pair (2f, 2f + 1) (DeepSeek-V4, MODEL.md 12).
// ld: the row stride of x (0 = nh*hd; the fused Q/K/V buffer has longer rows).
template <class T>
void rope_rotate(T* x, const int32_t* pos, int64_t N, int64_t nh, int64_t hd, int64_t rd, bool interleaved,
                 double theta, int sign, int64_t ld = 0) {
  if (ld == 0) ld = nh * hd;
  const int64_t half = rd / 2, off = hd - rd;
  if (half == 0 || N == 0) return;
  int64_t positions = 0;
  for (int64_t i = 0; i < N; ++i) positions = std::max<int64_t>(positions, int64_t(pos[i]) + 1);
  const detail::RopeTable& tab = detail::rope_table(theta, rd, positions);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const double* ct = tab.cos.data() + int64_t(pos[i]) * half;
    const double* st = tab.sin.data() + int64_t(pos[i]) * half;
    // Head by head, frequencies innermost: the rotate_half pairs (f, f + half) are two
    // contiguous runs, one vectorized loop (each element's arithmetic is unchanged).
    for (int64_t h = 0; h < nh; ++h) {
      T* v = x + i * ld + h * hd + off;
      if (interleaved) {
        for (int64_t f = 0; f < half; ++f) {
          const T c = T(ct[f]), s = T(sign * st[f]);
          const T a = v[2 * f], b = v[2 * f + 1];
          v[2 * f] = a * c - b * s;
          v[2 * f + 1] = b * c + a * s;
        }
      } else {
        T* vb = v + half;
#pragma omp simd
        for (int64_t f = 0; f < half; ++f) {
          const T c = T(ct[f]), s = T(sign * st[f]);
          const T a = v[f], b = vb[f];
          v[f] = a * c - b * s;
          vb[f] = b * c + a * s;
        }
      }
    }
  }
}
template <class T>
void rope_apply(T* x, const int32_t* pos, int64_t N, int64_t nh, int64_t hd, double theta, int sign,
                int64_t ld = 0) {
  rope_rotate(x, pos, N, nh, hd, hd, false, theta, sign, ld);
}

// ---------------------------------------------------------------- attention
// Causal, document-masked, grouped-query attention, done tile by tile without an
// S x S matrix: for each (row, head) and each document [ds, de) of the row, query
// tiles of kAttnTile rows see only the keys [ds, i1) of their own document up to the
// tile's last query (tiles above the diagonal and across documents are never
// computed). The forward keeps, per (row, head, query), the softmax max and 1/sum
// ("stats", 2 values) and the backward recomputes the probabilities from them,
// bit for bit, as flash attention does.
// The arithmetic of one query i of a document starting at ds is: scores
// s_j = dot(q_i, k_j) * scale for j in [ds, i] (one GEMM element each), then
// attention_softmax_row, then o = sum_j p_j v_j as one GEMM reduction over the keys
// from ds. attention_cached runs exactly this for a cache row (ds = 0), so decoding
// gives the full forward's bits (keys past i carry p = 0, which changes no sum).
// attention_forward, attention_backward and attention_cached are in moe/attention.cpp:
// they run each tile's products on the GEMM's micro-kernel over operands packed once per
// tile (a decode step is a tile of one query), with no GEMM call per tile.
inline constexpr int64_t kAttnTile = 64;

namespace detail {
// End of the document that starts at ds in a row of S doc ids.
inline int64_t doc_end(const int32_t* dr, int64_t ds, int64_t S) {
  int64_t de = ds + 1;
  while (de < S && dr[de] == dr[ds]) ++de;
  return de;
}
}  // namespace detail

// One query's causal softmax, in place: p[0..n) holds raw dot products (n >= 1 valid
// keys), p[n..total) is set to 0. stat = {max, 1/sum} of the scaled scores. `sink`
// (V4's learned sink logit, MODEL.md 12; -inf = none) joins the max and adds
// exp(sink - max) to the denominator only, after the keys; with -inf it adds an exact 0.
// Built for the widest vectors the CPU has (kernels/multiversion.hpp), as the next one.
template <class T>
MOETUNE_CPU_CLONES inline void attention_softmax_row(T* p, int64_t n, int64_t total, T scale, T* stat,
                                  T sink = -std::numeric_limits<T>::infinity()) {
  for (int64_t j = 0; j < n; ++j) p[j] *= scale;
  const T mx = row_max<T>(n, sink, [p](int64_t j) { return p[j]; });
  for (int64_t j = 0; j < n; ++j) p[j] = ops::exp(p[j] - mx);  // vectorizes
  T sum = row_sum<T>(n, [p](int64_t j) { return p[j]; });
  sum += ops::exp(sink - mx);
  const T inv = T(1) / sum;
  for (int64_t j = 0; j < n; ++j) p[j] *= inv;
  std::fill(p + n, p + total, T(0));
  stat[0] = mx;
  stat[1] = inv;
}
// The same probabilities again from the raw dot products and the stats.
template <class T>
MOETUNE_CPU_CLONES inline void attention_probs_row(T* p, int64_t n, int64_t total, T scale, const T* stat) {
  for (int64_t j = 0; j < n; ++j) p[j] = ops::exp(p[j] * scale - stat[0]) * stat[1];
  std::fill(p + n, p + total, T(0));
}

namespace detail {
// The keys a query tile [i0, ..) of a document starting at ds covers: from
// attn_key_start (a sliding window W > 0 drops the keys before the window of the
// tile's first query), so attention_cached, which recomputes it from the query's
// position, reduces over the same keys from the same first key.
inline int64_t attn_key_start(int64_t ds, int64_t i0, int64_t window) {
  return window > 0 ? std::max(ds, i0 - window + 1) : ds;
}
// The first key query i of that document sees.
inline int64_t attn_key_first(int64_t ds, int64_t i, int64_t window) {
  return window > 0 ? std::max(ds, i - window + 1) : ds;
}
template <class T>
inline T attn_sink(const T* sinks, int64_t h) {
  return sinks ? sinks[h] : -std::numeric_limits<T>::infinity();
}
}  // namespace detail

// out (B*S, H*hd); stats (B,H,S,2) kept for backward;
// q (B*S, H*hd), k, v (B*S, Hkv*hd) (q, k already rotated; k and v may be the same
// buffer, as V4's shared key/value head); doc (B*S); sinks (H) or null (none);
// window W > 0: query i sees only keys [i - W + 1, i] of its document (0 = all).
// ldq, ldk: the row strides of q and of k, v (0 = H*hd, Hkv*hd; the fused Q/K/V buffer
// of the default attention holds all three in rows of (H + 2 Hkv)*hd). out is contiguous.
template <class T>
void attention_forward(T* out, T* stats, const T* q, const T* k, const T* v, const int32_t* doc, int64_t B,
                       int64_t S, int64_t H, int64_t Hkv, int64_t hd, const T* sinks = nullptr, int64_t window = 0,
                       int64_t ldq = 0, int64_t ldk = 0);
// dq (B*S,H*hd) +=, dk, dv (B*S,Hkv*hd) += (dk and dv may be the same buffer when k and
// v are); dsinks (H) += when sinks is given; dout (B*S,H*hd); stats, q, k, v, doc,
// sinks, window, ldq, ldk as forward (dq has q's row stride, dk and dv k's). Parallel
// over (row, kv head), so that each dk/dv slice has one writer; its query heads,
// documents and tiles are added in that fixed order. The sinks' gradient is summed
// afterwards over rows and positions in order.
template <class T>
void attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* stats, const T* q, const T* k, const T* v,
                        const int32_t* doc, int64_t B, int64_t S, int64_t H, int64_t Hkv, int64_t hd,
                        const T* sinks = nullptr, T* dsinks = nullptr, int64_t window = 0, int64_t ldq = 0,
                        int64_t ldk = 0);

// Attention of n new queries against a KV cache (decoding, MODEL.md section 10).
// out (n, H*hd); q (n, H*hd) rotated, row stride ldq (0 = H*hd); kc, vc (rows*cap, Hkv*hd): cache row r's
// position p at (r*cap + p) (kc = vc for V4's shared head). Query i sees positions
// [0, pos[i]] of cache row row[i] (its own key included, already written), or the last
// `window` of them. A cache row is one document from position 0, and the arithmetic is
// attention_forward's for that document (the same first key, attn_key_start of the
// query's tile, so the same reduction), so the result equals the full forward's bit
// for bit.
template <class T>
void attention_cached(T* out, const T* q, const T* kc, const T* vc, const int32_t* row, const int32_t* pos, int64_t n,
                      int64_t cap, int64_t H, int64_t Hkv, int64_t hd, const T* sinks = nullptr,
                      int64_t window = 0, int64_t ldq = 0);

// ---------------------------------------------------------------- cross-entropy
// Per-token CE of logits (N,V) against targets (N) (-100 = ignored), and, if dlogits
// is non-null, dlogits (N,V) = (softmax - onehot) * grad_scale on target rows, 0 elsewhere
// (overwritten). Returns the sum of the losses of non-ignored targets.
template <class T>
double cross_entropy_forward_backward(T* dlogits, const T* logits, const int32_t* targets, int64_t N, int64_t V,
                                      double grad_scale) {
  // Per-token losses, summed in token order (independent of the thread count). Scratch
  // of the calling thread, bound to a reference because the loop's threads share it.
  static thread_local std::vector<double> loss_buf;
  std::vector<double>& loss = loss_buf;
  loss.assign(N, 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const T* x = logits + i * V;
    T* dx = dlogits ? dlogits + i * V : nullptr;
    if (targets[i] < 0) {
      if (dx) std::fill_n(dx, V, T(0));
      continue;
    }
    const T mx = row_max<T>(V - 1, x[0], [x](int64_t j) { return x[j + 1]; });
    static thread_local std::vector<T> e_buf;  // this thread's; grows once
    std::vector<T>& e = e_buf;
    if (e.size() < size_t(V)) e.resize(size_t(V));
    for (int64_t j = 0; j < V; ++j) e[size_t(j)] = ops::exp(x[j] - mx);  // vectorizes
    const T* ep = e.data();
    const T sum = row_sum<T>(V, [ep](int64_t j) { return ep[j]; });
    const T lse = mx + std::log(sum);
    loss[i] = double(lse - x[targets[i]]);
    if (dx) {
      const T gs = T(grad_scale);
      for (int64_t j = 0; j < V; ++j) dx[j] = ops::exp(x[j] - lse) * gs;
      dx[targets[i]] -= gs;
    }
  }
  double total = 0;
  for (int64_t i = 0; i < N; ++i) total += loss[i];
  return total;
}

}  // namespace moetune::ops
