// ops::exp_f32, the float exp of the model's loops (moe/ops.hpp): its accuracy against
// the correctly rounded exp, its edge values, and that a vectorized loop of it gives the
// same bits as one call per element (the model's results must not depend on which lane
// or which ISA computed an element); and ops::row_max, the lane-wise row maximum.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "moe/ops.hpp"

using moetune::ops::exp_f32;

namespace {
// Distance in units in the last place between two finite floats of the same sign.
int64_t ulp_distance(float a, float b) {
  const int64_t ia = std::bit_cast<int32_t>(a), ib = std::bit_cast<int32_t>(b);
  return ia > ib ? ia - ib : ib - ia;
}
// One call, kept out of any vectorized loop.
[[gnu::noinline]] float exp_one(float x) { return exp_f32(x); }
}  // namespace

TEST(OpsExp, FloatWithinTwoUlp) {
  // Every 61st float from -87.3365 (the smallest normal result) to 88.7228 (the
  // largest): about 36 million points, each against exp in double, rounded once.
  int64_t worst = 0, count = 0;
  float worst_x = 0;
  auto sweep = [&](float from, float to) {  // |from| <= |to|, same sign
    for (int32_t b = std::bit_cast<int32_t>(from); b <= std::bit_cast<int32_t>(to); b += 61) {
      const float x = std::bit_cast<float>(b);
      const float want = static_cast<float>(std::exp(static_cast<double>(x)));
      const int64_t d = ulp_distance(exp_f32(x), want);
      ++count;
      if (d > worst) worst = d, worst_x = x;
    }
  };
  sweep(0.0f, 88.72283935546875f);
  sweep(-0.0f, -87.33654022216796875f);
  EXPECT_GT(count, 30000000);
  EXPECT_LE(worst, 2) << "at x = " << worst_x;
}

TEST(OpsExp, EdgeValues) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(exp_f32(0.0f), 1.0f);
  EXPECT_EQ(exp_f32(-0.0f), 1.0f);
  EXPECT_EQ(exp_f32(-inf), 0.0f);  // the attention sink's "none"
  EXPECT_EQ(exp_f32(inf), inf);
  EXPECT_EQ(exp_f32(88.7229f), inf);  // past the largest float
  EXPECT_EQ(exp_f32(-87.34f), 0.0f);  // subnormal results are flushed
  EXPECT_EQ(exp_f32(-1000.0f), 0.0f);
  EXPECT_TRUE(std::isnan(exp_f32(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_TRUE(std::isnan(exp_f32(-std::numeric_limits<float>::quiet_NaN())));
  // The largest and smallest finite results are normal floats, near the true values
  // (exp(88.72283935546875) itself rounds to +inf).
  for (const float x : {std::nextafter(88.72283935546875f, 0.0f), -87.33654022216796875f}) {
    const float y = exp_f32(x);
    EXPECT_TRUE(std::isnormal(y)) << x;
    EXPECT_NEAR(double(y) / std::exp(double(x)), 1.0, 3e-7) << x;
  }
  EXPECT_EQ(moetune::ops::exp(1.0), std::exp(1.0));  // double keeps libm's exp
}

TEST(OpsExp, VectorizedLoopGivesTheBitsOfSingleCalls) {
  std::vector<float> x(4099), y(x.size());
  for (size_t i = 0; i < x.size(); ++i) x[i] = -95.0f + 190.0f * float(i) / float(x.size() - 1);
  x[7] = std::numeric_limits<float>::quiet_NaN();
  x[8] = -std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < x.size(); ++i) y[i] = exp_f32(x[i]);  // the compiler vectorizes this
  for (size_t i = 0; i < x.size(); ++i) {
    const float one = exp_one(x[i]);
    ASSERT_EQ(std::bit_cast<uint32_t>(y[i]), std::bit_cast<uint32_t>(one)) << "x = " << x[i];
  }
}

// SwiGLU's rows run the CPU's widest clone (kernels/multiversion.hpp): the same bits
// as the formula evaluated one element at a time.
TEST(OpsExp, SwigluClonesGiveTheBitsOfScalarCode) {
  const int64_t rows = 3, cols = 37, ld = 2 * cols;
  std::vector<float> gu(rows * ld), out(rows * cols), dout(rows * cols), dgu(rows * ld);
  for (size_t i = 0; i < gu.size(); ++i) gu[i] = std::sin(float(i) * 0.37f) * 12.0f;
  for (size_t i = 0; i < dout.size(); ++i) dout[i] = std::cos(float(i) * 0.11f);
  for (const double limit : {0.0, 7.0}) {
    moetune::ops::swiglu_forward(out.data(), gu.data(), gu.data() + cols, rows, cols, ld, limit);
    moetune::ops::swiglu_backward(dgu.data(), dgu.data() + cols, dout.data(), gu.data(), gu.data() + cols, rows, cols,
                                  ld, limit);
    const float c = float(limit);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < cols; ++i) {
        const float g0 = gu[r * ld + i], u0 = gu[r * ld + cols + i], d = dout[r * cols + i];
        const bool g_in = !(c > 0) || g0 <= c, u_in = !(c > 0) || (u0 >= -c && u0 <= c);
        const float gi = c > 0 ? std::min(g0, c) : g0, ui = c > 0 ? std::clamp(u0, -c, c) : u0;
        const float sg = 1.0f / (1.0f + exp_one(-gi));
        const float want = gi * sg * ui;
        const float want_du = u_in ? d * (gi * sg) : 0.0f;
        const float want_dg = g_in ? d * ui * sg * (1.0f + gi * (1.0f - sg)) : 0.0f;
        ASSERT_EQ(std::bit_cast<uint32_t>(out[r * cols + i]), std::bit_cast<uint32_t>(want)) << r << "," << i;
        ASSERT_EQ(std::bit_cast<uint32_t>(dgu[r * ld + cols + i]), std::bit_cast<uint32_t>(want_du)) << r << "," << i;
        ASSERT_EQ(std::bit_cast<uint32_t>(dgu[r * ld + i]), std::bit_cast<uint32_t>(want_dg)) << r << "," << i;
      }
  }
}

// row_max (the lane-wise maximum of the softmax and cross-entropy rows) against
// std::max folded left from init, for every length 0..40 (both sides of the 16 lanes),
// rows with NaN, +-inf and both signed zeros, and inits of -inf, a finite value and NaN.
// The only freedom it has is which zero it returns when +0 and -0 are both largest.
TEST(OpsRowMax, IsTheLeftFoldOfStdMax) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  const std::vector<float> pool = {1.5f, -2.0f, 0.0f, -0.0f, nan, inf, -inf, 3.25f, -7.0f, 1e-30f, 1e30f, -0.5f};
  std::uint32_t state = 12345;
  auto next = [&] { return state = state * 1664525u + 1013904223u; };
  for (const float init : {-inf, -1.0f, nan}) {
    for (int n = 0; n <= 40; ++n) {
      for (int trial = 0; trial < 20; ++trial) {
        std::vector<float> row(static_cast<size_t>(n));
        for (float& v : row) v = pool[next() % pool.size()];
        float want = init;
        for (const float v : row) want = std::max(want, v);
        const float got = moetune::ops::row_max<float>(n, init, [&](int64_t j) { return row[size_t(j)]; });
        if (std::isnan(want)) {
          EXPECT_TRUE(std::isnan(got)) << "n " << n << " init " << init;
        } else if (want == 0.0f) {
          EXPECT_EQ(got, 0.0f) << "n " << n;  // either zero
        } else {
          EXPECT_EQ(std::bit_cast<std::uint32_t>(got), std::bit_cast<std::uint32_t>(want)) << "n " << n << " init " << init;
        }
      }
    }
  }
}
