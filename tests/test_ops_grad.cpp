// Finite-difference gradient checks, in double, of every op's hand-written backward.
// Each op is wrapped into a scalar loss L = sum(out * R) with a fixed random R, so
// dL/dout = R, and the backward's input gradients are compared with central
// differences of L. Tolerances are per op (ggml test-backend-ops style).
#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "moe/dispatch.hpp"
#include "moe/hc.hpp"
#include "moe/init.hpp"
#include "moe/mlp.hpp"
#include "moe/mtp.hpp"
#include "moe/moe_layer.hpp"
#include "moe/ops.hpp"
#include "moe/router.hpp"
#include "test_util.hpp"

using namespace moetune;
using namespace moetune::testing;

namespace {
double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}
}  // namespace

TEST(OpsGrad, Embedding) {
  const int64_t N = 7, V = 5, d = 4;
  auto w = randn(V * d, 1);
  std::vector<int32_t> ids = {0, 3, 3, 1, 4, 0, 2};
  auto R = randn(N * d, 2);
  std::vector<double> out(N * d), dw(V * d, 0.0);
  auto f = [&] {
    ops::embedding_forward(out.data(), ids.data(), w.data(), N, d);
    return dot(out, R);
  };
  ops::embedding_backward(dw.data(), R.data(), ids.data(), N, d);
  EXPECT_LT(check_grad(f, w, dw), 1e-6);
}

TEST(OpsGrad, RMSNorm) {
  const int64_t N = 5, d = 8;
  auto x = randn(N * d, 3), w = randn(d, 4), R = randn(N * d, 5);
  std::vector<double> out(N * d), rstd(N), dx(N * d, 0.0), dw(d, 0.0);
  auto f = [&] {
    ops::rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), N, d, 1e-6);
    return dot(out, R);
  };
  f();
  ops::rmsnorm_backward(dx.data(), dw.data(), R.data(), x.data(), w.data(), rstd.data(), N, d);
  EXPECT_LT(check_grad(f, x, dx), 1e-6);
  EXPECT_LT(check_grad(f, w, dw), 1e-6);
}

TEST(OpsGrad, Linear) {
  const int64_t N = 6, I = 5, O = 3;
  auto x = randn(N * I, 6), w = randn(O * I, 7), R = randn(N * O, 8);
  std::vector<double> out(N * O), dx(N * I, 0.0), dw(O * I, 0.0);
  auto f = [&] {
    ops::linear_forward(out.data(), x.data(), w.data(), N, I, O);
    return dot(out, R);
  };
  ops::linear_backward(dx.data(), dw.data(), R.data(), x.data(), w.data(), N, I, O);
  EXPECT_LT(check_grad(f, x, dx), 1e-6);
  EXPECT_LT(check_grad(f, w, dw), 1e-6);
}

// The MLP's layout: g and u are the two halves of each row of one (rows, 2F) buffer.
TEST(OpsGrad, SwiGLU) {
  const int64_t rows = 4, F = 5, ld = 2 * F;
  auto gu = randn(rows * ld, 9, 2.0), R = randn(rows * F, 11);
  std::vector<double> out(rows * F), dgu(rows * ld, -7.0);
  auto f = [&] {
    ops::swiglu_forward(out.data(), gu.data(), gu.data() + F, rows, F, ld);
    return dot(out, R);
  };
  ops::swiglu_backward(dgu.data(), dgu.data() + F, R.data(), gu.data(), gu.data() + F, rows, F, ld);
  EXPECT_LT(check_grad(f, gu, dgu), 1e-6);  // every element written: none is left at -7
}

// swiglu_limit c: values on both sides of the clamps (none within the FD step of a
// bound), the clamped ones with exactly zero gradient; then values exactly at a bound,
// where the gradient is the one from inside (torch.clamp passes it at the bound).
TEST(OpsGrad, SwiGLUClampedAwayFromTheBound) {
  const int64_t n = 40;
  const double c = 0.7;
  auto g = randn(n, 12, 2.0), u = randn(n, 13, 2.0), R = randn(n, 14);
  for (auto* v : {&g, &u})
    for (double& x : *v)
      if (std::fabs(std::fabs(x) - c) < 1e-3) x += 0.01;  // keep every value away from a bound
  int g_clamped = 0, u_clamped = 0;
  for (int64_t i = 0; i < n; ++i) {
    g_clamped += g[i] > c;
    u_clamped += std::fabs(u[i]) > c;
  }
  ASSERT_GT(g_clamped, 3);
  ASSERT_GT(u_clamped, 3);
  ASSERT_LT(g_clamped, n - 3);
  ASSERT_LT(u_clamped, n - 3);
  std::vector<double> out(n), dg(n), du(n);
  auto f = [&] {
    ops::swiglu_forward(out.data(), g.data(), u.data(), 1, n, n, c);
    return dot(out, R);
  };
  ops::swiglu_backward(dg.data(), du.data(), R.data(), g.data(), u.data(), 1, n, n, c);
  EXPECT_LT(check_grad(f, g, dg), 1e-6);
  EXPECT_LT(check_grad(f, u, du), 1e-6);
  f();  // out at the unperturbed inputs
  for (int64_t i = 0; i < n; ++i) {
    if (g[i] > c) {
      EXPECT_EQ(dg[i], 0.0) << "clamped gate " << i;
    }
    if (std::fabs(u[i]) > c) {
      EXPECT_EQ(du[i], 0.0) << "clamped up " << i;
    }
    // The forward really clamps: out = silu(min(g, c)) * clamp(u, -c, c).
    const double gi = std::min(g[i], c), ui = std::clamp(u[i], -c, c);
    EXPECT_NEAR(out[i], gi / (1 + std::exp(-gi)) * ui, 1e-15);
  }
}

TEST(OpsGrad, SwiGLUClampedAtTheBound) {
  const double c = 0.5;
  std::vector<double> g = {c, 0.1, c, -2.0}, u = {0.3, c, -c, c}, R = {1.0, -0.5, 0.7, 2.0};
  const int64_t n = 4;
  std::vector<double> out(n), dg(n), du(n);
  ops::swiglu_backward(dg.data(), du.data(), R.data(), g.data(), u.data(), 1, n, n, c);
  // One-sided differences from inside the clamp range.
  const double h = 1e-6;
  for (int64_t i = 0; i < n; ++i) {
    auto val = [&](double gi, double ui) {
      double o;
      ops::swiglu_forward(&o, &gi, &ui, 1, 1, 1, c);
      return o * R[i];
    };
    const double dg_in = (val(g[i], u[i]) - val(g[i] - h, u[i])) / h;
    const double du_in = u[i] >= c ? (val(g[i], u[i]) - val(g[i], u[i] - h)) / h
                                   : (val(g[i], u[i] + h) - val(g[i], u[i])) / h;
    EXPECT_NEAR(dg[i], dg_in, 1e-5) << i;
    EXPECT_NEAR(du[i], du_in, 1e-5) << i;
    EXPECT_NE(dg[i], 0.0) << i;
    EXPECT_NE(du[i], 0.0) << i;
  }
  // Just past the bound the gradient is 0.
  std::vector<double> g2 = {c + 1e-9}, u2 = {c + 1e-9}, dg2(1), du2(1), r2 = {1.0};
  ops::swiglu_backward(dg2.data(), du2.data(), r2.data(), g2.data(), u2.data(), 1, 1, 1, c);
  EXPECT_EQ(dg2[0], 0.0);
  EXPECT_EQ(du2[0], 0.0);
}

TEST(OpsGrad, RoPE) {
  const int64_t N = 6, nh = 2, hd = 8;
  auto x = randn(N * nh * hd, 12), R = randn(N * nh * hd, 13);
  std::vector<int32_t> pos = {0, 1, 2, 0, 1, 5};
  auto f = [&] {
    auto y = x;
    ops::rope_apply(y.data(), pos.data(), N, nh, hd, 10000.0, +1);
    return dot(y, R);
  };
  auto dx = R;
  ops::rope_apply(dx.data(), pos.data(), N, nh, hd, 10000.0, -1);
  EXPECT_LT(check_grad(f, x, dx), 1e-6);
  // Position 0 is the identity; rotation preserves the norm.
  auto y = x;
  ops::rope_apply(y.data(), pos.data(), N, nh, hd, 10000.0, +1);
  for (int64_t j = 0; j < nh * hd; ++j) EXPECT_DOUBLE_EQ(y[j], x[j]);
  EXPECT_NEAR(dot(y, y), dot(x, x), 1e-9);
}

TEST(OpsGrad, AttentionGQAWithDocuments) {
  const int64_t B = 2, S = 6, H = 4, Hkv = 2, hd = 4;
  const int64_t N = B * S;
  auto q = randn(N * H * hd, 14), k = randn(N * Hkv * hd, 15), v = randn(N * Hkv * hd, 16);
  auto R = randn(N * H * hd, 17);
  std::vector<int32_t> doc = {0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0};
  std::vector<double> out(N * H * hd), stats(B * H * S * 2);
  auto f = [&] {
    ops::attention_forward(out.data(), stats.data(), q.data(), k.data(), v.data(), doc.data(), B, S, H, Hkv, hd);
    return dot(out, R);
  };
  f();
  std::vector<double> dq(q.size(), 0.0), dk(k.size(), 0.0), dv(v.size(), 0.0);
  ops::attention_backward(dq.data(), dk.data(), dv.data(), R.data(), stats.data(), q.data(), k.data(), v.data(),
                          doc.data(), B, S, H, Hkv, hd);
  EXPECT_LT(check_grad(f, q, dq, 200), 1e-6);
  EXPECT_LT(check_grad(f, k, dk, 200), 1e-6);
  EXPECT_LT(check_grad(f, v, dv, 200), 1e-6);
  // Document masking: token 3 (first of doc 1) attends only to itself: its output is
  // its own value vector and its softmax sum is 1.
  for (int64_t h = 0; h < H; ++h) {
    EXPECT_DOUBLE_EQ(stats[((0 * H + h) * S + 3) * 2 + 1], 1.0);
    for (int64_t x = 0; x < hd; ++x) EXPECT_DOUBLE_EQ(out[3 * H * hd + h * hd + x], v[3 * Hkv * hd + (h / 2) * hd + x]);
  }
}

// Several query tiles (kAttnTile = 64) and documents that do not start on a tile
// boundary: gradients against finite differences, and the output against a naive
// masked softmax computed here.
TEST(OpsGrad, AttentionAcrossTilesAndDocuments) {
  const int64_t B = 1, S = 150, H = 2, Hkv = 1, hd = 4, N = B * S;
  auto q = randn(N * H * hd, 24), k = randn(N * Hkv * hd, 25), v = randn(N * Hkv * hd, 26);
  auto R = randn(N * H * hd, 27);
  std::vector<int32_t> doc(S, 0);
  for (int64_t i = 70; i < S; ++i) doc[i] = 1;
  std::vector<double> out(N * H * hd), stats(B * H * S * 2);
  auto f = [&] {
    ops::attention_forward(out.data(), stats.data(), q.data(), k.data(), v.data(), doc.data(), B, S, H, Hkv, hd);
    return dot(out, R);
  };
  f();
  for (int64_t i : {0, 63, 64, 69, 70, 133, 149})
    for (int64_t h = 0; h < H; ++h) {
      const int64_t ds = i < 70 ? 0 : 70;
      std::vector<double> s;
      double mx = -1e300, sum = 0;
      for (int64_t j = ds; j <= i; ++j) {
        double t = 0;
        for (int64_t x = 0; x < hd; ++x) t += q[i * H * hd + h * hd + x] * k[j * hd + x];
        s.push_back(t / 2.0);
        mx = std::max(mx, s.back());
      }
      for (double& t : s) sum += (t = std::exp(t - mx));
      for (int64_t x = 0; x < hd; ++x) {
        double o = 0;
        for (int64_t j = ds; j <= i; ++j) o += s[j - ds] / sum * v[j * hd + x];
        EXPECT_NEAR(out[i * H * hd + h * hd + x], o, 1e-12) << "query " << i << " head " << h;
      }
    }
  std::vector<double> dq(q.size(), 0.0), dk(k.size(), 0.0), dv(v.size(), 0.0);
  ops::attention_backward(dq.data(), dk.data(), dv.data(), R.data(), stats.data(), q.data(), k.data(), v.data(),
                          doc.data(), B, S, H, Hkv, hd);
  EXPECT_LT(check_grad(f, q, dq, 150), 1e-6);
  // f sums 1200 outputs, so round-off dominates central differences at h = 1e-5 here
  // (the error grows as h shrinks: 2e-6 -> 1.2e-5, 1e-5 -> 2.4e-6, 1e-4 -> 3.3e-7).
  EXPECT_LT(check_grad(f, k, dk, 150, 1e-4), 1e-6);
  EXPECT_LT(check_grad(f, v, dv, 150), 1e-6);
}

// The default attention reads q, k, v in place from the fused Q/K/V rows (model.cpp's
// qkv_layout): RoPE, the forward, the backward and the decode against a KV cache, with
// row strides, give the bits of the same calls on contiguous copies (float; two
// documents, several query tiles).
TEST(OpsGrad, AttentionReadsFusedQkvRowsInPlace) {
  const int64_t B = 1, S = 150, H = 4, Hkv = 2, hd = 8, N = B * S, qd = H * hd, kvd = Hkv * hd, ld = qd + 2 * kvd;
  std::mt19937_64 rng(31);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> qkv(N * ld), dout(N * qd);
  for (float& x : qkv) x = nd(rng);
  for (float& x : dout) x = nd(rng);
  std::vector<int32_t> doc(S, 0), pos(S), row(S, 0);
  for (int64_t i = 0; i < S; ++i) pos[i] = int32_t(i);
  for (int64_t i = 90; i < S; ++i) doc[i] = 1;
  auto part = [&](const std::vector<float>& src, int64_t at, int64_t w) {
    std::vector<float> v(N * w);
    for (int64_t i = 0; i < N; ++i) std::copy_n(src.data() + i * ld + at, w, v.data() + i * w);
    return v;
  };
  auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  };
  // RoPE on q and k in place in the rows equals RoPE on contiguous copies.
  std::vector<float> q = part(qkv, 0, qd), k = part(qkv, qd, kvd), v = part(qkv, qd + kvd, kvd);
  ops::rope_apply(q.data(), pos.data(), N, H, hd, 10000.0, +1);
  ops::rope_apply(k.data(), pos.data(), N, Hkv, hd, 10000.0, +1);
  ops::rope_apply(qkv.data(), pos.data(), N, H, hd, 10000.0, +1, ld);
  ops::rope_apply(qkv.data() + qd, pos.data(), N, Hkv, hd, 10000.0, +1, ld);
  EXPECT_TRUE(same(q, part(qkv, 0, qd)));
  EXPECT_TRUE(same(k, part(qkv, qd, kvd)));
  EXPECT_TRUE(same(v, part(qkv, qd + kvd, kvd)));  // v untouched
  std::vector<float> out_c(N * qd), out_f(N * qd), st_c(B * H * S * 2), st_f(B * H * S * 2);
  ops::attention_forward(out_c.data(), st_c.data(), q.data(), k.data(), v.data(), doc.data(), B, S, H, Hkv, hd);
  ops::attention_forward(out_f.data(), st_f.data(), qkv.data(), qkv.data() + qd, qkv.data() + qd + kvd, doc.data(), B,
                         S, H, Hkv, hd, static_cast<const float*>(nullptr), int64_t(0), ld, ld);
  EXPECT_TRUE(same(out_c, out_f));
  EXPECT_TRUE(same(st_c, st_f));
  std::vector<float> dq(N * qd, 0.f), dk(N * kvd, 0.f), dv(N * kvd, 0.f), dqkv(N * ld, 0.f);
  ops::attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), st_c.data(), q.data(), k.data(), v.data(),
                          doc.data(), B, S, H, Hkv, hd);
  ops::attention_backward(dqkv.data(), dqkv.data() + qd, dqkv.data() + qd + kvd, dout.data(), st_f.data(),
                          qkv.data(), qkv.data() + qd, qkv.data() + qd + kvd, doc.data(), B, S, H, Hkv, hd,
                          static_cast<const float*>(nullptr), static_cast<float*>(nullptr), int64_t(0), ld, ld);
  ops::rope_apply(dq.data(), pos.data(), N, H, hd, 10000.0, -1);
  ops::rope_apply(dk.data(), pos.data(), N, Hkv, hd, 10000.0, -1);
  ops::rope_apply(dqkv.data(), pos.data(), N, H, hd, 10000.0, -1, ld);
  ops::rope_apply(dqkv.data() + qd, pos.data(), N, Hkv, hd, 10000.0, -1, ld);
  EXPECT_TRUE(same(dq, part(dqkv, 0, qd)));
  EXPECT_TRUE(same(dk, part(dqkv, qd, kvd)));
  EXPECT_TRUE(same(dv, part(dqkv, qd + kvd, kvd)));
  // Decoding the first document's queries against a cache of its keys (cache row 0).
  const int64_t n = 90;
  std::vector<float> dec_c(n * qd), dec_f(n * qd);
  ops::attention_cached(dec_c.data(), q.data(), k.data(), v.data(), row.data(), pos.data(), n, S, H, Hkv, hd);
  ops::attention_cached(dec_f.data(), qkv.data(), k.data(), v.data(), row.data(), pos.data(), n, S, H, Hkv, hd,
                        static_cast<const float*>(nullptr), int64_t(0), ld);
  EXPECT_TRUE(same(dec_c, dec_f));
  EXPECT_TRUE(std::equal(dec_c.begin(), dec_c.end(), out_c.begin()));  // = the full forward's first document
}

TEST(OpsGrad, CrossEntropy) {
  const int64_t N = 5, V = 7;
  auto x = randn(N * V, 18);
  std::vector<int32_t> tgt = {3, -100, 0, 6, 2};
  std::vector<double> dx(N * V);
  auto f = [&] { return ops::cross_entropy_forward_backward<double>(nullptr, x.data(), tgt.data(), N, V, 1.0) / 4.0; };
  ops::cross_entropy_forward_backward(dx.data(), x.data(), tgt.data(), N, V, 0.25);
  EXPECT_LT(check_grad(f, x, dx), 1e-6);
  for (int64_t j = 0; j < V; ++j) EXPECT_EQ(dx[1 * V + j], 0.0);  // ignored row
}

// Gate and up weights in separate buffers (two GEMMs each way) and in one buffer (the
// parameter layout's [gate; up]: the fused GEMMs).
TEST(OpsGrad, MLP) {
  const int64_t N = 4, d = 6, F = 5;
  for (bool adjacent : {false, true}) {
    SCOPED_TRACE(adjacent ? "adjacent gate/up" : "separate gate/up");
    auto x = randn(N * d, 19), wgu = randn(2 * F * d, 20, 0.5), wd = randn(d * F, 22, 0.5);
    auto R = randn(N * d, 23);
    std::vector<double> wg(wgu.begin(), wgu.begin() + F * d), wu(wgu.begin() + F * d, wgu.end());
    std::vector<double> out(N * d), gu(2 * N * F), a(N * F), scratch;
    std::vector<double> dx(N * d, 0.0), dwgu(2 * F * d, 0.0), dwd(d * F, 0.0), dwg(F * d, 0.0), dwu(F * d, 0.0);
    double* pg = adjacent ? wgu.data() : wg.data();
    double* pu = adjacent ? wgu.data() + F * d : wu.data();
    double* pdg = adjacent ? dwgu.data() : dwg.data();
    double* pdu = adjacent ? dwgu.data() + F * d : dwu.data();
    auto f = [&] {
      mlp_forward(out.data(), gu.data(), a.data(), x.data(), pg, pu, wd.data(), N, d, F);
      return dot(out, R);
    };
    f();
    mlp_backward(dx.data(), pdg, pdu, dwd.data(), R.data(), x.data(), gu.data(), a.data(), pg, pu, wd.data(), N, d,
                 F, scratch);
    EXPECT_LT(check_grad(f, x, dx), 1e-6);
    if (adjacent) {
      EXPECT_LT(check_grad(f, wgu, dwgu), 1e-6);
    } else {
      EXPECT_LT(check_grad(f, wg, dwg), 1e-6);
      EXPECT_LT(check_grad(f, wu, dwu), 1e-6);
    }
    EXPECT_LT(check_grad(f, wd, dwd), 1e-6);
  }
}

// The fused gate/up GEMMs give the bits of two separate ones (mlp.hpp): F a multiple of
// the GEMM's K block (one 2F-long reduction for dx) and not (two GEMMs for dx), with
// swiglu_limit on, in float.
TEST(OpsGrad, MlpFusedGateUpChangesNoBit) {
  const int64_t N = 37, d = 48;
  for (int64_t F : {int64_t(kernels::kGemmKc), int64_t(80)}) {
    SCOPED_TRACE("F=" + std::to_string(F));
    std::mt19937_64 rng(static_cast<uint64_t>(F));
    std::normal_distribution<float> nd(0.f, 1.f);
    auto fill = [&](int64_t n, float scale) {
      std::vector<float> v(static_cast<size_t>(n));
      for (float& x : v) x = nd(rng) * scale;
      return v;
    };
    const auto x = fill(N * d, 1.f), wgu = fill(2 * F * d, 0.2f), wd = fill(d * F, 0.1f), dout = fill(N * d, 1.f);
    const std::vector<float> wg(wgu.begin(), wgu.begin() + F * d), wu(wgu.begin() + F * d, wgu.end());
    struct Run {
      std::vector<float> out, gu, a, dx, dwg, dwu, dwd;
    };
    auto run = [&](bool adjacent) {
      Run r{std::vector<float>(N * d), std::vector<float>(2 * N * F), std::vector<float>(N * F),
            std::vector<float>(N * d, 0.5f), {}, {}, std::vector<float>(d * F, 0.25f)};
      std::vector<float> dwgu(2 * F * d, 0.125f), dwg(F * d, 0.125f), dwu(F * d, 0.125f), scratch;
      const float* pg = adjacent ? wgu.data() : wg.data();
      const float* pu = adjacent ? wgu.data() + F * d : wu.data();
      float* pdg = adjacent ? dwgu.data() : dwg.data();
      float* pdu = adjacent ? dwgu.data() + F * d : dwu.data();
      mlp_forward(r.out.data(), r.gu.data(), r.a.data(), x.data(), pg, pu, wd.data(), N, d, F, 1.5);
      mlp_backward(r.dx.data(), pdg, pdu, r.dwd.data(), dout.data(), x.data(), r.gu.data(), r.a.data(), pg, pu,
                   wd.data(), N, d, F, scratch, 1.5);
      r.dwg.assign(pdg, pdg + F * d);
      r.dwu.assign(pdu, pdu + F * d);
      return r;
    };
    const Run sep = run(false), fused = run(true);
    auto same = [](const std::vector<float>& p, const std::vector<float>& q) {
      return p.size() == q.size() && std::memcmp(p.data(), q.data(), p.size() * sizeof(float)) == 0;
    };
    EXPECT_TRUE(same(sep.out, fused.out));
    EXPECT_TRUE(same(sep.gu, fused.gu));
    EXPECT_TRUE(same(sep.a, fused.a));
    EXPECT_TRUE(same(sep.dx, fused.dx));
    EXPECT_TRUE(same(sep.dwg, fused.dwg));
    EXPECT_TRUE(same(sep.dwu, fused.dwu));
    EXPECT_TRUE(same(sep.dwd, fused.dwd));
    int clamped = 0;  // the limit bites
    for (float v : fused.gu) clamped += std::fabs(v) > 1.5f;
    EXPECT_GT(clamped, 0);
  }
}

// Router: L = sum(weight * R) + balance losses, gradient with respect to the logits.
// Logits are spread out (scale 2) so no top-K or group choice is within h of a tie.
struct RouterCase {
  const char* name;
  nlohmann::json cfg;
};

class RouterGrad : public ::testing::TestWithParam<RouterCase> {};

TEST_P(RouterGrad, LogitsGradient) {
  auto cfg = ModelConfig::from_json(GetParam().cfg);
  const int rows = 2, S = 5;
  const int64_t N = rows * S, E = cfg.E(), K = cfg.K();
  auto logits = randn(N * E, 24, 2.0), R = randn(N * K, 25);
  std::vector<float> bias(E);
  for (int e = 0; e < E; ++e) bias[e] = 0.05f * float(e % 3) - 0.04f;
  const BalanceScales sc{cfg.aux_loss_coeff / 2, cfg.seq_aux_loss_coeff / 3, cfg.z_loss_coeff / 2};
  Routing<double> r0;
  route_select(r0, logits.data(), bias.data(), cfg, N);
  auto f = [&] {
    Routing<double> r;
    route_select(r, logits.data(), bias.data(), cfg, N);
    route_capacity(r, cfg.capacity_factor);
    // Selection must not change under the perturbation (away from ties).
    EXPECT_EQ(r.idx, r0.idx);
    double L = 0;
    for (int64_t i = 0; i < N * K; ++i) L += r.kept[i] ? r.weight[i] * R[i] : 0.0;
    auto bl = balance_forward(r, logits.data(), cfg, rows, S, sc);
    return L + bl.aux + bl.seq + bl.z;
  };
  Routing<double> r;
  route_select(r, logits.data(), bias.data(), cfg, N);
  route_capacity(r, cfg.capacity_factor);
  std::vector<double> dw(N * K), dl(N * E);
  for (int64_t i = 0; i < N * K; ++i) dw[i] = r.kept[i] ? R[i] : 0.0;
  router_backward(dl.data(), dw.data(), logits.data(), r, cfg, rows, S, sc);
  if (cfg.capacity_factor > 0) {
    EXPECT_GT(r.dropped, 0) << "the capacity case must drop pairs";
  }
  const double err = check_grad(f, logits, dl, 1000);
  std::printf("[ fd ] router %s: worst relative error %.2e\n", GetParam().name, err);
  EXPECT_LT(err, 1e-5) << GetParam().name;
}

INSTANTIATE_TEST_SUITE_P(
    Variants, RouterGrad,
    ::testing::Values(
        RouterCase{"sigmoid_noaux", {{"scoring_func", "sigmoid"}, {"topk_method", "noaux_tc"}, {"aux_loss_coeff", 0.1},
                                     {"seq_aux_loss_coeff", 0.2}, {"z_loss_coeff", 0.05}}},
        RouterCase{"softmax_greedy", {{"scoring_func", "softmax"}, {"topk_method", "greedy"}, {"aux_loss_coeff", 0.1},
                                      {"seq_aux_loss_coeff", 0.2}, {"z_loss_coeff", 0.05}}},
        RouterCase{"groups_noaux", {{"n_group", 4}, {"topk_group", 2}, {"num_experts_per_tok", 3}}},
        RouterCase{"groups_softmax_greedy",
                   {{"n_group", 2}, {"topk_group", 1}, {"scoring_func", "softmax"}, {"topk_method", "greedy"}}},
        RouterCase{"no_norm_scaled", {{"norm_topk_prob", false}, {"routed_scaling_factor", 2.5}}},
        RouterCase{"capacity", {{"capacity_factor", 0.5}, {"aux_loss_coeff", 0.1}}},
        RouterCase{"sqrtsoftplus_noaux", {{"scoring_func", "sqrtsoftplus"}, {"topk_method", "noaux_tc"},
                                          {"aux_loss_coeff", 0.1}, {"seq_aux_loss_coeff", 0.2}, {"z_loss_coeff", 0.05},
                                          {"routed_scaling_factor", 1.5}}},
        RouterCase{"sqrtsoftplus_groups_capacity", {{"scoring_func", "sqrtsoftplus"}, {"n_group", 4}, {"topk_group", 2},
                                                    {"capacity_factor", 0.5}, {"aux_loss_coeff", 0.1}}},
        RouterCase{"sqrtsoftplus_no_norm", {{"scoring_func", "sqrtsoftplus"}, {"norm_topk_prob", false},
                                            {"seq_aux_loss_coeff", 0.2}}}),
    [](const auto& info) { return std::string(info.param.name); });

// Hash routing (MODEL.md section 12): the selection is the table's row of each token id,
// so it never changes under a perturbation (no tie can flip it); the weights and the
// balance losses are live. Every scoring function, with capacity drops in one case.
class HashRouterGrad : public ::testing::TestWithParam<RouterCase> {};

TEST_P(HashRouterGrad, LogitsGradient) {
  nlohmann::json j = GetParam().cfg;
  j["n_routed_experts"] = 8;
  j["num_experts_per_tok"] = 3;
  j["vocab_size"] = 6;
  j["num_hash_layers"] = 1;
  auto cfg = ModelConfig::from_json(j);
  const int rows = 2, S = 5;
  const int64_t N = rows * S, E = cfg.E(), K = cfg.K();
  auto logits = randn(N * E, 26, 2.0), R = randn(N * K, 27);
  const std::vector<int32_t> table = init_tid2eid(cfg, 5, 1);
  std::vector<int32_t> ids(N);
  for (int64_t t = 0; t < N; ++t) ids[t] = int32_t((t * 7 + 3) % cfg.vocab_size);
  const BalanceScales sc{cfg.aux_loss_coeff / 2, cfg.seq_aux_loss_coeff / 3, cfg.z_loss_coeff / 2};
  auto route = [&](Routing<double>& r) {
    route_hash(r, logits.data(), ids.data(), table.data(), cfg, N);
    route_capacity(r, cfg.capacity_factor);
  };
  auto f = [&] {
    Routing<double> r;
    route(r);
    double L = 0;
    for (int64_t i = 0; i < N * K; ++i) L += r.kept[i] ? r.weight[i] * R[i] : 0.0;
    auto bl = balance_forward(r, logits.data(), cfg, rows, S, sc);
    return L + bl.aux + bl.seq + bl.z;
  };
  Routing<double> r;
  route(r);
  for (int64_t t = 0; t < N; ++t)
    for (int k = 0; k < K; ++k) ASSERT_EQ(r.idx[t * K + k], table[ids[t] * K + k]) << "token " << t;
  std::vector<double> dw(N * K), dl(N * E);
  for (int64_t i = 0; i < N * K; ++i) dw[i] = r.kept[i] ? R[i] : 0.0;
  router_backward(dl.data(), dw.data(), logits.data(), r, cfg, rows, S, sc);
  if (cfg.capacity_factor > 0) {
    EXPECT_GT(r.dropped, 0) << "the capacity case must drop pairs";
  }
  const double err = check_grad(f, logits, dl, 1000);
  std::printf("[ fd ] hash router %s: worst relative error %.2e\n", GetParam().name, err);
  EXPECT_LT(err, 1e-5) << GetParam().name;
}

INSTANTIATE_TEST_SUITE_P(
    Variants, HashRouterGrad,
    ::testing::Values(RouterCase{"sqrtsoftplus_all_losses", {{"scoring_func", "sqrtsoftplus"},
                                                             {"aux_loss_coeff", 0.1},
                                                             {"seq_aux_loss_coeff", 0.2},
                                                             {"z_loss_coeff", 0.05},
                                                             {"routed_scaling_factor", 2.0}}},
                      RouterCase{"sigmoid_capacity", {{"capacity_factor", 0.5}, {"aux_loss_coeff", 0.1}}},
                      RouterCase{"softmax_no_norm", {{"scoring_func", "softmax"}, {"norm_topk_prob", false},
                                                     {"seq_aux_loss_coeff", 0.2}}}),
    [](const auto& info) { return std::string(info.param.name); });

// The whole MoE layer (router + dispatch + experts + combine + shared expert).
class MoeLayerGrad : public ::testing::TestWithParam<RouterCase> {};

TEST_P(MoeLayerGrad, AllInputsAndWeights) {
  nlohmann::json j = GetParam().cfg;
  j["hidden_size"] = 8;
  j["num_attention_heads"] = 2;
  j["moe_intermediate_size"] = 4;
  auto cfg = ModelConfig::from_json(j);
  const int rows = 2, S = 4;
  const int64_t N = rows * S, d = cfg.d(), E = cfg.E(), F = cfg.F(), Sh = cfg.shared_width();
  auto x = randn(N * d, 30), gate = randn(E * d, 31, 1.0), R = randn(N * d, 32);
  std::vector<std::vector<double>> wg, wu, wd;
  for (int e = 0; e < E; ++e) {
    wg.push_back(randn(F * d, 40 + e, 0.5));
    wu.push_back(randn(F * d, 60 + e, 0.5));
    wd.push_back(randn(d * F, 80 + e, 0.5));
  }
  auto sg = randn(std::max<int64_t>(Sh, 1) * d, 100, 0.5), su = randn(std::max<int64_t>(Sh, 1) * d, 101, 0.5),
       sd = randn(d * std::max<int64_t>(Sh, 1), 102, 0.5);
  std::vector<float> bias(E, 0.f);
  bias[1] = 0.03f;
  MoeWeights<double> w;
  w.gate = gate.data();
  if (Sh > 0) {
    w.sg = sg.data();
    w.su = su.data();
    w.sd = sd.data();
  }
  std::vector<std::vector<double>> dwg(E, std::vector<double>(F * d, 0.0)), dwu = dwg, dwd = dwg;
  ExpertViews<double> views;
  views.swiglu_limit = cfg.swiglu_limit;
  for (int e = 0; e < E; ++e) {
    views.wg.push_back(wg[e].data());
    views.wu.push_back(wu[e].data());
    views.wd.push_back(wd[e].data());
    views.dwg.push_back(dwg[e].data());
    views.dwu.push_back(dwu[e].data());
    views.dwd.push_back(dwd[e].data());
  }
  LocalExpertStage<double> stage(d, F, [&](int) -> const ExpertViews<double>& { return views; });
  const BalanceScales sc{cfg.aux_loss_coeff, cfg.seq_aux_loss_coeff / rows, cfg.z_loss_coeff};
  // A hash-routed layer: its table and the tokens' ids.
  RouteControl rc;
  const std::vector<int32_t> table = init_tid2eid(cfg, 3, 1);
  std::vector<int32_t> ids(N);
  for (int64_t t = 0; t < N; ++t) ids[t] = int32_t((t * 5 + 1) % cfg.vocab_size);
  if (cfg.num_hash_layers > 0) {
    rc.tid2eid = table.data();
    rc.token_ids = ids.data();
  }
  std::vector<double> out(N * d);
  MoeCache<double> cache;
  std::vector<int32_t> idx0;
  auto f = [&] {
    moe_forward(out.data(), cache, x.data(), w, stage, 0, bias.data(), cfg, rows, S, sc, rc);
    if (idx0.empty()) idx0 = cache.routing.idx;
    EXPECT_EQ(cache.routing.idx, idx0);
    return dot(out, R) + cache.losses.aux + cache.losses.seq + cache.losses.z;
  };
  f();
  std::vector<double> dx(N * d, 0.0), dgate(E * d, 0.0);
  MoeScratch<double> scratch;
  std::vector<double> dsg(sg.size(), 0.0), dsu(su.size(), 0.0), dsd(sd.size(), 0.0);
  MoeGrads<double> g;
  g.gate = dgate.data();
  g.sg = dsg.data();
  g.su = dsu.data();
  g.sd = dsd.data();
  moe_backward(dx.data(), g, R.data(), x.data(), w, stage, 0, cache, cfg, rows, S, sc, scratch);
  if (cfg.capacity_factor > 0) {
    EXPECT_GT(cache.routing.dropped, 0) << "the capacity case must drop pairs";
  }
  if (cfg.num_hash_layers > 0) {
    for (int64_t t = 0; t < N; ++t)
      for (int k = 0; k < cfg.K(); ++k) EXPECT_EQ(cache.routing.idx[t * cfg.K() + k], table[ids[t] * cfg.K() + k]);
  }
  if (cfg.swiglu_limit > 0) {  // the limit must bite in both the routed and the shared experts
    const double c = cfg.swiglu_limit;
    auto clamped = [&](const MlpCache<double>& m, int64_t width) {  // gu rows: width g, then width u
      int n = 0;
      for (size_t i = 0; i < m.gu.size(); ++i)
        n += int64_t(i) % (2 * width) < width ? m.gu[i] > c : std::fabs(m.gu[i]) > c;
      return n;
    };
    int routed = 0;  // gate/up values of the routed pairs beyond the limit
    for (int64_t t = 0; t < N; ++t)
      for (int k = 0; k < cfg.K(); ++k) {
        const int e = cache.routing.idx[t * cfg.K() + k];
        for (int64_t fi = 0; fi < F; ++fi) {
          double gv = 0, uv = 0;
          for (int64_t i = 0; i < d; ++i) {
            gv += x[t * d + i] * wg[e][fi * d + i];
            uv += x[t * d + i] * wu[e][fi * d + i];
          }
          routed += (gv > c) + (std::fabs(uv) > c);
        }
      }
    EXPECT_GT(routed, 0);
    if (Sh > 0) {
      EXPECT_GT(clamped(cache.shared, Sh), 0);
    }
  }
  EXPECT_LT(check_grad(f, x, dx, 100), 1e-5);
  EXPECT_LT(check_grad(f, gate, dgate, 100), 1e-5);
  for (int e = 0; e < E; ++e) {
    EXPECT_LT(check_grad(f, wg[e], dwg[e], 24), 1e-5) << "expert " << e;
    EXPECT_LT(check_grad(f, wu[e], dwu[e], 24), 1e-5) << "expert " << e;
    EXPECT_LT(check_grad(f, wd[e], dwd[e], 24), 1e-5) << "expert " << e;
  }
  if (Sh > 0) {
    EXPECT_LT(check_grad(f, sg, dsg, 24), 1e-5) << "shared gate projection";
    EXPECT_LT(check_grad(f, su, dsu, 24), 1e-5) << "shared up projection";
    EXPECT_LT(check_grad(f, sd, dsd, 24), 1e-5) << "shared down projection";
  }
}

INSTANTIATE_TEST_SUITE_P(
    Variants, MoeLayerGrad,
    ::testing::Values(RouterCase{"sigmoid_shared_balance", {{"n_routed_experts", 4}, {"aux_loss_coeff", 0.1},
                                                            {"seq_aux_loss_coeff", 0.1}, {"z_loss_coeff", 0.01}}},
                      RouterCase{"softmax_noshared_capacity", {{"n_routed_experts", 4}, {"scoring_func", "softmax"},
                                                               {"topk_method", "greedy"}, {"n_shared_experts", 0},
                                                               {"capacity_factor", 0.75}}},
                      RouterCase{"groups", {{"n_routed_experts", 8}, {"n_group", 4}, {"topk_group", 2}}},
                      RouterCase{"sqrtsoftplus_swiglu_limit", {{"n_routed_experts", 4}, {"scoring_func", "sqrtsoftplus"},
                                                               {"swiglu_limit", 0.6}, {"aux_loss_coeff", 0.1},
                                                               {"seq_aux_loss_coeff", 0.1}}},
                      RouterCase{"hash_sqrtsoftplus_swiglu_limit_capacity",
                                 {{"n_routed_experts", 4}, {"scoring_func", "sqrtsoftplus"}, {"num_hash_layers", 1},
                                  {"vocab_size", 5}, {"swiglu_limit", 0.6}, {"capacity_factor", 0.75},
                                  {"aux_loss_coeff", 0.1}, {"z_loss_coeff", 0.01}}}),
    [](const auto& info) { return std::string(info.param.name); });

// Dispatch then combine with weight 1/K returns the input (dropless), and so does the
// backward: the gradient of the round trip is the identity.
TEST(Dispatch, RoundTripWithWeightOneOverK) {
  auto cfg = ModelConfig::from_json({{"n_routed_experts", 4}, {"num_experts_per_tok", 2}, {"hidden_size", 8}});
  const int64_t N = 9, d = 8, K = 2;
  auto logits = randn(N * 4, 50), x = randn(N * d, 51);
  std::vector<float> bias(4, 0.f);
  Routing<double> r;
  route_select(r, logits.data(), bias.data(), cfg, N);
  for (auto& w : r.weight) w = 1.0 / K;
  auto p = make_permutation(r);
  ASSERT_EQ(p.pairs(), N * K);
  std::vector<double> xp(p.pairs() * d), y(N * d, 0.0);
  dispatch_forward(xp.data(), x.data(), p, d);
  combine_forward(y.data(), xp.data(), r.weight.data(), p, d);
  for (int64_t i = 0; i < N * d; ++i) EXPECT_NEAR(y[i], x[i], 1e-12);
  // Backward: combine^T then dispatch^T of dy gives dy back.
  auto dy = randn(N * d, 52);
  std::vector<double> dxp(p.pairs() * d), dw(N * K), dx(N * d, 0.0);
  combine_backward(dxp.data(), dw.data(), dy.data(), xp.data(), r.weight.data(), p, d);
  dispatch_backward(dx.data(), dxp.data(), p, d);
  for (int64_t i = 0; i < N * d; ++i) EXPECT_NEAR(dx[i], dy[i], 1e-12);
  // Expert slices are contiguous and tokens inside a slice are in increasing order.
  for (int e = 0; e < 4; ++e)
    for (int64_t i = p.offsets[e] + 1; i < p.offsets[e + 1]; ++i) EXPECT_LT(p.pair_token[i - 1], p.pair_token[i]);
}

// mHC connection of a sub-block (moe/hc.hpp): mix, pre/post/comb with Sinkhorn, the
// collapse u and the expansion Xo = post y + comb^T X, with y an independent input, so
// L = <u, Ru> + <Xo, RX> reaches every coefficient. n = 3 streams, 3 Sinkhorn rounds and
// a large hc_eps, so every eps term counts.
TEST(OpsGrad, HyperConnectionSubBlock) {
  for (const int iters : {1, 3}) {
    const int64_t N = 5, n = 3, d = 4, M = (2 + n) * n, K = n * d;
    const hc::HcShape sh{n, d, iters, 0.05, 1e-6, false};
    auto X = randn(N * K, 21), fn = randn(M * K, 22, 0.5), base = randn(M, 23, 0.5), scale = randn(3, 24);
    auto y = randn(N * d, 25), Ru = randn(N * d, 26), RX = randn(N * K, 27);
    std::vector<double> u(N * d), Xo(N * K);
    hc::HcState<double> s;
    auto f = [&] {
      hc::enter_forward(u.data(), s, X.data(), hc::HcWeights<double>{fn.data(), base.data(), scale.data()}, N, sh);
      hc::leave_forward(Xo.data(), y.data(), X.data(), s, N, sh);
      return dot(u, Ru) + dot(Xo, RX);
    };
    f();
    std::vector<double> dX(N * K), dy(N * d), dfn(M * K, 0.0), dbase(M, 0.0), dscale(3, 0.0);
    hc::HcWork<double> work;
    hc::leave_backward(dy.data(), dX.data(), work, RX.data(), y.data(), X.data(), s, N, sh);
    hc::enter_backward(dX.data(), hc::HcGrads<double>{dfn.data(), dbase.data(), dscale.data()}, Ru.data(), X.data(), s,
                       hc::HcWeights<double>{fn.data(), base.data(), scale.data()}, work, N, sh);
    EXPECT_LT(check_grad(f, X, dX), 1e-6) << "iters " << iters;
    EXPECT_LT(check_grad(f, y, dy), 1e-6) << "iters " << iters;
    EXPECT_LT(check_grad(f, fn, dfn), 1e-6) << "iters " << iters;
    EXPECT_LT(check_grad(f, base, dbase), 1e-6) << "iters " << iters;
    EXPECT_LT(check_grad(f, scale, dscale), 1e-6) << "iters " << iters;
  }
}

// Sinkhorn's comb is (nearly) doubly stochastic after enough rounds, and pre/post lie in
// their ranges: the forward is the formula of MODEL.md section 12.
TEST(OpsGrad, HyperConnectionCombIsDoublyStochastic) {
  const int64_t N = 3, n = 4, d = 2, M = (2 + n) * n, K = n * d;
  const hc::HcShape sh{n, d, 20, 1e-6, 1e-6, false};
  auto X = randn(N * K, 31), fn = randn(M * K, 32), base = randn(M, 33), scale = randn(3, 34);
  std::vector<double> u(N * d);
  hc::HcState<double> s;
  hc::enter_forward(u.data(), s, X.data(), hc::HcWeights<double>{fn.data(), base.data(), scale.data()}, N, sh);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t a = 0; a < n; ++a) {
      double row = 0, col = 0;
      for (int64_t b = 0; b < n; ++b) {
        row += s.comb[i * n * n + a * n + b];
        col += s.comb[i * n * n + b * n + a];
      }
      EXPECT_NEAR(row, 1.0, 1e-3);
      EXPECT_NEAR(col, 1.0, 1e-5);
      EXPECT_GT(s.pre[i * n + a], 0.0);
      EXPECT_LT(s.pre[i * n + a], 1.0 + 1e-5);
      EXPECT_GT(s.post[i * n + a], 0.0);
      EXPECT_LT(s.post[i * n + a], 2.0);
    }
}

// The head's collapse (hc_head: fn (n, n d), base (n), scale (1); pre only).
TEST(OpsGrad, HyperConnectionHead) {
  const int64_t N = 4, n = 3, d = 5, K = n * d;
  const hc::HcShape sh{n, d, 20, 0.05, 1e-6, true};
  auto X = randn(N * K, 41), fn = randn(n * K, 42, 0.5), base = randn(n, 43), scale = randn(1, 44);
  auto Ru = randn(N * d, 45);
  std::vector<double> u(N * d);
  hc::HcState<double> s;
  auto f = [&] {
    hc::enter_forward(u.data(), s, X.data(), hc::HcWeights<double>{fn.data(), base.data(), scale.data()}, N, sh);
    return dot(u, Ru);
  };
  f();
  std::vector<double> dX(N * K, 0.0), dfn(n * K, 0.0), dbase(n, 0.0), dscale(1, 0.0);
  hc::HcWork<double> work;
  hc::enter_backward(dX.data(), hc::HcGrads<double>{dfn.data(), dbase.data(), dscale.data()}, Ru.data(), X.data(), s,
                     hc::HcWeights<double>{fn.data(), base.data(), scale.data()}, work, N, sh);
  EXPECT_LT(check_grad(f, X, dX), 1e-6);
  EXPECT_LT(check_grad(f, fn, dfn), 1e-6);
  EXPECT_LT(check_grad(f, base, dbase), 1e-6);
  EXPECT_LT(check_grad(f, scale, dscale), 1e-6);
}

// The MTP block's input (moe/mtp.hpp): h' = e_proj(RMSNorm(e; enorm)) + h_proj(RMSNorm(h; hnorm)).
TEST(OpsGrad, MtpInputCombination) {
  const int64_t N = 5, d = 6;
  auto e = randn(N * d, 51), h = randn(N * d, 52), en = randn(d, 53), hn = randn(d, 54);
  auto We = randn(d * d, 55, 0.5), Wh = randn(d * d, 56, 0.5), R = randn(N * d, 57);
  std::vector<double> out(N * d), e_n(N * d), e_r(N), h_n(N * d), h_r(N), work;
  auto f = [&] {
    mtp_input_forward(out.data(), e_n.data(), e_r.data(), h_n.data(), h_r.data(), e.data(), h.data(), en.data(),
                      hn.data(), We.data(), Wh.data(), N, d, 1e-6);
    return dot(out, R);
  };
  f();
  std::vector<double> de(N * d, 0.0), dh(N * d, 0.0), den(d, 0.0), dhn(d, 0.0), dWe(d * d, 0.0), dWh(d * d, 0.0);
  mtp_input_backward(de.data(), dh.data(), den.data(), dhn.data(), dWe.data(), dWh.data(), R.data(), e.data(),
                     h.data(), e_n.data(), e_r.data(), h_n.data(), h_r.data(), en.data(), hn.data(), We.data(),
                     Wh.data(), N, d, work);
  EXPECT_LT(check_grad(f, e, de), 1e-6);
  EXPECT_LT(check_grad(f, h, dh), 1e-6);
  EXPECT_LT(check_grad(f, en, den), 1e-6);
  EXPECT_LT(check_grad(f, hn, dhn), 1e-6);
  EXPECT_LT(check_grad(f, We, dWe), 1e-6);
  EXPECT_LT(check_grad(f, Wh, dWh), 1e-6);
}
