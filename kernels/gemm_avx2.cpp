// AVX2 + FMA micro-kernels. This file alone is compiled with -mavx2 -mfma
// (CMakeLists.txt); gemm.cpp calls into it only when CPUID reports AVX2 and FMA.
// float: 6 x 16 tile (12 ymm accumulators, two B vectors, one broadcast), each lane
// the per-element fma chain of kernels/gemm.hpp. double: the portable loops, which
// the compiler vectorises here.
#include <immintrin.h>

#include <algorithm>

#include "kernels/gemm_ukernel.hpp"

namespace moetune::kernels::detail {
namespace {

constexpr int kMr = 6, kNr = 16;

// AVX2 lane mask of the first n lanes (none for n <= 0, all 8 for n >= 8).
inline __m256i first_lanes(int n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx);
}

void ukernel_f32(int64_t kc, const float* Ap, const float* Bp, float* C, int64_t ldc, int m, int n,
                 bool overwrite) {
  __m256 c0[kMr], c1[kMr];
  // The C tile's lines, on their way while the K loop runs (gemm_avx512.cpp).
  for (int i = 0; i < m; ++i) {
    _mm_prefetch(reinterpret_cast<const char*>(C + i * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(C + i * ldc + n - 1), _MM_HINT_T0);
  }
#pragma GCC unroll 6
  for (int i = 0; i < kMr; ++i) c0[i] = c1[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(Bp + k * kNr);
    const __m256 b1 = _mm256_loadu_ps(Bp + k * kNr + 8);
    const float* a = Ap + k * kMr;
#pragma GCC unroll 6
    for (int i = 0; i < kMr; ++i) {
      const __m256 ai = _mm256_broadcast_ss(a + i);
      c0[i] = _mm256_fmadd_ps(ai, b0, c0[i]);
      c1[i] = _mm256_fmadd_ps(ai, b1, c1[i]);
    }
  }
  // Edge tiles (m < kMr or n < kNr) store with masks, lane j of a row only for j < n.
  const __m256i k0 = first_lanes(n), k1 = first_lanes(n - 8);
#pragma GCC unroll 6
  for (int i = 0; i < kMr; ++i) {
    if (i >= m) break;
    float* c = C + i * ldc;
    if (overwrite) {
      _mm256_maskstore_ps(c, k0, c0[i]);
      _mm256_maskstore_ps(c + 8, k1, c1[i]);
    } else {
      _mm256_maskstore_ps(c, k0, _mm256_add_ps(_mm256_maskload_ps(c, k0), c0[i]));
      _mm256_maskstore_ps(c + 8, k1, _mm256_add_ps(_mm256_maskload_ps(c + 8, k1), c1[i]));
    }
  }
}

// In-register transpose of 8 x 8 floats: v[i] (row i) becomes column i.
inline void transpose8(__m256 v[8]) {
  __m256 t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(v[i], v[i + 1]);      // per 128-bit lane: a0 b0 a1 b1
    t[i + 1] = _mm256_unpackhi_ps(v[i], v[i + 1]);  //                   a2 b2 a3 b3
  }
  __m256 s[8];
  for (int i = 0; i < 8; i += 4) {
    s[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);      // a0 b0 c0 d0 | a4 b4 c4 d4
    s[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);  // a1 b1 c1 d1 | a5 ...
    s[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    s[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    v[c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x20);      // rows 0-7 of column c
    v[c + 4] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x31);  // rows 0-7 of column c + 4
  }
}

// PackRows (gemm_ukernel.hpp) by 8 x 8 blocks: masked loads for the k tail and the
// missing rows, masked stores for the lanes of a panel narrower than 8.
void pack_rows_f32(float* dst, const float* src, int64_t ld, int rows, int64_t kc, int w) {
  for (int r0 = 0; r0 < w; r0 += 8) {
    const int g = w - r0 < 8 ? w - r0 : 8;
    const __m256i lanes = first_lanes(g);
    for (int64_t k0 = 0; k0 < kc; k0 += 8) {
      const int kk = kc - k0 < 8 ? int(kc - k0) : 8;
      const __m256i kmask = first_lanes(kk);
      __m256 v[8];
      for (int i = 0; i < 8; ++i) {
        v[i] = _mm256_setzero_ps();
        if (i >= g || r0 + i >= rows) continue;
        const float* row = src + (r0 + i) * ld + k0;
        _mm_prefetch(reinterpret_cast<const char*>(row + 64), _MM_HINT_T0);  // 4 lines ahead (memory, not cache)
        v[i] = _mm256_maskload_ps(row, kmask);
      }
      transpose8(v);
      for (int k = 0; k < kk; ++k) _mm256_maskstore_ps(dst + (k0 + k) * w + r0, lanes, v[k]);
    }
  }
}

// PackCopy (gemm_ukernel.hpp) for panels of w <= 16 (kMr, kNr): each row of kc as up to
// two masked vectors of 8 (the lanes past `cols` load as 0, the stores stop at w).
void pack_copy_f32(float* dst, const float* src, int64_t ld, int cols, int64_t kc, int w) {
  const __m256i l0 = first_lanes(cols), s0 = first_lanes(w), l1 = first_lanes(cols - 8), s1 = first_lanes(w - 8);
  if (w <= 8) {
    for (int64_t k = 0; k < kc; ++k) _mm256_maskstore_ps(dst + k * w, s0, _mm256_maskload_ps(src + k * ld, l0));
    return;
  }
  for (int64_t k = 0; k < kc; ++k) {
    const float* r = src + k * ld;
    _mm_prefetch(reinterpret_cast<const char*>(r + 8 * ld), _MM_HINT_T0);
    float* d = dst + k * w;
    _mm256_maskstore_ps(d, s0, _mm256_maskload_ps(r, l0));
    _mm256_maskstore_ps(d + 8, s1, _mm256_maskload_ps(r + 8, l1));
  }
}

// nt with few rows (M <= 16), as gemm_avx512.cpp's: lanes over the rows (two halves of
// 8), A packed k-major 16 wide, 6 columns broadcast from their rows of B in place; the
// per-element chain of kernels/gemm.hpp in every lane, so the tiled path's bits.
constexpr int kSmallCols = 6;
template <int H>
void nt_small_block(int64_t kc, const float* Ap, const float* const* brow, float* out) {
  __m256 acc[H][kSmallCols];
  for (int c = 0; c < kSmallCols; ++c)
    for (int h = 0; h < H; ++h) acc[h][c] = _mm256_setzero_ps();
  const float *b0 = brow[0], *b1 = brow[1], *b2 = brow[2], *b3 = brow[3], *b4 = brow[4], *b5 = brow[5];
  for (int64_t k = 0; k < kc; ++k) {
    if ((k & 15) == 0)  // each row of B 2 lines ahead (as gemm_avx512.cpp)
      for (int c = 0; c < kSmallCols; ++c) _mm_prefetch(reinterpret_cast<const char*>(brow[c] + k + 32), _MM_HINT_T0);
    const __m256 a0 = _mm256_loadu_ps(Ap + k * 16);
    const __m256 a1 = H == 2 ? _mm256_loadu_ps(Ap + k * 16 + 8) : a0;
    const float bk[kSmallCols] = {b0[k], b1[k], b2[k], b3[k], b4[k], b5[k]};
#pragma GCC unroll 6
    for (int c = 0; c < kSmallCols; ++c) {
      const __m256 b = _mm256_set1_ps(bk[c]);
      acc[0][c] = _mm256_fmadd_ps(a0, b, acc[0][c]);
      if (H == 2) acc[H - 1][c] = _mm256_fmadd_ps(a1, b, acc[H - 1][c]);
    }
  }
  for (int c = 0; c < kSmallCols; ++c)
    for (int h = 0; h < H; ++h) _mm256_storeu_ps(out + c * 16 + h * 8, acc[h][c]);
}

void nt_small_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                  int64_t ldc, bool accumulate, float* Ap) {
  for (int64_t k0 = 0; k0 < K; k0 += kGemmKc) {
    const int64_t kc = std::min<int64_t>(kGemmKc, K - k0);
    pack_rows_f32(Ap + k0 * 16, A + k0, lda, int(M), kc, 16);
  }
  alignas(32) float out[kSmallCols * 16];
  for (int64_t j0 = 0; j0 < N; j0 += kSmallCols) {
    const int nc = int(std::min<int64_t>(kSmallCols, N - j0));
    for (int64_t k0 = 0; k0 < K; k0 += kGemmKc) {
      const int64_t kc = std::min<int64_t>(kGemmKc, K - k0);
      const float* brow[kSmallCols];
      for (int c = 0; c < kSmallCols; ++c) brow[c] = B + (j0 + std::min(c, nc - 1)) * ldb + k0;  // past N: a copy
      if (M <= 8)
        nt_small_block<1>(kc, Ap + k0 * 16, brow, out);
      else
        nt_small_block<2>(kc, Ap + k0 * 16, brow, out);
      const bool overwrite = !accumulate && k0 == 0;
      for (int64_t i = 0; i < M; ++i) {
        float* c = C + i * ldc + j0;
        if (overwrite)
          for (int j = 0; j < nc; ++j) c[j] = out[j * 16 + i];
        else
          for (int j = 0; j < nc; ++j) c[j] = c[j] + out[j * 16 + i];
      }
    }
  }
}

}  // namespace

UkernelSet avx2_kernels() {
  UkernelSet s;
  s.f32 = {kMr, kNr, &ukernel_f32, &pack_rows_f32, &pack_copy_f32, &nt_small_f32, 16};
  s.f64 = {4, 8, &ukernel_generic<double, 4, 8>};
  return s;
}

}  // namespace moetune::kernels::detail
