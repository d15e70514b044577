// AVX-512 micro-kernels. This file alone is compiled with -mavx512f -mfma
// (CMakeLists.txt); gemm.cpp calls into it only when CPUID reports AVX-512F.
// float: 12 x 32 tile (24 zmm accumulators, two B vectors, one broadcast), each lane
// the per-element fma chain of kernels/gemm.hpp. double: the portable loops, which
// the compiler vectorises here.
#include <immintrin.h>

#include "kernels/gemm_ukernel.hpp"

namespace moetune::kernels::detail {
namespace {

constexpr int kMr = 12, kNr = 32;

void ukernel_f32(int64_t kc, const float* Ap, const float* Bp, float* C, int64_t ldc, int m, int n,
                 bool overwrite) {
  __m512 c0[kMr], c1[kMr];
#pragma GCC unroll 12
  for (int i = 0; i < kMr; ++i) c0[i] = c1[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_loadu_ps(Bp + k * kNr);
    const __m512 b1 = _mm512_loadu_ps(Bp + k * kNr + 16);
    const float* a = Ap + k * kMr;
#pragma GCC unroll 12
    for (int i = 0; i < kMr; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i]);
      c0[i] = _mm512_fmadd_ps(ai, b0, c0[i]);
      c1[i] = _mm512_fmadd_ps(ai, b1, c1[i]);
    }
  }
  if (m == kMr && n == kNr) {
#pragma GCC unroll 12
    for (int i = 0; i < kMr; ++i) {
      float* c = C + i * ldc;
      if (overwrite) {
        _mm512_storeu_ps(c, c0[i]);
        _mm512_storeu_ps(c + 16, c1[i]);
      } else {
        _mm512_storeu_ps(c, _mm512_add_ps(_mm512_loadu_ps(c), c0[i]));
        _mm512_storeu_ps(c + 16, _mm512_add_ps(_mm512_loadu_ps(c + 16), c1[i]));
      }
    }
    return;
  }
  alignas(64) float acc[kMr * kNr];
  for (int i = 0; i < kMr; ++i) {
    _mm512_store_ps(acc + i * kNr, c0[i]);
    _mm512_store_ps(acc + i * kNr + 16, c1[i]);
  }
  store_tile<float, kMr, kNr>(acc, C, ldc, m, n, overwrite);
}

}  // namespace

UkernelSet avx512_kernels() {
  UkernelSet s;
  s.f32 = {kMr, kNr, &ukernel_f32};
  s.f64 = {8, 16, &ukernel_generic<double, 8, 16>};
  return s;
}

}  // namespace moetune::kernels::detail
