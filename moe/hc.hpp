// mHC, manifold-constrained hyper-connections (MODEL.md section 12; Hugging Face
// transformers' DeepseekV4HyperConnection / DeepseekV4HyperHead). With hc_mult n > 1
// the residual stream of a token is n copies X (n,d). Around each sub-block F
// (attention, then FFN, each with its own input RMSNorm):
//   mix  = (flatten(X) fn^T) * rsqrt(mean(flatten(X)^2) + rms_norm_eps)   fn ((2+n)n, n d)
//   a    = mix * scale_g + base                 scale (3): one per group pre | post | comb
//   pre  = sigmoid(a[0:n]) + hc_eps,  post = 2 sigmoid(a[n:2n])
//   comb = Sinkhorn(softmax_row(reshape(a[2n:], n, n)) + hc_eps)
//   u = sum_j pre_j X_j;   X'_i = post_i * F(u) + sum_j comb_{j,i} X_j
// The head collapses the streams with its own fn (n, n d), base (n), scale (1): only
// `pre`, u = sum_j pre_j X_j, then the final norm and the LM head.
//
// Forward / backward pairs in llm.c style (outputs, inputs, weights, sizes; backward
// functions accumulate into weight gradients). Batch invariance (MODEL.md section 13):
// the one product is kernels::gemm_*; every other reduction runs sequentially within a
// token, and the reductions over tokens (dbase, dscale) in token order.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/gemm.hpp"

namespace moetune::hc {

// What a sub-block's (or the head's) connection keeps for its backward, per token:
// mix (N,M), rstd (N), pre (N,n); post (N,n) and comb (N,n*n) for a sub-block only.
// M = (2+n)n for a sub-block, n for the head.
template <class T>
struct HcState {
  std::vector<T> mix, rstd, pre, post, comb;
};

// Sizes and constants of one connection.
struct HcShape {
  int64_t n = 1;     // streams (hc_mult)
  int64_t d = 1;     // hidden size
  int iters = 1;     // hc_sinkhorn_iters
  double eps = 0;    // hc_eps
  double rms_eps = 0;  // rms_norm_eps (of the mix's normalisation)
  bool head = false;   // the head's collapse: pre only
  int64_t M() const { return head ? n : (2 + n) * n; }
};

template <class T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// ---------------------------------------------------------------- mix
// mix (N,M) = (X fn^T) * rstd; rstd (N) = 1/sqrt(mean(X^2) + eps); X (N,K), fn (M,K).
template <class T>
void mix_forward(T* mix, T* rstd, const T* X, const T* fn, int64_t N, int64_t M, int64_t K, double eps) {
  if (N == 0) return;
  kernels::gemm_nt(N, M, K, X, K, fn, K, mix, M, false);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const T* x = X + i * K;
    T ss = 0;
    for (int64_t j = 0; j < K; ++j) ss += x[j] * x[j];
    const T r = T(1) / std::sqrt(ss / T(K) + T(eps));
    rstd[i] = r;
    for (int64_t m = 0; m < M; ++m) mix[i * M + m] *= r;
  }
}
// dX (N,K) +=, dfn (M,K) +=. dmix (N,M): d loss / d mix, overwritten (becomes the
// gradient of the un-normalised product). X, fn, mix, rstd as in the forward.
template <class T>
void mix_backward(T* dX, T* dfn, T* dmix, const T* X, const T* fn, const T* mix, const T* rstd, int64_t N, int64_t M,
                  int64_t K) {
  if (N == 0) return;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const T r = rstd[i];
    T* g = dmix + i * M;
    T dr = 0;  // d loss / d rstd = sum_m dmix_m * (X fn^T)_m
    for (int64_t m = 0; m < M; ++m) dr += g[m] * (mix[i * M + m] / r);
    for (int64_t m = 0; m < M; ++m) g[m] *= r;
    // d rstd / d x_j = -rstd^3 x_j / K
    const T c = -dr * r * r * r / T(K);
    const T* x = X + i * K;
    T* dx = dX + i * K;
    for (int64_t j = 0; j < K; ++j) dx[j] += c * x[j];
  }
  kernels::gemm_nn(N, K, M, dmix, M, fn, K, dX, K, true);
  kernels::gemm_tn(M, K, N, dmix, M, X, K, dfn, K, true);
}

// ---------------------------------------------------------------- Sinkhorn
// The normalisations of comb, in order: column, then (row, column) x (iters - 1).
inline int sinkhorn_steps(int iters) { return 2 * iters - 1; }
inline bool sinkhorn_is_column(int q) { return q % 2 == 0; }

// c (n,n) normalised in place along rows (column = false: each row divided by its sum
// + eps) or columns.
template <class T>
void normalise(T* c, int64_t n, bool column, double eps) {
  for (int64_t a = 0; a < n; ++a) {
    T s = 0;
    for (int64_t b = 0; b < n; ++b) s += column ? c[b * n + a] : c[a * n + b];
    const T inv = T(1) / (s + T(eps));
    for (int64_t b = 0; b < n; ++b) (column ? c[b * n + a] : c[a * n + b]) *= inv;
  }
}

// states ((steps+1), n, n): states[0] = softmax_row(z) + eps, states[q+1] = step q of
// states[q]; the last is comb. z (n,n) = the comb logits a[2n:].
template <class T>
void sinkhorn_forward(T* states, const T* z, int64_t n, int iters, double eps) {
  const int64_t nn = n * n;
  for (int64_t j = 0; j < n; ++j) {
    const T* zr = z + j * n;
    T* c = states + j * n;
    T mx = zr[0];
    for (int64_t k = 1; k < n; ++k) mx = std::max(mx, zr[k]);
    T s = 0;
    for (int64_t k = 0; k < n; ++k) s += std::exp(zr[k] - mx);
    for (int64_t k = 0; k < n; ++k) c[k] = std::exp(zr[k] - mx) / s + T(eps);
  }
  const int Q = sinkhorn_steps(iters);
  for (int q = 0; q < Q; ++q) {
    std::copy_n(states + q * nn, nn, states + (q + 1) * nn);
    normalise(states + (q + 1) * nn, n, sinkhorn_is_column(q), eps);
  }
}

// dz (n,n) = d loss / d z from dcomb (n,n) (modified: used as work space); states from
// sinkhorn_forward.
template <class T>
void sinkhorn_backward(T* dz, T* dcomb, const T* states, int64_t n, int iters, double eps) {
  const int64_t nn = n * n;
  T* g = dcomb;
  for (int q = sinkhorn_steps(iters) - 1; q >= 0; --q) {
    const T* c = states + q * nn;  // the input of step q
    const bool column = sinkhorn_is_column(q);
    // c' = c / (s + eps), s = the sum along the axis: dc = (dc' - sum(dc' * c') ) / (s + eps)
    for (int64_t a = 0; a < n; ++a) {
      T s = 0, gc = 0;
      for (int64_t b = 0; b < n; ++b) {
        const int64_t at = column ? b * n + a : a * n + b;
        s += c[at];
      }
      const T inv = T(1) / (s + T(eps));
      for (int64_t b = 0; b < n; ++b) {
        const int64_t at = column ? b * n + a : a * n + b;
        gc += g[at] * c[at];
      }
      for (int64_t b = 0; b < n; ++b) {
        const int64_t at = column ? b * n + a : a * n + b;
        g[at] = g[at] * inv - gc * inv * inv;
      }
    }
  }
  // softmax_row: p = states[0] - eps; dz = p * (g - sum_k g p)
  for (int64_t j = 0; j < n; ++j) {
    const T* p0 = states + j * n;
    T dot = 0;
    for (int64_t k = 0; k < n; ++k) dot += g[j * n + k] * (p0[k] - T(eps));
    for (int64_t k = 0; k < n; ++k) dz[j * n + k] = (p0[k] - T(eps)) * (g[j * n + k] - dot);
  }
}

// Per-thread work space of the Sinkhorn states (grows once, then reused).
template <class T>
std::vector<T>& sinkhorn_scratch() {
  static thread_local std::vector<T> buf;
  return buf;
}

// ---------------------------------------------------------------- coefficients
// pre, post, comb of N tokens from mix (N,M); base (M), scale (3, or 1 for the head).
template <class T>
void coeffs_forward(HcState<T>& s, const T* base, const T* scale, int64_t N, const HcShape& sh) {
  const int64_t n = sh.n, M = sh.M(), nn = n * n;
  s.pre.resize(N * n);
  if (!sh.head) {
    s.post.resize(N * n);
    s.comb.resize(N * nn);
  }
  const int Q = sinkhorn_steps(sh.iters);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const T* m = s.mix.data() + i * M;
    for (int64_t j = 0; j < n; ++j) s.pre[i * n + j] = sigmoid(m[j] * scale[0] + base[j]) + T(sh.eps);
    if (sh.head) continue;
    for (int64_t j = 0; j < n; ++j) s.post[i * n + j] = T(2) * sigmoid(m[n + j] * scale[1] + base[n + j]);
    std::vector<T>& st = sinkhorn_scratch<T>();
    st.resize(size_t((Q + 1) * nn + nn));
    T* z = st.data() + (Q + 1) * nn;
    for (int64_t k = 0; k < nn; ++k) z[k] = m[2 * n + k] * scale[2] + base[2 * n + k];
    sinkhorn_forward(st.data(), z, n, sh.iters, sh.eps);
    std::copy_n(st.data() + Q * nn, nn, s.comb.data() + i * nn);
  }
}

// da (N,M) = d loss / d a (a = mix*scale + base) from dpre (N,n) and, for a sub-block,
// dpost (N,n) and dcomb (N,n*n) (dcomb is used as work space). Then dmix (N,M) =
// da * scale, dbase (M) += sum_t da, dscale (3 or 1) += sum_t sum_group da * mix (in
// token order). dmix may alias nothing else.
template <class T>
void coeffs_backward(T* dmix, T* dbase, T* dscale, T* da, const T* dpre, const T* dpost, T* dcomb,
                     const HcState<T>& s, const T* base, const T* scale, int64_t N, const HcShape& sh) {
  const int64_t n = sh.n, M = sh.M(), nn = n * n;
  const int Q = sinkhorn_steps(sh.iters);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const T* m = s.mix.data() + i * M;
    T* g = da + i * M;
    for (int64_t j = 0; j < n; ++j) {
      const T sg = sigmoid(m[j] * scale[0] + base[j]);
      g[j] = dpre[i * n + j] * sg * (T(1) - sg);
    }
    if (sh.head) continue;
    for (int64_t j = 0; j < n; ++j) {
      const T sg = sigmoid(m[n + j] * scale[1] + base[n + j]);
      g[n + j] = dpost[i * n + j] * T(2) * sg * (T(1) - sg);
    }
    std::vector<T>& st = sinkhorn_scratch<T>();
    st.resize(size_t((Q + 1) * nn + nn));
    T* z = st.data() + (Q + 1) * nn;
    for (int64_t k = 0; k < nn; ++k) z[k] = m[2 * n + k] * scale[2] + base[2 * n + k];
    sinkhorn_forward(st.data(), z, n, sh.iters, sh.eps);
    sinkhorn_backward(g + 2 * n, dcomb + i * nn, st.data(), n, sh.iters, sh.eps);
  }
  // Reductions over tokens, in token order: dbase per column, dscale per group, in
  // double (a few scalars summed over every token: at the mHC init the streams are equal
  // copies and these sums cancel to nearly 0, which float would leave as noise).
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < M; ++k) {
    double acc = 0;
    for (int64_t i = 0; i < N; ++i) acc += double(da[i * M + k]);
    dbase[k] += T(acc);
  }
  const int groups = sh.head ? 1 : 3;
  for (int gi = 0; gi < groups; ++gi) {
    const int64_t lo = gi == 0 ? 0 : gi == 1 ? n : 2 * n, hi = gi == 0 ? n : gi == 1 ? 2 * n : M;
    double acc = 0;
    for (int64_t i = 0; i < N; ++i) {
      double t = 0;
      for (int64_t k = lo; k < hi; ++k) t += double(da[i * M + k]) * double(s.mix[i * M + k]);
      acc += t;
    }
    dscale[gi] += T(acc);
  }
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i)
    for (int64_t k = 0; k < M; ++k) {
      const int gi = sh.head || k < n ? 0 : k < 2 * n ? 1 : 2;
      dmix[i * M + k] = da[i * M + k] * scale[gi];
    }
}

// ---------------------------------------------------------------- streams
// u (N,d) = sum_j pre_j X_j; X (N,n,d), pre (N,n).
template <class T>
void collapse_forward(T* u, const T* X, const T* pre, int64_t N, int64_t n, int64_t d) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    T* o = u + i * d;
    const T* x = X + i * n * d;
    for (int64_t c = 0; c < d; ++c) {
      T acc = 0;
      for (int64_t j = 0; j < n; ++j) acc += pre[i * n + j] * x[j * d + c];
      o[c] = acc;
    }
  }
}
// dX (N,n,d) += pre_j du; dpre (N,n) = <du, X_j> (overwritten).
template <class T>
void collapse_backward(T* dX, T* dpre, const T* du, const T* X, const T* pre, int64_t N, int64_t n, int64_t d) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const T* g = du + i * d;
    for (int64_t j = 0; j < n; ++j) {
      const T* x = X + (i * n + j) * d;
      T* dx = dX + (i * n + j) * d;
      const T p = pre[i * n + j];
      T acc = 0;
      for (int64_t c = 0; c < d; ++c) {
        acc += g[c] * x[c];
        dx[c] += p * g[c];
      }
      dpre[i * n + j] = acc;
    }
  }
}

// Xo (N,n,d) = post_i y + sum_j comb_{j,i} X_j (overwritten; must not alias X); y (N,d).
template <class T>
void expand_forward(T* Xo, const T* y, const T* X, const T* post, const T* comb, int64_t N, int64_t n, int64_t d) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const T* cb = comb + i * n * n;
    const T* x = X + i * n * d;
    for (int64_t a = 0; a < n; ++a) {
      T* o = Xo + (i * n + a) * d;
      const T p = post[i * n + a];
      for (int64_t c = 0; c < d; ++c) {
        T acc = p * y[i * d + c];
        for (int64_t j = 0; j < n; ++j) acc += cb[j * n + a] * x[j * d + c];
        o[c] = acc;
      }
    }
  }
}
// From dXo (N,n,d): dy (N,d) = sum_i post_i dXo_i, dX (N,n,d) = sum_i comb_{j,i} dXo_i
// (both overwritten), dpost (N,n) = <dXo_i, y>, dcomb (N,n,n): (j,i) = <dXo_i, X_j>.
template <class T>
void expand_backward(T* dy, T* dX, T* dpost, T* dcomb, const T* dXo, const T* y, const T* X, const T* post,
                     const T* comb, int64_t N, int64_t n, int64_t d) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const T* g = dXo + i * n * d;
    const T* x = X + i * n * d;
    const T* cb = comb + i * n * n;
    for (int64_t c = 0; c < d; ++c) {
      T acc = 0;
      for (int64_t a = 0; a < n; ++a) acc += post[i * n + a] * g[a * d + c];
      dy[i * d + c] = acc;
    }
    for (int64_t a = 0; a < n; ++a) {
      T acc = 0;
      for (int64_t c = 0; c < d; ++c) acc += g[a * d + c] * y[i * d + c];
      dpost[i * n + a] = acc;
    }
    for (int64_t j = 0; j < n; ++j)
      for (int64_t a = 0; a < n; ++a) {
        T acc = 0;
        for (int64_t c = 0; c < d; ++c) acc += g[a * d + c] * x[j * d + c];
        dcomb[i * n * n + j * n + a] = acc;
      }
    for (int64_t j = 0; j < n; ++j) {
      T* dx = dX + (i * n + j) * d;
      for (int64_t c = 0; c < d; ++c) {
        T acc = 0;
        for (int64_t a = 0; a < n; ++a) acc += cb[j * n + a] * g[a * d + c];
        dx[c] = acc;
      }
    }
  }
}

// X (N,n,d) = the embedding e (N,d) repeated n times.
template <class T>
void repeat_streams(T* X, const T* e, int64_t N, int64_t n, int64_t d) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < n; ++j) std::copy_n(e + i * d, d, X + (i * n + j) * d);
}
// de (N,d) = sum_j dX_j (overwritten), j in order.
template <class T>
void repeat_streams_backward(T* de, const T* dX, int64_t N, int64_t n, int64_t d) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i)
    for (int64_t c = 0; c < d; ++c) {
      T acc = 0;
      for (int64_t j = 0; j < n; ++j) acc += dX[(i * n + j) * d + c];
      de[i * d + c] = acc;
    }
}

// ---------------------------------------------------------------- one connection
// Weights of one connection inside a flat buffer: fn (M, n d), base (M), scale (3 or 1).
template <class T>
struct HcWeights {
  const T *fn = nullptr, *base = nullptr, *scale = nullptr;
};
template <class T>
struct HcGrads {
  T *fn = nullptr, *base = nullptr, *scale = nullptr;
};

// The sub-block's (or head's) input u (N,d) from the streams X (N,n,d): mix,
// coefficients, collapse. s keeps what the backward needs.
template <class T>
void enter_forward(T* u, HcState<T>& s, const T* X, const HcWeights<T>& w, int64_t N, const HcShape& sh) {
  const int64_t M = sh.M(), K = sh.n * sh.d;
  s.mix.resize(N * M);
  s.rstd.resize(N);
  mix_forward(s.mix.data(), s.rstd.data(), X, w.fn, N, M, K, sh.rms_eps);
  coeffs_forward(s, w.base, w.scale, N, sh);
  collapse_forward(u, X, s.pre.data(), N, sh.n, sh.d);
}

// Work buffers of a connection's backward (grown, then reused).
template <class T>
struct HcWork {
  std::vector<T> dpre, dpost, dcomb, da, dmix;
};

// dX (N,n,d) += the gradient through the collapse and the coefficients, given du (N,d)
// = d loss / d u and, for a sub-block, work.dpost / work.dcomb filled by leave_backward.
template <class T>
void enter_backward(T* dX, const HcGrads<T>& g, const T* du, const T* X, const HcState<T>& s, const HcWeights<T>& w,
                    HcWork<T>& work, int64_t N, const HcShape& sh) {
  const int64_t n = sh.n, M = sh.M(), K = n * sh.d;
  work.dpre.resize(N * n);
  work.da.resize(N * M);
  work.dmix.resize(N * M);
  collapse_backward(dX, work.dpre.data(), du, X, s.pre.data(), N, n, sh.d);
  coeffs_backward(work.dmix.data(), g.base, g.scale, work.da.data(), work.dpre.data(),
                  sh.head ? static_cast<const T*>(nullptr) : work.dpost.data(),
                  sh.head ? static_cast<T*>(nullptr) : work.dcomb.data(), s, w.base, w.scale, N, sh);
  mix_backward(dX, g.fn, work.dmix.data(), X, w.fn, s.mix.data(), s.rstd.data(), N, M, K);
}

// The sub-block's output y (N,d) back into the streams: Xo = post y + comb^T X.
template <class T>
void leave_forward(T* Xo, const T* y, const T* X, const HcState<T>& s, int64_t N, const HcShape& sh) {
  expand_forward(Xo, y, X, s.post.data(), s.comb.data(), N, sh.n, sh.d);
}
// From dXo: dy (N,d) and the residual part of dX (N,n,d), both overwritten; work.dpost
// and work.dcomb for enter_backward.
template <class T>
void leave_backward(T* dy, T* dX, HcWork<T>& work, const T* dXo, const T* y, const T* X, const HcState<T>& s,
                    int64_t N, const HcShape& sh) {
  work.dpost.resize(N * sh.n);
  work.dcomb.resize(N * sh.n * sh.n);
  expand_backward(dy, dX, work.dpost.data(), work.dcomb.data(), dXo, y, X, s.post.data(), s.comb.data(), N, sh.n,
                  sh.d);
}

}  // namespace moetune::hc
