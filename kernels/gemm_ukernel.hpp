// Internal to kernels/: the micro-kernel interface shared by kernels/gemm.cpp (packing,
// tiling, dispatch) and the per-ISA translation units (gemm_avx2.cpp, gemm_avx512.cpp),
// which are compiled with their own -m flags and only ever called after a CPUID check.
#pragma once
#include <cmath>
#include <cstdint>

#include "kernels/gemm.hpp"

namespace moetune::kernels::detail {

// One MR x NR tile: acc(i,j) = fma chain over k < kc of Ap[k*MR + i] * Bp[k*NR + j]
// starting from 0; then C(i,j) = acc (overwrite) or C(i,j) + acc, for i < m, j < n.
// Ap, Bp are packed panels (zero-padded past m, n). C has leading dimension ldc.
template <class T>
using Ukernel = void (*)(int64_t kc, const T* Ap, const T* Bp, T* C, int64_t ldc, int m, int n, bool overwrite);

// The transposing pack both operands need (A stored (M, K), B stored (N, K)): for a
// panel of `rows` <= w source rows of kc contiguous elements (leading dimension ld),
// dst[k*w + r] = src[r*ld + k] for r < rows, and 0 for rows <= r < w. Pure data
// movement: an ISA's SIMD version changes no bit, only the speed.
template <class T>
using PackRows = void (*)(T* dst, const T* src, int64_t ld, int rows, int64_t kc, int w);

// The plain pack (A stored (K, M), B stored (K, N)): for kc rows of `cols` <= w
// contiguous elements (leading dimension ld), dst[k*w + j] = src[k*ld + j] for j < cols,
// and 0 for cols <= j < w. Pure data movement, like PackRows.
template <class T>
using PackCopy = void (*)(T* dst, const T* src, int64_t ld, int cols, int64_t kc, int w);

// The whole of gemm_nt for M <= small_m rows (UkernelDesc) without packing B: C (M,N)
// (+)= A (M,K) B (N,K)^T with the same per-element arithmetic as the tiled path
// (bit-identical); Ap is scratch for kSmallM * K values.
inline constexpr int64_t kSmallM = 32;  // the largest small_m of any ISA
template <class T>
using NtSmall = void (*)(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                         int64_t ldc, bool accumulate, T* Ap);

// Ukernel with A read in place instead of from a packed panel: A(i, k) = A[i*lda + k]
// for the tile's rows (A stored (M, K) as in nt and nn), the same fma chain per
// element, so the same bits as packing the rows and calling Ukernel. m >= 1.
template <class T>
using UkernelRows = void (*)(int64_t kc, const T* A, int64_t lda, const T* Bp, T* C, int64_t ldc, int m, int n,
                             bool overwrite);

template <class T>
struct UkernelDesc {
  int mr = 0, nr = 0;
  Ukernel<T> fn = nullptr;
  PackRows<T> pack_rows = nullptr;  // null: gemm.cpp's scalar loops
  PackCopy<T> pack_copy = nullptr;  // null: gemm.cpp's scalar loops
  NtSmall<T> nt_small = nullptr;    // null: the tiled path for every M
  int64_t small_m = 0;              // nt_small takes M <= small_m (<= kSmallM)
  UkernelRows<T> fn_rows = nullptr;  // null: nt and nn pack A's rows like tn's
};

struct UkernelSet {
  UkernelDesc<float> f32;
  UkernelDesc<double> f64;
};

// The tile store shared by every kernel: acc is a row-major MR x NR array.
template <class T, int MR, int NR>
inline void store_tile(const T* acc, T* C, int64_t ldc, int m, int n, bool overwrite) {
  for (int i = 0; i < m; ++i) {
    T* c = C + i * ldc;
    const T* a = acc + i * NR;
    if (overwrite)
      for (int j = 0; j < n; ++j) c[j] = a[j];
    else
      for (int j = 0; j < n; ++j) c[j] = c[j] + a[j];
  }
}

// The portable kernel: plain loops over std::fma. Compiled with FMA enabled it
// vectorises; without (the generic fallback) std::fma is glibc's correctly rounded fma.
template <class T, int MR, int NR>
void ukernel_generic(int64_t kc, const T* Ap, const T* Bp, T* C, int64_t ldc, int m, int n, bool overwrite) {
  T acc[MR * NR];
  for (int x = 0; x < MR * NR; ++x) acc[x] = T(0);
  for (int64_t k = 0; k < kc; ++k) {
    const T* a = Ap + k * MR;
    const T* b = Bp + k * NR;
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i * NR + j] = std::fma(a[i], b[j], acc[i * NR + j]);
  }
  store_tile<T, MR, NR>(acc, C, ldc, m, n, overwrite);
}

UkernelSet generic_kernels();
UkernelSet avx2_kernels();    // defined in gemm_avx2.cpp (compiled with -mavx2 -mfma)
UkernelSet avx512_kernels();  // defined in gemm_avx512.cpp (compiled with -mavx512f -mfma)

}  // namespace moetune::kernels::detail
