// kernels/gemm: every kernel this CPU can run gives exactly the bits of the reference
// loop (the arithmetic order of kernels/gemm.hpp) on edge-heavy shapes, leading
// dimensions and both modes; results do not depend on the rows sharing the call, the
// thread count or the ISA; and the values are accurate against a double product.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/gemm.hpp"
#include "kernels/parallel.hpp"
#include "test_util.hpp"

namespace moetune {
namespace {

using kernels::Isa;

enum class Mode { nt, nn, tn };
const char* mode_name(Mode m) { return m == Mode::nt ? "nt" : m == Mode::nn ? "nn" : "tn"; }

template <class T>
std::vector<T> random_vec(int64_t n, uint32_t seed) {
  std::mt19937 g(seed);
  std::normal_distribution<double> d(0.0, 1.0);
  std::vector<T> v(n);
  for (auto& x : v) x = T(d(g));
  return v;
}

// An operand problem with padded leading dimensions (ld = cols + pad).
template <class T>
struct Problem {
  Mode mode;
  int64_t M, N, K, lda, ldb, ldc;
  std::vector<T> A, B, C0;
  Problem(Mode m, int64_t M_, int64_t N_, int64_t K_, int64_t pad, uint32_t seed) : mode(m), M(M_), N(N_), K(K_) {
    const int64_t arows = m == Mode::tn ? K : M, acols = m == Mode::tn ? M : K;
    const int64_t brows = m == Mode::nt ? N : K, bcols = m == Mode::nt ? K : N;
    lda = acols + pad;
    ldb = bcols + pad;
    ldc = N + pad;
    A = random_vec<T>(arows * lda, seed);
    B = random_vec<T>(brows * ldb, seed + 1);
    C0 = random_vec<T>(M * ldc, seed + 2);
  }
  bool ta() const { return mode == Mode::tn; }
  bool tb() const { return mode == Mode::nt; }
  std::vector<T> run(bool accumulate) const {
    std::vector<T> C = C0;
    if (mode == Mode::nt) kernels::gemm_nt(M, N, K, A.data(), lda, B.data(), ldb, C.data(), ldc, accumulate);
    if (mode == Mode::nn) kernels::gemm_nn(M, N, K, A.data(), lda, B.data(), ldb, C.data(), ldc, accumulate);
    if (mode == Mode::tn) kernels::gemm_tn(M, N, K, A.data(), lda, B.data(), ldb, C.data(), ldc, accumulate);
    return C;
  }
  std::vector<T> reference(bool accumulate) const {
    std::vector<T> C = C0;
    kernels::gemm_reference(ta(), tb(), M, N, K, A.data(), lda, B.data(), ldb, C.data(), ldc, accumulate);
    return C;
  }
};

// Restores the kernels and the thread count a test changed.
struct GemmState : ::testing::Test {
  Isa saved_isa = kernels::gemm_isa();
  int saved_threads = omp_get_max_threads();
  void TearDown() override {
    kernels::set_gemm_isa(saved_isa);
    omp_set_num_threads(saved_threads);
  }
};
using Gemm = GemmState;

// Shapes around every tile edge of every kernel (MR 4/6/12, NR 8/16/32, KC 256), and of
// the few-rows nt paths (AVX-512: M <= 32 in halves of 16, columns by 12; AVX2: M <= 16 in
// halves of 8, columns by 6), and on both sides of kBInTileRows = 192 (B packed inside
// the tiles up to 192 rows when there are enough column panels, up front otherwise).
const std::vector<std::tuple<int64_t, int64_t, int64_t>> kShapes = {
    {1, 1, 1},     {1, 33, 7},    {5, 1, 300},   {13, 17, 255}, {12, 32, 256},  {25, 65, 257}, {97, 40, 513},
    {64, 200, 96}, {16, 25, 257}, {17, 13, 40},  {32, 100, 600}, {33, 12, 20}, {150, 96, 300}, {200, 70, 300}};

template <class T>
void expect_matches_reference(Isa isa) {
  kernels::set_gemm_isa(isa);
  uint32_t seed = 10;
  for (Mode mode : {Mode::nt, Mode::nn, Mode::tn})
    for (auto [M, N, K] : kShapes)
      for (int64_t pad : {0, 3})
        for (bool acc : {false, true}) {
          Problem<T> p(mode, M, N, K, pad, seed++);
          const std::vector<T> got = p.run(acc), want = p.reference(acc);
          ASSERT_EQ(0, std::memcmp(got.data(), want.data(), got.size() * sizeof(T)))
              << kernels::isa_name(isa) << " " << mode_name(mode) << " M=" << M << " N=" << N << " K=" << K
              << " pad=" << pad << " accumulate=" << acc;
        }
}

TEST_F(Gemm, EveryKernelEqualsTheReferenceBitForBit) {
  for (Isa isa : kernels::supported_isas()) {
    SCOPED_TRACE(kernels::isa_name(isa));
    expect_matches_reference<float>(isa);
    expect_matches_reference<double>(isa);
  }
}

TEST_F(Gemm, AccurateAgainstADoubleProduct) {
  // Not a self-comparison: float kernels against the exact-ish double product.
  Problem<float> p(Mode::nt, 50, 70, 600, 0, 3);
  const std::vector<float> got = p.run(false);
  double worst = 0;
  for (int64_t i = 0; i < p.M; ++i)
    for (int64_t j = 0; j < p.N; ++j) {
      double want = 0, mag = 0;
      for (int64_t k = 0; k < p.K; ++k) {
        const double t = double(p.A[i * p.lda + k]) * double(p.B[j * p.ldb + k]);
        want += t;
        mag += std::fabs(t);
      }
      worst = std::max(worst, std::fabs(double(got[i * p.ldc + j]) - want) / mag);
    }
  EXPECT_LT(worst, 1e-6);
  EXPECT_GT(worst, 0.0);  // float rounding is visible: the product really ran in float
}

TEST_F(Gemm, RowsDoNotDependOnTheRowsSharingTheCall) {
  for (Isa isa : kernels::supported_isas()) {
    kernels::set_gemm_isa(isa);
    const int64_t N = 300, K = 700;
    const std::vector<float> A = random_vec<float>(64 * K, 1), W = random_vec<float>(N * K, 2);
    std::vector<float> big(64 * N);
    kernels::gemm_nt<float>(64, N, K, A.data(), K, W.data(), K, big.data(), N, false);
    for (int64_t rows : {1, 7, 64})
      for (int64_t r0 : {int64_t(0), 64 - rows}) {
        std::vector<float> part(rows * N);
        kernels::gemm_nt<float>(rows, N, K, A.data() + r0 * K, K, W.data(), K, part.data(), N, false);
        EXPECT_EQ(0, std::memcmp(part.data(), big.data() + r0 * N, part.size() * sizeof(float)))
            << kernels::isa_name(isa) << " rows=" << rows << " from row " << r0;
      }
  }
}

TEST_F(Gemm, ThreadCountChangesNoBit) {
  // 301 rows: B packed up front; 150 rows: B packed inside the tiles at 1-3 threads and,
  // with the AVX-512 kernels (11 column panels of 32), up front at 7.
  for (Mode mode : {Mode::nt, Mode::nn, Mode::tn})
    for (int64_t M : {301, 150}) {
      Problem<float> p(mode, M, 333, 530, 1, 77);
      omp_set_num_threads(1);
      const std::vector<float> one = p.run(true);
      for (int threads : {2, 3, 7}) {
        omp_set_num_threads(threads);
        const std::vector<float> many = p.run(true);
        EXPECT_EQ(0, std::memcmp(one.data(), many.data(), one.size() * sizeof(float)))
            << mode_name(mode) << " M=" << M << " threads=" << threads;
      }
    }
}

TEST_F(Gemm, IsasAgreeBitForBit) {
  const std::vector<Isa> isas = kernels::supported_isas();
  if (isas.size() < 2) GTEST_SKIP() << "this CPU runs only the generic kernels";
  Problem<float> p(Mode::nn, 123, 257, 1000, 0, 5);
  kernels::set_gemm_isa(isas.front());
  const std::vector<float> want = p.run(false);
  for (Isa isa : isas) {
    kernels::set_gemm_isa(isa);
    const std::vector<float> got = p.run(false);
    EXPECT_EQ(0, std::memcmp(got.data(), want.data(), got.size() * sizeof(float))) << kernels::isa_name(isa);
  }
}

TEST_F(Gemm, EmptyReductionOverwritesOrKeeps) {
  std::vector<float> C(6, 5.0f);
  const float a = 1, b = 1;
  kernels::gemm_nt<float>(2, 3, 0, &a, 1, &b, 1, C.data(), 3, true);
  EXPECT_EQ(C, std::vector<float>(6, 5.0f));
  kernels::gemm_nt<float>(2, 3, 0, &a, 1, &b, 1, C.data(), 3, false);
  EXPECT_EQ(C, std::vector<float>(6, 0.0f));
}

TEST_F(Gemm, IsaNames) {
  for (Isa isa : {Isa::generic, Isa::avx2, Isa::avx512})
    EXPECT_EQ(kernels::parse_isa(kernels::isa_name(isa), "x"), isa);
  EXPECT_CONTAINS(testing::error_of([] { kernels::parse_isa("sse9", "MOETUNE_GEMM_ISA"); }),
                  "MOETUNE_GEMM_ISA: unknown GEMM ISA \"sse9\"");
  EXPECT_TRUE(kernels::isa_supported(Isa::generic));
  for (Isa isa : {Isa::avx2, Isa::avx512})
    if (!kernels::isa_supported(isa)) {
      EXPECT_CONTAINS(testing::error_of([&] { kernels::set_gemm_isa(isa); }), "cannot run");
    }
}

// parallel_fill / parallel_copy / parallel_add write exactly [0, n) at every size around their chunk
// (1 << 15 elements) and team threshold, on one thread and on a team of two.
TEST(ParallelFill, WritesExactlyTheRangeAtEverySizeAndThreadCount) {
  constexpr int64_t kChunk = int64_t(1) << 15;
  const int saved = omp_get_max_threads();
  for (int threads : {1, 2})
    for (int64_t n : {int64_t(0), int64_t(1), kChunk - 1, kChunk, 2 * kChunk - 1, 2 * kChunk, 2 * kChunk + 1,
                      5 * kChunk + 7}) {
      omp_set_num_threads(threads);
      std::vector<float> buf(size_t(n + 2), -1.0f);
      std::vector<float> src(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) src[size_t(i)] = float(i % 1000) + 0.5f;
      kernels::parallel_fill(buf.data() + 1, n, 3.0f);
      EXPECT_EQ(buf.front(), -1.0f);
      EXPECT_EQ(buf.back(), -1.0f);
      EXPECT_EQ(std::count(buf.begin() + 1, buf.end() - 1, 3.0f), n) << "n " << n << ", threads " << threads;
      kernels::parallel_copy(buf.data() + 1, src.data(), n);
      EXPECT_EQ(buf.front(), -1.0f);
      EXPECT_EQ(buf.back(), -1.0f);
      EXPECT_TRUE(std::equal(src.begin(), src.end(), buf.begin() + 1)) << "n " << n << ", threads " << threads;
      kernels::parallel_add(buf.data() + 1, src.data(), n);
      EXPECT_EQ(buf.front(), -1.0f);
      EXPECT_EQ(buf.back(), -1.0f);
      for (int64_t i = 0; i < n; ++i)
        ASSERT_EQ(buf[size_t(i + 1)], src[size_t(i)] + src[size_t(i)]) << "n " << n << ", threads " << threads;
    }
  omp_set_num_threads(saved);
}

}  // namespace
}  // namespace moetune
