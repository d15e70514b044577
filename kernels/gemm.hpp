// moetune's own GEMM: the three matrix products of training, batch-invariant and
// thread-invariant by construction (MODEL.md section 13), with micro-kernels picked at
// run time from CPUID so that the default portable build runs AVX2 or AVX-512 code.
//
//   gemm_nt: C (M,N) (+)= A (M,K) · B (N,K)^T      forward of a linear layer
//   gemm_nn: C (M,N) (+)= A (M,K) · B (K,N)        input gradient
//   gemm_tn: C (M,N) (+)= A (K,M)^T · B (K,N)      weight gradient (K = tokens)
//
// All matrices are row-major with leading dimensions lda, ldb, ldc (>= their row
// length). `accumulate` = false overwrites C, true adds to it.
//
// The order of arithmetic, which is the whole point. For every output element
// c = C(i,j) the reduction dimension is cut into blocks [0,KC), [KC,2KC), ... with the
// fixed kGemmKc below, never chosen from M, N, K or the thread count. Within a block,
// acc = 0 and then acc = fma(a_ik, b_kj, acc) for k in increasing order (one fused
// multiply-add per step, exactly rounded); after the block, c = c + acc (overwrite mode:
// the first block stores c = acc). Threads split the work over output tiles only, so
// no element is ever reduced by two threads. Consequences:
//   - batch invariance: row i of C depends only on row i of A (for nt/nn) and on B, not
//     on M, on where the row sits in A, or on the tile sizes;
//   - thread invariance: any OMP_NUM_THREADS gives the same bits;
//   - ISA invariance: the AVX-512, AVX2 and portable kernels differ only in how many
//     elements they compute at once (each SIMD lane runs the per-element chain above,
//     and the portable kernel uses std::fma), so their results are bit-identical;
//     tests/test_gemm.cpp checks it for every kernel this CPU can run.
// A zero-padded edge tile adds fma(0, b, acc) = acc, so edges change no bit either.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace moetune::kernels {

// The reduction block. Changing it changes results (bitwise, not in accuracy).
inline constexpr int64_t kGemmKc = 256;

enum class Isa { generic, avx2, avx512 };
// "generic", "avx2" (AVX2 + FMA), "avx512" (AVX-512F).
const char* isa_name(Isa isa);
// Parses an ISA name; throws moetune::Error naming `where` when unknown.
Isa parse_isa(const std::string& name, const std::string& where);
// Whether this CPU (and OS) can run the kernels of `isa`.
bool isa_supported(Isa isa);
// The ISAs this CPU can run, best last.
std::vector<Isa> supported_isas();
// The kernels in use: the best this CPU supports, unless the environment variable
// MOETUNE_GEMM_ISA names another (an unsupported or unknown name is an error naming
// the variable). Chosen once, at first use.
Isa gemm_isa();
// For tests and benchmarks: switch kernels (throws moetune::Error if unsupported).
void set_gemm_isa(Isa isa);

template <class T>
void gemm_nt(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
             bool accumulate);
template <class T>
void gemm_nn(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
             bool accumulate);
template <class T>
void gemm_tn(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
             bool accumulate);

// The micro-kernel and packs of the kernels in use, for callers that pack their operands
// themselves and run many small products over them without a GEMM call each (the
// attention tiles of moe/attention.cpp). The arithmetic is the GEMM's:
//   tile(kc, Ap, Bp, C, ldc, m, n, overwrite): for i < m, j < n, acc = fma chain over
//     k < kc (in order, from 0) of Ap[k*mr + i] * Bp[k*nr + j]; then C(i,j) = acc
//     (overwrite) or C(i,j) + acc. Ap and Bp are packed panels, zero past m and n.
//   pack_rows(dst, src, ld, rows, kc, w): dst[k*w + r] = src[r*ld + k] for r < rows
//     (rows <= w source rows of kc contiguous values), 0 for rows <= r < w.
//   pack_copy(dst, src, ld, cols, kc, w): dst[k*w + j] = src[k*ld + j] for j < cols, 0
//     for cols <= j < w.
// A product that reduces over more than kGemmKc values must call tile once per block
// of kGemmKc (overwrite on the first block only, as gemm_* do) to give gemm_*'s bits.
// Valid for the kernels of the moment (set_gemm_isa changes them).
template <class T>
struct PanelKernel {
  int mr = 0, nr = 0;
  void (*tile)(int64_t kc, const T* Ap, const T* Bp, T* C, int64_t ldc, int m, int n, bool overwrite) = nullptr;
  void (*pack_rows)(T* dst, const T* src, int64_t ld, int rows, int64_t kc, int w) = nullptr;
  void (*pack_copy)(T* dst, const T* src, int64_t ld, int cols, int64_t kc, int w) = nullptr;
};
template <class T>
PanelKernel<T> panel_kernel();

// Grows the calling thread's packing buffers to hold `elements` values of each operand
// (a product needs at most round_up(M, mr) * K of A, one row block of it or the few rows
// of the no-pack nt path, and round_up(N, nr) * K of B). For callers
// that run GEMMs on several threads at once (experts_forward), so that which thread
// happens to take the largest product never decides whether a step allocates.
template <class T>
void gemm_reserve(int64_t elements);

// The naive triple loop with exactly the arithmetic order described above: the
// reference the tests compare the kernels with, bit for bit.
template <class T>
void gemm_reference(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                    int64_t ldb, T* C, int64_t ldc, bool accumulate);

}  // namespace moetune::kernels
