// AVX2 + FMA micro-kernels. This file alone is compiled with -mavx2 -mfma
// (CMakeLists.txt); gemm.cpp calls into it only when CPUID reports AVX2 and FMA.
// float: 6 x 16 tile (12 ymm accumulators, two B vectors, one broadcast), each lane
// the per-element fma chain of kernels/gemm.hpp. double: the portable loops, which
// the compiler vectorises here.
#include <immintrin.h>

#include "kernels/gemm_ukernel.hpp"

namespace moetune::kernels::detail {
namespace {

constexpr int kMr = 6, kNr = 16;

void ukernel_f32(int64_t kc, const float* Ap, const float* Bp, float* C, int64_t ldc, int m, int n,
                 bool overwrite) {
  __m256 c0[kMr], c1[kMr];
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
  if (m == kMr && n == kNr) {
#pragma GCC unroll 6
    for (int i = 0; i < kMr; ++i) {
      float* c = C + i * ldc;
      if (overwrite) {
        _mm256_storeu_ps(c, c0[i]);
        _mm256_storeu_ps(c + 8, c1[i]);
      } else {
        _mm256_storeu_ps(c, _mm256_add_ps(_mm256_loadu_ps(c), c0[i]));
        _mm256_storeu_ps(c + 8, _mm256_add_ps(_mm256_loadu_ps(c + 8), c1[i]));
      }
    }
    return;
  }
  alignas(32) float acc[kMr * kNr];
  for (int i = 0; i < kMr; ++i) {
    _mm256_store_ps(acc + i * kNr, c0[i]);
    _mm256_store_ps(acc + i * kNr + 8, c1[i]);
  }
  store_tile<float, kMr, kNr>(acc, C, ldc, m, n, overwrite);
}

}  // namespace

UkernelSet avx2_kernels() {
  UkernelSet s;
  s.f32 = {kMr, kNr, &ukernel_f32};
  s.f64 = {4, 8, &ukernel_generic<double, 4, 8>};
  return s;
}

}  // namespace moetune::kernels::detail
