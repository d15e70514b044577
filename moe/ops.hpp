// The dense ops of the model, each a pair of free functions X_forward / X_backward
// (llm.c style): arguments are outputs, inputs, weights, then sizes; every pointer
// carries its shape in a comment; backward functions ACCUMULATE (+=) into gradient
// buffers. Templated on the scalar type so gradient checks run in double. Matrix
// products are Eigen GEMMs over views of our flat buffers; other loops use OpenMP.
#pragma once
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace moetune::ops {

template <class T>
using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using MapM = Eigen::Map<Mat<T>>;
template <class T>
using CMapM = Eigen::Map<const Mat<T>>;
using Stride = Eigen::OuterStride<>;
template <class T>
using SMapM = Eigen::Map<Mat<T>, 0, Stride>;
template <class T>
using CSMapM = Eigen::Map<const Mat<T>, 0, Stride>;

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
// out (N,d), rstd (N); inp (N,d), w (d). out = inp * rstd * w, rstd = 1/sqrt(mean(inp^2)+eps)
template <class T>
void rmsnorm_forward(T* out, T* rstd, const T* inp, const T* w, int64_t N, int64_t d, double eps) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const T* x = inp + i * d;
    T ss = 0;
    for (int64_t j = 0; j < d; ++j) ss += x[j] * x[j];
    const T r = T(1) / std::sqrt(ss / T(d) + T(eps));
    rstd[i] = r;
    T* o = out + i * d;
    for (int64_t j = 0; j < d; ++j) o[j] = x[j] * r * w[j];
  }
}
// dinp (N,d) +=, dw (d) +=; dout (N,d), inp (N,d), w (d), rstd (N)
template <class T>
void rmsnorm_backward(T* dinp, T* dw, const T* dout, const T* inp, const T* w, const T* rstd, int64_t N,
                      int64_t d) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const T* x = inp + i * d;
    const T* g = dout + i * d;
    const T r = rstd[i];
    T dot = 0;  // mean over j of (g*w)_j * xhat_j
    for (int64_t j = 0; j < d; ++j) dot += g[j] * w[j] * x[j] * r;
    dot /= T(d);
    T* dx = dinp + i * d;
    for (int64_t j = 0; j < d; ++j) dx[j] += r * (g[j] * w[j] - x[j] * r * dot);
  }
  // dw_j = sum_i g_ij * xhat_ij, parallel over columns, rows summed in order.
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < d; ++j) {
    T acc = 0;
    for (int64_t i = 0; i < N; ++i) acc += dout[i * d + j] * inp[i * d + j] * rstd[i];
    dw[j] += acc;
  }
}

// ---------------------------------------------------------------- linear (no bias)
// out (N,O) = inp (N,I) w^T, w (O,I)
template <class T>
void linear_forward(T* out, const T* inp, const T* w, int64_t N, int64_t I, int64_t O) {
  if (N == 0) return;
  MapM<T>(out, N, O).noalias() = CMapM<T>(inp, N, I) * CMapM<T>(w, O, I).transpose();
}
// dinp (N,I) += dout (N,O) w; dw (O,I) += dout^T inp. dinp may be null.
template <class T>
void linear_backward(T* dinp, T* dw, const T* dout, const T* inp, const T* w, int64_t N, int64_t I, int64_t O) {
  if (N == 0) return;
  if (dinp) MapM<T>(dinp, N, I).noalias() += CMapM<T>(dout, N, O) * CMapM<T>(w, O, I);
  MapM<T>(dw, O, I).noalias() += CMapM<T>(dout, N, O).transpose() * CMapM<T>(inp, N, I);
}

// ---------------------------------------------------------------- SwiGLU
// out (N,F) = silu(g) * u; g, u (N,F). limit c > 0 (swiglu_limit, MODEL.md section 12)
// first clamps g = min(g, c) and u = clamp(u, -c, c); 0 = off.
template <class T>
void swiglu_forward(T* out, const T* g, const T* u, int64_t n, double limit = 0) {
  const T c = T(limit);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const T gi = c > 0 ? std::min(g[i], c) : g[i];
    const T ui = c > 0 ? std::clamp(u[i], -c, c) : u[i];
    const T sg = T(1) / (T(1) + std::exp(-gi));
    out[i] = gi * sg * ui;
  }
}
// dg, du (N,F) = (overwritten, not accumulated: they are scratch) from dout (N,F); g, u
// are the unclamped inputs. Under a limit the gradient is 0 where a value was clamped
// (torch.clamp's convention: it passes at the bound itself).
template <class T>
void swiglu_backward(T* dg, T* du, const T* dout, const T* g, const T* u, int64_t n, double limit = 0) {
  const T c = T(limit);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const bool g_in = !(c > 0) || g[i] <= c, u_in = !(c > 0) || (u[i] >= -c && u[i] <= c);
    const T gi = g_in ? g[i] : c;
    const T ui = u_in ? u[i] : std::clamp(u[i], -c, c);
    const T sg = T(1) / (T(1) + std::exp(-gi));
    const T silu = gi * sg;
    du[i] = u_in ? dout[i] * silu : T(0);
    dg[i] = g_in ? dout[i] * ui * sg * (T(1) + gi * (T(1) - sg)) : T(0);
  }
}

// ---------------------------------------------------------------- RoPE
// In place on x (N, nh, hd), Hugging Face Llama rotate_half convention:
// x1 = x[:hd/2], x2 = x[hd/2:]; out = (x1 c - x2 s, x2 c + x1 s), angle = pos * theta^(-2i/hd).
// pos (N). sign = +1 forward, -1 applies the inverse rotation (the backward).
template <class T>
void rope_apply(T* x, const int32_t* pos, int64_t N, int64_t nh, int64_t hd, double theta, int sign) {
  const int64_t half = hd / 2;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t f = 0; f < half; ++f) {
      const double inv_freq = std::pow(theta, -2.0 * double(f) / double(hd));
      const double ang = double(pos[i]) * inv_freq;
      const T c = T(std::cos(ang)), s = T(sign * std::sin(ang));
      for (int64_t h = 0; h < nh; ++h) {
        T* v = x + (i * nh + h) * hd;
        const T a = v[f], b = v[f + half];
        v[f] = a * c - b * s;
        v[f + half] = b * c + a * s;
      }
    }
  }
}

// ---------------------------------------------------------------- attention
// Causal, document-masked, grouped-query attention over B rows of S tokens.
// out (B*S, H*hd); probs (B,H,S,S) kept for backward;
// q (B*S, H*hd), k, v (B*S, Hkv*hd) (q, k already rotated); doc (B*S).
template <class T>
void attention_forward(T* out, T* probs, const T* q, const T* k, const T* v, const int32_t* doc, int64_t B,
                       int64_t S, int64_t H, int64_t Hkv, int64_t hd) {
  const int64_t qs = H * hd, ks = Hkv * hd, rep = H / Hkv;
  const T scale = T(1) / std::sqrt(T(hd));
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t kh = h / rep;
      CSMapM<T> Q(q + b * S * qs + h * hd, S, hd, Stride(qs));
      CSMapM<T> K(k + b * S * ks + kh * hd, S, hd, Stride(ks));
      CSMapM<T> V(v + b * S * ks + kh * hd, S, hd, Stride(ks));
      MapM<T> P(probs + (b * H + h) * S * S, S, S);
      P.noalias() = (Q * K.transpose()) * scale;
      const int32_t* dr = doc + b * S;
      for (int64_t i = 0; i < S; ++i) {
        T* row = P.data() + i * S;
        T mx = -std::numeric_limits<T>::infinity();
        for (int64_t j = 0; j <= i; ++j)
          if (dr[j] == dr[i]) mx = std::max(mx, row[j]);
        T sum = 0;
        for (int64_t j = 0; j < S; ++j) {
          const bool ok = j <= i && dr[j] == dr[i];
          row[j] = ok ? std::exp(row[j] - mx) : T(0);
          sum += row[j];
        }
        const T inv = T(1) / sum;
        for (int64_t j = 0; j <= i; ++j) row[j] *= inv;
      }
      SMapM<T> O(out + b * S * qs + h * hd, S, hd, Stride(qs));
      O.noalias() = P * V;
    }
}
// dq (B*S,H*hd) +=, dk, dv (B*S,Hkv*hd) +=; dout (B*S,H*hd); probs, q, k, v as forward.
// Parallel over (row, kv head) so that each dk/dv slice has one writer.
template <class T>
void attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* probs, const T* q, const T* k, const T* v,
                        int64_t B, int64_t S, int64_t H, int64_t Hkv, int64_t hd) {
  const int64_t qs = H * hd, ks = Hkv * hd, rep = H / Hkv;
  const T scale = T(1) / std::sqrt(T(hd));
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t kh = 0; kh < Hkv; ++kh) {
      Mat<T> dP(S, S);
      CSMapM<T> K(k + b * S * ks + kh * hd, S, hd, Stride(ks));
      CSMapM<T> V(v + b * S * ks + kh * hd, S, hd, Stride(ks));
      SMapM<T> dK(dk + b * S * ks + kh * hd, S, hd, Stride(ks));
      SMapM<T> dV(dv + b * S * ks + kh * hd, S, hd, Stride(ks));
      for (int64_t h = kh * rep; h < (kh + 1) * rep; ++h) {
        CSMapM<T> Q(q + b * S * qs + h * hd, S, hd, Stride(qs));
        SMapM<T> dQ(dq + b * S * qs + h * hd, S, hd, Stride(qs));
        CSMapM<T> dO(dout + b * S * qs + h * hd, S, hd, Stride(qs));
        CMapM<T> P(probs + (b * H + h) * S * S, S, S);
        dV.noalias() += P.transpose() * dO;
        dP.noalias() = dO * V.transpose();
        for (int64_t i = 0; i < S; ++i) {
          T dot = 0;
          for (int64_t j = 0; j <= i; ++j) dot += P(i, j) * dP(i, j);
          for (int64_t j = 0; j < S; ++j) dP(i, j) = j <= i ? P(i, j) * (dP(i, j) - dot) * scale : T(0);
        }
        dQ.noalias() += dP * K;
        dK.noalias() += dP.transpose() * Q;
      }
    }
}

// Attention of n new queries against a KV cache (decoding, MODEL.md section 10).
// out (n, H*hd); q (n, H*hd) rotated; kc, vc (rows*cap, Hkv*hd): cache row r's
// position p at (r*cap + p). Query i sees positions [0, pos[i]] of cache row row[i]
// (its own key included, already written). Same arithmetic order as
// attention_forward: scores * scale, exp(score - max), times 1/sum, then P·V.
template <class T>
void attention_cached(T* out, const T* q, const T* kc, const T* vc, const int32_t* row, const int32_t* pos, int64_t n,
                      int64_t cap, int64_t H, int64_t Hkv, int64_t hd) {
  const int64_t qs = H * hd, ks = Hkv * hd, rep = H / Hkv;
  const T scale = T(1) / std::sqrt(T(hd));
#pragma omp parallel
  {
    std::vector<T> p;
#pragma omp for collapse(2) schedule(static)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t kh = h / rep, len = int64_t(pos[i]) + 1;
        const T* qi = q + i * qs + h * hd;
        const T* kb = kc + int64_t(row[i]) * cap * ks + kh * hd;
        const T* vb = vc + int64_t(row[i]) * cap * ks + kh * hd;
        p.resize(len);
        T mx = -std::numeric_limits<T>::infinity();
        for (int64_t j = 0; j < len; ++j) {
          T dot = 0;
          for (int64_t x = 0; x < hd; ++x) dot += qi[x] * kb[j * ks + x];
          p[j] = dot * scale;
          mx = std::max(mx, p[j]);
        }
        T sum = 0;
        for (int64_t j = 0; j < len; ++j) sum += (p[j] = std::exp(p[j] - mx));
        const T inv = T(1) / sum;
        T* o = out + i * qs + h * hd;
        std::fill_n(o, hd, T(0));
        for (int64_t j = 0; j < len; ++j) {
          const T w = p[j] * inv;
          for (int64_t x = 0; x < hd; ++x) o[x] += w * vb[j * ks + x];
        }
      }
  }
}

// ---------------------------------------------------------------- cross-entropy
// Per-token CE of logits (N,V) against targets (N) (-100 = ignored), and, if dlogits
// is non-null, dlogits (N,V) = (softmax - onehot) * grad_scale on target rows, 0 elsewhere
// (overwritten). Returns the sum of the losses of non-ignored targets.
template <class T>
double cross_entropy_forward_backward(T* dlogits, const T* logits, const int32_t* targets, int64_t N, int64_t V,
                                      double grad_scale) {
  std::vector<double> loss(N, 0.0);  // summed in token order: independent of thread count
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const T* x = logits + i * V;
    T* dx = dlogits ? dlogits + i * V : nullptr;
    if (targets[i] < 0) {
      if (dx) std::fill_n(dx, V, T(0));
      continue;
    }
    T mx = x[0];
    for (int64_t j = 1; j < V; ++j) mx = std::max(mx, x[j]);
    T sum = 0;
    for (int64_t j = 0; j < V; ++j) sum += std::exp(x[j] - mx);
    const T lse = mx + std::log(sum);
    loss[i] = double(lse - x[targets[i]]);
    if (dx) {
      const T gs = T(grad_scale);
      for (int64_t j = 0; j < V; ++j) dx[j] = std::exp(x[j] - lse) * gs;
      dx[targets[i]] -= gs;
    }
  }
  double total = 0;
  for (double l : loss) total += l;
  return total;
}

}  // namespace moetune::ops
