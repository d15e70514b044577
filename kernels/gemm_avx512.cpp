// AVX-512 micro-kernels. This file alone is compiled with -mavx512f -mfma
// (CMakeLists.txt); gemm.cpp calls into it only when CPUID reports AVX-512F.
// float: 12 x 32 tile (24 zmm accumulators, two B vectors, one broadcast), each lane
// the per-element fma chain of kernels/gemm.hpp. double: the portable loops, which
// the compiler vectorises here.
#include <immintrin.h>

#include <algorithm>

// GCC 12 warns that the _mm512_undefined_ps() inside its own shuffle intrinsics "may be
// used uninitialized" (a false positive in the header, not in this code).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "kernels/gemm_ukernel.hpp"

namespace moetune::kernels::detail {
namespace {

constexpr int kMr = 12, kNr = 32;

// The tile: acc(i,j) = fma chain over k < kc of a(i, k) * Bp[k*kNr + j], then the
// store. `a` reads A(i, k) of the tile's rows, from a packed panel or from A itself.
template <class AAt, class APrefetch>
inline __attribute__((always_inline)) void tile_f32(int64_t kc, AAt a, APrefetch a_prefetch, const float* Bp, float* C,
                                                    int64_t ldc, int m, int n, bool overwrite) {
  __m512 c0[kMr], c1[kMr];
  // The C tile's lines, on their way while the K loop runs (in a training step C is
  // usually out of cache: a weight gradient, an input gradient, a fresh output).
  for (int i = 0; i < m; ++i) {
    _mm_prefetch(reinterpret_cast<const char*>(C + i * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(C + i * ldc + n - 1), _MM_HINT_T0);
  }
#pragma GCC unroll 12
  for (int i = 0; i < kMr; ++i) c0[i] = c1[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    if ((k & 15) == 0) a_prefetch(k);
    const __m512 b0 = _mm512_loadu_ps(Bp + k * kNr);
    const __m512 b1 = _mm512_loadu_ps(Bp + k * kNr + 16);
#pragma GCC unroll 12
    for (int i = 0; i < kMr; ++i) {
      const __m512 ai = _mm512_set1_ps(a(i, k));
      c0[i] = _mm512_fmadd_ps(ai, b0, c0[i]);
      c1[i] = _mm512_fmadd_ps(ai, b1, c1[i]);
    }
  }
  // Edge tiles (m < kMr or n < kNr) store with masks, lane j of a row only for j < n.
  const __mmask16 k0 = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u);
  const __mmask16 k1 = n >= 32 ? __mmask16(0xFFFF) : n <= 16 ? __mmask16(0) : __mmask16((1u << (n - 16)) - 1u);
#pragma GCC unroll 12
  for (int i = 0; i < kMr; ++i) {
    if (i >= m) break;
    float* c = C + i * ldc;
    if (overwrite) {
      _mm512_mask_storeu_ps(c, k0, c0[i]);
      _mm512_mask_storeu_ps(c + 16, k1, c1[i]);
    } else {
      _mm512_mask_storeu_ps(c, k0, _mm512_add_ps(_mm512_maskz_loadu_ps(k0, c), c0[i]));
      _mm512_mask_storeu_ps(c + 16, k1, _mm512_add_ps(_mm512_maskz_loadu_ps(k1, c + 16), c1[i]));
    }
  }
}

void ukernel_f32(int64_t kc, const float* Ap, const float* Bp, float* C, int64_t ldc, int m, int n,
                 bool overwrite) {
  tile_f32(kc, [Ap](int i, int64_t k) { return Ap[k * kMr + i]; }, [](int64_t) {}, Bp, C, ldc, m, n, overwrite);
}

// UkernelRows (gemm_ukernel.hpp): A's rows read where they lie, k contiguous; the rows
// past m repeat row m - 1 (computed, never stored).
void ukernel_rows_f32(int64_t kc, const float* A, int64_t lda, const float* Bp, float* C, int64_t ldc, int m, int n,
                      bool overwrite) {
  const float* r[kMr];
#pragma GCC unroll 12
  for (int i = 0; i < kMr; ++i) r[i] = A + std::min(i, m - 1) * lda;
  tile_f32(
      kc, [&r](int i, int64_t k) { return r[i][k]; },
      [&r](int64_t k) {
#pragma GCC unroll 12
        for (int i = 0; i < kMr; ++i) _mm_prefetch(reinterpret_cast<const char*>(r[i] + k + 64), _MM_HINT_T0);
      },
      Bp, C, ldc, m, n, overwrite);
}

// In-register transpose of 16 x 16 floats: v[i] (row i) becomes column i.
inline void transpose16(__m512 v[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(v[i], v[i + 1]);      // per 128-bit lane: a0 b0 a1 b1
    t[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);  //                   a2 b2 a3 b3
  }
  for (int i = 0; i < 16; i += 4) {
    v[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);      // a0 b0 c0 d0
    v[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);  // a1 b1 c1 d1
    v[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    v[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  // v[4q + c] holds rows 4q..4q+3 of columns c, c+4, c+8, c+12 (one per 128-bit lane).
  for (int c = 0; c < 4; ++c) {
    const __m512 lo02 = _mm512_shuffle_f32x4(v[c], v[4 + c], 0x88);   // rows 0-7 of columns c, c+8
    const __m512 hi02 = _mm512_shuffle_f32x4(v[8 + c], v[12 + c], 0x88);
    const __m512 lo13 = _mm512_shuffle_f32x4(v[c], v[4 + c], 0xDD);   // rows 0-7 of columns c+4, c+12
    const __m512 hi13 = _mm512_shuffle_f32x4(v[8 + c], v[12 + c], 0xDD);
    t[c] = _mm512_shuffle_f32x4(lo02, hi02, 0x88);
    t[c + 8] = _mm512_shuffle_f32x4(lo02, hi02, 0xDD);
    t[c + 4] = _mm512_shuffle_f32x4(lo13, hi13, 0x88);
    t[c + 12] = _mm512_shuffle_f32x4(lo13, hi13, 0xDD);
  }
  for (int i = 0; i < 16; ++i) v[i] = t[i];
}

// PackRows (gemm_ukernel.hpp) by 16 x 16 blocks: masked loads for the k tail and the
// missing rows, masked stores for the lanes of a panel narrower than 16.
void pack_rows_f32(float* dst, const float* src, int64_t ld, int rows, int64_t kc, int w) {
  for (int r0 = 0; r0 < w; r0 += 16) {
    const int g = std::min(16, w - r0);
    const __mmask16 lanes = __mmask16((1u << g) - 1u);
    for (int64_t k0 = 0; k0 < kc; k0 += 16) {
      const int kk = int(std::min<int64_t>(16, kc - k0));
      const __mmask16 kmask = __mmask16((1u << kk) - 1u);
      __m512 v[16];
      for (int i = 0; i < 16; ++i) {
        v[i] = _mm512_setzero_ps();
        if (i >= g || r0 + i >= rows) continue;
        const float* row = src + (r0 + i) * ld + k0;
        _mm_prefetch(reinterpret_cast<const char*>(row + 64), _MM_HINT_T0);  // 4 lines ahead (memory, not cache)
        v[i] = _mm512_maskz_loadu_ps(kmask, row);
      }
      transpose16(v);
      for (int k = 0; k < kk; ++k) _mm512_mask_storeu_ps(dst + (k0 + k) * w + r0, lanes, v[k]);
    }
  }
}

// PackCopy (gemm_ukernel.hpp) for panels of w <= 32 (kMr, kNr): each row of kc as up to
// two masked vectors (the lanes past `cols` load as 0, the stores stop at w).
void pack_copy_f32(float* dst, const float* src, int64_t ld, int cols, int64_t kc, int w) {
  const auto first = [](int n) { return __mmask16(n >= 16 ? 0xFFFFu : (1u << std::max(n, 0)) - 1u); };
  const __mmask16 l0 = first(cols), s0 = first(w), l1 = first(cols - 16), s1 = first(w - 16);
  if (w <= 16) {
    for (int64_t k = 0; k < kc; ++k) _mm512_mask_storeu_ps(dst + k * w, s0, _mm512_maskz_loadu_ps(l0, src + k * ld));
    return;
  }
  for (int64_t k = 0; k < kc; ++k) {
    const float* r = src + k * ld;
    _mm_prefetch(reinterpret_cast<const char*>(r + 8 * ld), _MM_HINT_T0);
    float* d = dst + k * w;
    _mm512_mask_storeu_ps(d, s0, _mm512_maskz_loadu_ps(l0, r));
    _mm512_mask_storeu_ps(d + 16, s1, _mm512_maskz_loadu_ps(l1, r + 16));
  }
}

// nt with few rows (M <= 32): B, the (N, K) weights, is read in place instead of
// packed (with 32 rows the transposing pack of the weights was a quarter of the call).
// SIMD lanes run over rows: A's rows are packed k-major, 32 wide (Ap[k*32 + i], zero
// past M); each of 12 columns broadcasts B(j, k) straight from its row of B; one
// accumulator vector per (16-row half, column). Every lane still runs the per-element
// chain of kernels/gemm.hpp (acc = fma(a_ik, b_jk, acc) over a K block in order, then
// c = acc or c + acc), so the bits equal the packed path's.
constexpr int kSmallCols = 12;
template <int H>
void nt_small_block(int64_t kc, const float* Ap, const float* const* brow, float* out) {
  __m512 acc[H][kSmallCols];
#pragma GCC unroll 12
  for (int c = 0; c < kSmallCols; ++c)
    for (int h = 0; h < H; ++h) acc[h][c] = _mm512_setzero_ps();
  const float *b0 = brow[0], *b1 = brow[1], *b2 = brow[2], *b3 = brow[3], *b4 = brow[4], *b5 = brow[5];
  const float *b6 = brow[6], *b7 = brow[7], *b8 = brow[8], *b9 = brow[9], *b10 = brow[10], *b11 = brow[11];
  for (int64_t k = 0; k < kc; ++k) {
    if ((k & 15) == 0)  // each row of B 2 lines ahead (12 streams: more than the hardware follows)
      for (int c = 0; c < kSmallCols; ++c) _mm_prefetch(reinterpret_cast<const char*>(brow[c] + k + 32), _MM_HINT_T0);
    const __m512 a0 = _mm512_loadu_ps(Ap + k * 32);
    const __m512 a1 = H == 2 ? _mm512_loadu_ps(Ap + k * 32 + 16) : a0;
    const float bk[kSmallCols] = {b0[k], b1[k], b2[k], b3[k], b4[k], b5[k], b6[k], b7[k], b8[k], b9[k], b10[k], b11[k]};
#pragma GCC unroll 12
    for (int c = 0; c < kSmallCols; ++c) {
      const __m512 b = _mm512_set1_ps(bk[c]);
      acc[0][c] = _mm512_fmadd_ps(a0, b, acc[0][c]);
      if (H == 2) acc[H - 1][c] = _mm512_fmadd_ps(a1, b, acc[H - 1][c]);
    }
  }
  for (int c = 0; c < kSmallCols; ++c)
    for (int h = 0; h < H; ++h) _mm512_storeu_ps(out + c * 32 + h * 16, acc[h][c]);
}

void nt_small_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                  int64_t ldc, bool accumulate, float* Ap) {
  for (int64_t k0 = 0; k0 < K; k0 += kGemmKc) {
    const int64_t kc = std::min<int64_t>(kGemmKc, K - k0);
    pack_rows_f32(Ap + k0 * 32, A + k0, lda, int(M), kc, 32);
  }
  alignas(64) float out[kSmallCols * 32];
  for (int64_t j0 = 0; j0 < N; j0 += kSmallCols) {
    const int nc = int(std::min<int64_t>(kSmallCols, N - j0));
    for (int64_t k0 = 0; k0 < K; k0 += kGemmKc) {
      const int64_t kc = std::min<int64_t>(kGemmKc, K - k0);
      const float* brow[kSmallCols];
      for (int c = 0; c < kSmallCols; ++c) brow[c] = B + (j0 + std::min(c, nc - 1)) * ldb + k0;  // past N: a copy
      if (M <= 16)
        nt_small_block<1>(kc, Ap + k0 * 32, brow, out);
      else
        nt_small_block<2>(kc, Ap + k0 * 32, brow, out);
      const bool overwrite = !accumulate && k0 == 0;
      for (int64_t i = 0; i < M; ++i) {
        float* c = C + i * ldc + j0;
        if (overwrite)
          for (int j = 0; j < nc; ++j) c[j] = out[j * 32 + i];
        else
          for (int j = 0; j < nc; ++j) c[j] = c[j] + out[j * 32 + i];
      }
    }
  }
}

}  // namespace

UkernelSet avx512_kernels() {
  UkernelSet s;
  s.f32 = {kMr, kNr, &ukernel_f32, &pack_rows_f32, &pack_copy_f32, &nt_small_f32, 32, &ukernel_rows_f32};
  s.f64 = {8, 16, &ukernel_generic<double, 8, 16>};
  return s;
}

}  // namespace moetune::kernels::detail
