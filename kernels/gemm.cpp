// Dispatch, packing and tiling of moetune's GEMM (see kernels/gemm.hpp for the
// arithmetic order it guarantees). Goto/BLIS structure: both operands are packed once
// per call into MR-row and NR-column panels (except A stored (M, K) under the AVX-512
// kernels, which read its rows in place), K block by K block, into buffers of the
// calling thread that are reused from call to call (no allocation in the steady
// state); the output is cut into MC x NC macro tiles, one OpenMP task each, which walk
// the reduction dimension in the fixed kGemmKc blocks and run the micro-kernel over
// MR x NR sub-tiles. MC and NC only decide who computes an element, never how, so they
// adapt to the shape and the thread count.
#include "kernels/gemm.hpp"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>

#include "kernels/gemm_ukernel.hpp"
#include "kernels/parallel.hpp"
#include "moe/error.hpp"

namespace moetune::kernels {
namespace detail {

UkernelSet generic_kernels() {
  UkernelSet s;
  s.f32 = {4, 8, &ukernel_generic<float, 4, 8>};
  s.f64 = {4, 8, &ukernel_generic<double, 4, 8>};
  return s;
}

}  // namespace detail

namespace {

using detail::UkernelDesc;
using detail::UkernelSet;

UkernelSet kernels_of(Isa isa) {
#if MOETUNE_GEMM_X86
  switch (isa) {
    case Isa::avx512: return detail::avx512_kernels();
    case Isa::avx2: return detail::avx2_kernels();
    case Isa::generic: break;
  }
#endif
  return detail::generic_kernels();
}

Isa best_isa() {
  if (isa_supported(Isa::avx512)) return Isa::avx512;
  if (isa_supported(Isa::avx2)) return Isa::avx2;
  return Isa::generic;
}

struct Active {
  Isa isa = Isa::generic;
  UkernelSet set;
};
std::atomic<const Active*> g_active{nullptr};
std::mutex g_mutex;

// One static slot per ISA, filled once (under g_mutex) and never changed, so a kernel
// call on another thread may keep using the previous one safely.
const Active* make_active(Isa isa) {
  static Active slots[3];
  static bool built[3] = {false, false, false};
  const int i = int(isa);
  if (!built[i]) {
    slots[i] = Active{isa, kernels_of(isa)};
    built[i] = true;
  }
  return &slots[i];
}

const Active& active() {
  const Active* a = g_active.load(std::memory_order_acquire);
  if (a) return *a;
  std::lock_guard<std::mutex> lock(g_mutex);
  a = g_active.load(std::memory_order_relaxed);
  if (!a) {
    Isa isa = best_isa();
    if (const char* env = std::getenv("MOETUNE_GEMM_ISA"); env && *env) {
      isa = parse_isa(env, "MOETUNE_GEMM_ISA");
      if (!isa_supported(isa))
        throw Error(std::string("MOETUNE_GEMM_ISA=") + env + ": this CPU cannot run the " + env + " kernels");
    }
    a = make_active(isa);
    g_active.store(a, std::memory_order_release);
  }
  return *a;
}

template <class T>
const UkernelDesc<T>& desc_of(const UkernelSet& s);
template <>
const UkernelDesc<float>& desc_of<float>(const UkernelSet& s) {
  return s.f32;
}
template <>
const UkernelDesc<double>& desc_of<double>(const UkernelSet& s) {
  return s.f64;
}

// PackRows and PackCopy as scalar loops, for kernels without SIMD ones (the generic
// kernels, double).
template <class T>
void pack_rows_scalar(T* dst, const T* src, int64_t ld, int rows, int64_t kc, int w) {
  for (int r = 0; r < rows; ++r)
    for (int64_t k = 0; k < kc; ++k) dst[k * w + r] = src[r * ld + k];
  for (int r = rows; r < w; ++r)
    for (int64_t k = 0; k < kc; ++k) dst[k * w + r] = T(0);
}
template <class T>
void pack_copy_scalar(T* dst, const T* src, int64_t ld, int cols, int64_t kc, int w) {
  for (int64_t k = 0; k < kc; ++k) {
    for (int j = 0; j < cols; ++j) dst[k * w + j] = src[k * ld + j];
    for (int j = cols; j < w; ++j) dst[k * w + j] = T(0);
  }
}

// The kernels of the moment with both packs (the ISA's, else the scalar loops).
template <class T>
UkernelDesc<T> kernels_in_use() {
  UkernelDesc<T> uk = desc_of<T>(active().set);
  if (!uk.pack_rows) uk.pack_rows = &pack_rows_scalar<T>;
  if (!uk.pack_copy) uk.pack_copy = &pack_copy_scalar<T>;
  return uk;
}

// A(r, k) of the logical (M, K) operand (trans: stored as (K, M)), rows [i0, i0 + mc),
// columns [k0, k0 + kc), into panels of mr rows.
template <class T>
void pack_a(T* Ap, const T* A, int64_t lda, bool trans, int64_t i0, int64_t mc, int64_t k0, int64_t kc,
            const UkernelDesc<T>& uk) {
  for (int64_t p = 0; p * uk.mr < mc; ++p) {
    const int64_t r0 = i0 + p * uk.mr;
    const int rows = int(std::min<int64_t>(uk.mr, mc - p * uk.mr));
    if (trans)
      uk.pack_copy(Ap + p * uk.mr * kc, A + k0 * lda + r0, lda, rows, kc, uk.mr);
    else
      uk.pack_rows(Ap + p * uk.mr * kc, A + r0 * lda + k0, lda, rows, kc, uk.mr);
  }
}

// B(k, c) of the logical (K, N) operand (trans: stored as (N, K)), one panel of nr
// columns from c0.
template <class T>
void pack_b_panel(T* dst, const T* B, int64_t ldb, bool trans, int64_t c0, int cols, int64_t k0, int64_t kc,
                  const UkernelDesc<T>& uk) {
  if (trans)
    uk.pack_rows(dst, B + c0 * ldb + k0, ldb, cols, kc, uk.nr);
  else
    uk.pack_copy(dst, B + k0 * ldb + c0, ldb, cols, kc, uk.nr);
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The most rows for which gemm_impl packs B panel by panel inside the tiles.
constexpr int64_t kBInTileRows = 192;

// The calling thread's packing buffers of A (which = 0) and B (1); they only grow.
template <class T>
std::vector<T>& pack_buffer(int which) {
  static thread_local std::vector<T> buf[2];
  return buf[which];
}

template <class T>
void gemm_impl(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
               T* C, int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill_n(C + i * ldc, N, T(0));
    return;
  }
  const UkernelDesc<T> uk = kernels_in_use<T>();
  const int mr = uk.mr, nr = uk.nr;
  // A team only for products worth one and never nested (kernels/parallel.hpp): a call
  // inside a parallel region runs alone on its thread, without any OpenMP call.
  const bool parallel = use_team(double(M) * double(N) * double(K) >= 65536.0);
  const int threads = parallel ? omp_get_max_threads() : 1;
  if (!ta && tb && M <= uk.small_m && uk.nt_small) {
    // Few rows times the weights: B read in place (gemm_ukernel.hpp NtSmall), column
    // chunks split over threads, each packing its own copy of the few rows of A.
    const int64_t chunks = parallel ? std::min<int64_t>((N + 47) / 48, 4 * int64_t(threads)) : 1;
    const int64_t cw = round_up((N + chunks - 1) / chunks, 12);
    // Every thread of the team sizes its buffer before the chunks are dealt, so that
    // which thread draws a chunk never decides whether a warm call allocates.
    auto a_rows = [&] {
      std::vector<T>& abuf = pack_buffer<T>(0);  // this thread's
      if (int64_t(abuf.size()) < detail::kSmallM * K) abuf.resize(detail::kSmallM * K);
      return abuf.data();
    };
    auto chunk = [&](int64_t c, T* ap) {
      const int64_t j0 = c * cw;
      uk.nt_small(M, std::min(cw, N - j0), K, A, lda, B + j0 * ldb, ldb, C + j0, ldc, accumulate, ap);
    };
    const int64_t nchunks = (N + cw - 1) / cw;
    if (parallel) {
#pragma omp parallel
      {
        T* const ap = a_rows();
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < nchunks; ++c) chunk(c, ap);
      }
    } else {
      T* const ap = a_rows();
      for (int64_t c = 0; c < nchunks; ++c) chunk(c, ap);
    }
    return;
  }
  // B is packed once per call into panels, K block by K block: block kb (k0 = kb*KC, kc
  // columns) starts at k0*Np and holds Np/nr panels of kc x nr. A is packed one row
  // block of a macro tile at a time (all its K blocks, the same layout with the block's
  // rows), by the thread that computes the tile, into that thread's buffer, and reused
  // for the next tiles of the same rows: a row block (mc x K) stays in the core's L2,
  // where packing the whole A up front (megabytes for the FFN and weight-gradient
  // products) went out to L3 and memory and back. The buffers belong to the calling
  // threads (a call nested in a parallel region runs alone on its thread) and only
  // ever grow.
  const int64_t Mp = round_up(M, mr), Np = round_up(N, nr);
  const int64_t pb = Np / nr, nkb = (K + kGemmKc - 1) / kGemmKc;
  // Up to kBInTileRows rows (and enough column panels for the threads), one tile holds
  // every row, so each panel of B serves one tile only: it is packed inside that tile,
  // just before its row panels run over it, into a kc x nr buffer of the computing
  // thread that stays in L1, instead of all of B up front (for the per-expert products,
  // megabytes written out to L3 and read back: nn 128x512x2048 ran at 55% of the peak).
  // Who packs which panel, and when, changes no bit.
  const bool b_in_tile = M <= kBInTileRows && pb >= 2 * threads;
  T* bp = nullptr;
  if (!b_in_tile) {
    std::vector<T>& bbuf = pack_buffer<T>(1);
    if (int64_t(bbuf.size()) < Np * K) bbuf.resize(Np * K);
    bp = bbuf.data();
  }
  // Macro tiles of the output: about 96 rows x 16 panels, cut smaller until every
  // thread has at least two (or they reach 2 x 4 micro-tiles). With several threads the
  // tile count is then made a multiple of theirs, and the row and column panels are
  // shared out evenly (tiles differ by at most one panel), so that no thread is left
  // with the short edge tiles while another still works: 512 rows in blocks of 96 gave
  // two threads 288 and 224 rows. With B packed in the tiles, only the columns are cut.
  int64_t mc = b_in_tile ? Mp : std::min(Mp, round_up(96, mr));
  int64_t nc = std::min(Np, int64_t(16) * nr);
  auto tiles = [&] { return ((M + mc - 1) / mc) * ((N + nc - 1) / nc); };
  if (b_in_tile) {
    while (tiles() < 2 * threads && nc > nr) nc = round_up(nc / 2, nr);
  } else {
    while (tiles() < 2 * threads && nc > 4 * nr) nc = round_up(nc / 2, nr);
    while (tiles() < 2 * threads && mc > 2 * mr) mc = round_up(mc / 2, mr);
  }
  const int64_t row_panels = Mp / mr;
  int64_t tm = (M + mc - 1) / mc;
  int64_t tn = (N + nc - 1) / nc;
  if (b_in_tile)
    while (threads > 1 && tn % threads != 0 && tn < pb) ++tn;
  else
    while (threads > 1 && (tm * tn) % threads != 0 && tm < row_panels) ++tm;
  const int64_t nt = tm * tn;
  // Tile row block r: panels [r P / tm, (r + 1) P / tm) of the P row panels; columns alike.
  auto row_at = [&](int64_t r) { return std::min(M, r * row_panels / tm * mr); };
  auto col_at = [&](int64_t c) { return std::min(N, c * pb / tn * nr); };
  mc = (row_panels + tm - 1) / tm * mr;  // the largest row block, for the A buffer

  // A stored (M, K) (nt, nn) is read in place by the kernels that can (UkernelRows, the
  // AVX-512 one): its rows are already k-contiguous, the micro-kernel broadcasts from
  // twelve of them instead of one packed panel, and the pass that packed them (a
  // quarter of all the packing of a training step) goes. The same bits.
  const bool a_in_place = !ta && uk.fn_rows != nullptr;
  auto pack_b = [&](int64_t x) {
    const int64_t k0 = (x / pb) * kGemmKc, kc = std::min(kGemmKc, K - k0), p = x % pb;
    pack_b_panel(bp + k0 * Np + p * nr * kc, B, ldb, tb, p * nr, int(std::min<int64_t>(nr, N - p * nr)), k0, kc, uk);
  };
  // The macro tile t, with this thread's buffer `ap` holding the packed row block
  // `packed_i0` (-1: none yet) and `bt` one panel of B (b_in_tile).
  auto tile = [&](int64_t t, T* ap, int64_t& packed_i0, T* bt) {
    const int64_t i0 = row_at(t / tn), j0 = col_at(t % tn);
    const int64_t m = row_at(t / tn + 1) - i0, n = col_at(t % tn + 1) - j0, mp = round_up(m, mr);
    if (!a_in_place && i0 != packed_i0) {
      for (int64_t k0 = 0; k0 < K; k0 += kGemmKc)
        pack_a(ap + k0 * mp, A, lda, ta, i0, m, k0, std::min(kGemmKc, K - k0), uk);
      packed_i0 = i0;
    }
    for (int64_t k0 = 0; k0 < K; k0 += kGemmKc) {
      const int64_t kc = std::min(kGemmKc, K - k0);
      const bool overwrite = !accumulate && k0 == 0;
      const T* ablk = a_in_place ? nullptr : ap + k0 * mp;  // (no A buffer when read in place)
      for (int64_t jp = 0; jp * nr < n; ++jp) {
        const int nn = int(std::min<int64_t>(nr, n - jp * nr));
        const T* bpanel;
        if (b_in_tile) {
          pack_b_panel(bt, B, ldb, tb, j0 + jp * nr, nn, k0, kc, uk);
          bpanel = bt;
        } else {
          bpanel = bp + k0 * Np + (j0 / nr + jp) * nr * kc;
        }
        for (int64_t ip = 0; ip * mr < m; ++ip) {
          const int mm = int(std::min<int64_t>(mr, m - ip * mr));
          T* const c = C + (i0 + ip * mr) * ldc + j0 + jp * nr;
          if (a_in_place)
            uk.fn_rows(kc, A + (i0 + ip * mr) * lda + k0, lda, bpanel, c, ldc, mm, nn, overwrite);
          else
            uk.fn(kc, ablk + ip * mr * kc, bpanel, c, ldc, mm, nn, overwrite);
        }
      }
    }
  };
  auto a_buffer = [&]() -> T* {
    if (a_in_place) return nullptr;
    std::vector<T>& abuf = pack_buffer<T>(0);  // this thread's
    if (int64_t(abuf.size()) < mc * K) abuf.resize(mc * K);
    return abuf.data();
  };
  auto b_panel_buffer = [&]() -> T* {
    if (!b_in_tile) return nullptr;
    std::vector<T>& b = pack_buffer<T>(1);  // this thread's
    if (int64_t(b.size()) < nr * kGemmKc) b.resize(nr * kGemmKc);
    return b.data();
  };
  if (parallel) {
#pragma omp parallel
    {
      if (!b_in_tile) {
#pragma omp for schedule(static)
        for (int64_t x = 0; x < nkb * pb; ++x) pack_b(x);
      }
      T* const ap = a_buffer();
      T* const bt = b_panel_buffer();
      int64_t packed_i0 = -1;
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < nt; ++t) tile(t, ap, packed_i0, bt);
    }
  } else {
    if (!b_in_tile)
      for (int64_t x = 0; x < nkb * pb; ++x) pack_b(x);
    T* const ap = a_buffer();
    T* const bt = b_panel_buffer();
    int64_t packed_i0 = -1;
    for (int64_t t = 0; t < nt; ++t) tile(t, ap, packed_i0, bt);
  }
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    case Isa::generic: break;
  }
  return "generic";
}

Isa parse_isa(const std::string& name, const std::string& where) {
  if (name == "generic") return Isa::generic;
  if (name == "avx2") return Isa::avx2;
  if (name == "avx512") return Isa::avx512;
  throw Error(where + ": unknown GEMM ISA \"" + name + "\" (expected generic, avx2 or avx512)");
}

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::generic: return true;
#if MOETUNE_GEMM_X86
    // GCC's and clang's CPU model also checks that the OS saves the wider registers.
    case Isa::avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::avx512: return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
#else
    case Isa::avx2:
    case Isa::avx512: return false;
#endif
  }
  return false;
}

std::vector<Isa> supported_isas() {
  std::vector<Isa> v;
  for (Isa isa : {Isa::generic, Isa::avx2, Isa::avx512})
    if (isa_supported(isa)) v.push_back(isa);
  return v;
}

Isa gemm_isa() { return active().isa; }

void set_gemm_isa(Isa isa) {
  if (!isa_supported(isa)) throw Error(std::string("this CPU cannot run the ") + isa_name(isa) + " GEMM kernels");
  std::lock_guard<std::mutex> lock(g_mutex);
  g_active.store(make_active(isa), std::memory_order_release);
}

template <class T>
void gemm_nt(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
             bool accumulate) {
  gemm_impl<T>(false, true, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}
template <class T>
void gemm_nn(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
             bool accumulate) {
  gemm_impl<T>(false, false, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}
template <class T>
void gemm_tn(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
             bool accumulate) {
  gemm_impl<T>(true, false, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

template <class T>
PanelKernel<T> panel_kernel() {
  const UkernelDesc<T> uk = kernels_in_use<T>();
  PanelKernel<T> p;
  p.mr = uk.mr;
  p.nr = uk.nr;
  p.tile = uk.fn;
  p.pack_rows = uk.pack_rows;
  p.pack_copy = uk.pack_copy;
  return p;
}

template <class T>
void gemm_reserve(int64_t elements) {
  for (int which : {0, 1}) {
    std::vector<T>& b = pack_buffer<T>(which);
    if (int64_t(b.size()) < elements) b.resize(size_t(elements));
  }
}

template <class T>
void gemm_reference(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                    int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      T c = accumulate ? C[i * ldc + j] : T(0);
      for (int64_t k0 = 0; k0 < K; k0 += kGemmKc) {
        T acc = T(0);
        for (int64_t k = k0; k < std::min(K, k0 + kGemmKc); ++k) {
          const T a = trans_a ? A[k * lda + i] : A[i * lda + k];
          const T b = trans_b ? B[j * ldb + k] : B[k * ldb + j];
          acc = std::fma(a, b, acc);
        }
        c = (!accumulate && k0 == 0) ? acc : c + acc;
      }
      C[i * ldc + j] = c;
    }
}

#define MOETUNE_GEMM_INSTANTIATE(T)                                                                                  \
  template void gemm_nt<T>(int64_t, int64_t, int64_t, const T*, int64_t, const T*, int64_t, T*, int64_t, bool);     \
  template void gemm_nn<T>(int64_t, int64_t, int64_t, const T*, int64_t, const T*, int64_t, T*, int64_t, bool);     \
  template void gemm_tn<T>(int64_t, int64_t, int64_t, const T*, int64_t, const T*, int64_t, T*, int64_t, bool);     \
  template void gemm_reserve<T>(int64_t);                                                                           \
  template PanelKernel<T> panel_kernel<T>();                                                                        \
  template void gemm_reference<T>(bool, bool, int64_t, int64_t, int64_t, const T*, int64_t, const T*, int64_t, T*, \
                                  int64_t, bool);
MOETUNE_GEMM_INSTANTIATE(float)
MOETUNE_GEMM_INSTANTIATE(double)
#undef MOETUNE_GEMM_INSTANTIATE

}  // namespace moetune::kernels
