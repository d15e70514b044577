// DeepSeek-V4 attention (MODEL.md section 12) op by op, in double against central
// differences: the unweighted per-head RMS norm, the partial interleaved RoPE and its
// inverse, the sinks, the sliding window (shorter than the rows, across documents and
// query tiles), the grouped output projection, and the whole sub-block. Also: the
// cached decode's attention equals the full forward's bit for bit with sinks and a
// window, and the sinks at -inf are the plain softmax.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "moe/attention_v4.hpp"
#include "moe/config.hpp"
#include "moe/ops.hpp"
#include "moe/params.hpp"
#include "test_util.hpp"

using namespace moetune;
using namespace moetune::testing;

namespace {

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// The attention of query i, head h computed naively: softmax over the keys
// [max(ds, i-W+1), i] of its document (W = 0: all) plus the sink in the denominator.
double naive_attention(const std::vector<double>& q, const std::vector<double>& kv, const std::vector<int32_t>& doc,
                       int64_t i, int64_t h, int64_t x, int64_t H, int64_t hd, int64_t W, double sink) {
  int64_t ds = i;
  while (ds > 0 && doc[ds - 1] == doc[i]) --ds;
  const int64_t lo = W > 0 ? std::max(ds, i - W + 1) : ds;
  std::vector<double> s;
  double mx = sink;
  for (int64_t j = lo; j <= i; ++j) {
    double t = 0;
    for (int64_t c = 0; c < hd; ++c) t += q[(i * H + h) * hd + c] * kv[j * hd + c];
    s.push_back(t / std::sqrt(double(hd)));
    mx = std::max(mx, s.back());
  }
  double sum = std::exp(sink - mx), o = 0;
  for (double& t : s) sum += (t = std::exp(t - mx));
  for (int64_t j = lo; j <= i; ++j) o += s[j - lo] * kv[j * hd + x];
  return o / sum;
}

}  // namespace

// The per-head q normalisation: rmsnorm without a weight over rows of head_dim.
TEST(AttentionV4Grad, UnweightedHeadRmsNorm) {
  const int64_t N = 4, H = 3, hd = 6;
  auto x = randn(N * H * hd, 1), R = randn(N * H * hd, 2);
  std::vector<double> out(x.size()), rstd(N * H), dx(x.size(), 0.0);
  auto f = [&] {
    ops::rmsnorm_forward(out.data(), rstd.data(), x.data(), static_cast<const double*>(nullptr), N * H, hd, 1e-6);
    return dot(out, R);
  };
  f();
  ops::rmsnorm_backward(dx.data(), static_cast<double*>(nullptr), R.data(), x.data(),
                        static_cast<const double*>(nullptr), rstd.data(), N * H, hd);
  EXPECT_LT(check_grad(f, x, dx), 1e-6);
  f();  // (check_grad leaves out at a perturbed x)
  // Each head has mean square 1 (up to eps); a weight of ones gives the same bits.
  for (int64_t r = 0; r < N * H; ++r) {
    double ms = 0;
    for (int64_t c = 0; c < hd; ++c) ms += out[r * hd + c] * out[r * hd + c];
    EXPECT_NEAR(ms / hd, 1.0, 1e-5);
  }
  std::vector<double> ones(hd, 1.0), out1(x.size()), rstd1(N * H);
  ops::rmsnorm_forward(out1.data(), rstd1.data(), x.data(), ones.data(), N * H, hd, 1e-6);
  EXPECT_EQ(0, std::memcmp(out.data(), out1.data(), out.size() * sizeof(double)));
}

// RoPE on the last rd of hd channels, interleaved pairs (2f, 2f+1) at angle
// pos * theta^(-2f/rd): the gradient of the rotation is the inverse rotation; the
// leading hd - rd channels are untouched; the inverse undoes the forward.
TEST(AttentionV4Grad, PartialInterleavedRope) {
  const int64_t N = 5, nh = 2, hd = 8, rd = 4;
  const double theta = 10000.0;
  auto x = randn(N * nh * hd, 3), R = randn(N * nh * hd, 4);
  std::vector<int32_t> pos = {0, 1, 2, 7, 3};
  for (int sign : {+1, -1}) {
    auto f = [&] {
      auto y = x;
      ops::rope_rotate(y.data(), pos.data(), N, nh, hd, rd, true, theta, sign);
      return dot(y, R);
    };
    auto dx = R;
    ops::rope_rotate(dx.data(), pos.data(), N, nh, hd, rd, true, theta, -sign);
    EXPECT_LT(check_grad(f, x, dx), 1e-6) << "sign " << sign;
  }
  auto y = x;
  ops::rope_rotate(y.data(), pos.data(), N, nh, hd, rd, true, theta, +1);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t h = 0; h < nh; ++h) {
      const double* a = x.data() + (i * nh + h) * hd;
      const double* b = y.data() + (i * nh + h) * hd;
      for (int64_t c = 0; c < hd - rd; ++c) EXPECT_EQ(a[c], b[c]);  // no-RoPE channels
      for (int64_t f = 0; f < rd / 2; ++f) {  // the interleaved pair (2f, 2f+1)
        const double ang = pos[i] * std::pow(theta, -2.0 * f / rd);
        const double x0 = a[hd - rd + 2 * f], x1 = a[hd - rd + 2 * f + 1];
        EXPECT_NEAR(b[hd - rd + 2 * f], x0 * std::cos(ang) - x1 * std::sin(ang), 1e-12);
        EXPECT_NEAR(b[hd - rd + 2 * f + 1], x1 * std::cos(ang) + x0 * std::sin(ang), 1e-12);
      }
    }
  ops::rope_rotate(y.data(), pos.data(), N, nh, hd, rd, true, theta, -1);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(y[i], x[i], 1e-12);
  // rd = 0 is the identity; the Llama layout (rotate_half over all hd) is rope_apply.
  auto z = x;
  ops::rope_rotate(z.data(), pos.data(), N, nh, hd, int64_t(0), true, theta, +1);
  EXPECT_EQ(0, std::memcmp(z.data(), x.data(), x.size() * sizeof(double)));
  auto u = x, w = x;
  ops::rope_rotate(u.data(), pos.data(), N, nh, hd, hd, false, theta, +1);
  ops::rope_apply(w.data(), pos.data(), N, nh, hd, theta, +1);
  EXPECT_EQ(0, std::memcmp(u.data(), w.data(), x.size() * sizeof(double)));
}

// Sinks and a sliding window W < S, with two documents in row 0 and queries in
// three tiles of kAttnTile: output against the naive formula, gradients of q, the
// shared kv (the same buffer as key and value) and the sinks against finite differences.
TEST(AttentionV4Grad, SinksSlidingWindowDocuments) {
  struct Shape {
    int64_t S, W;
  };
  for (const Shape sh : {Shape{7, 3}, Shape{7, 0}, Shape{150, 40}}) {
    const int64_t B = 2, S = sh.S, W = sh.W, H = 2, hd = 4, N = B * S;
    auto q = randn(N * H * hd, 5), kv = randn(N * hd, 6), R = randn(N * H * hd, 7);
    std::vector<double> sinks = {0.7, -1.3};
    std::vector<int32_t> doc(N, 0);
    const int64_t cut = S == 7 ? 4 : 70;  // row 0: documents [0, cut) and [cut, S)
    for (int64_t i = cut; i < S; ++i) doc[i] = 1;
    std::vector<double> out(N * H * hd), stats(B * H * S * 2);
    auto f = [&] {
      ops::attention_forward(out.data(), stats.data(), q.data(), kv.data(), kv.data(), doc.data(), B, S, H, int64_t(1),
                             hd, sinks.data(), W);
      return dot(out, R);
    };
    f();
    for (int64_t i : {int64_t(0), int64_t(3), cut, S - 1, S + 2, N - 1})
      for (int64_t h = 0; h < H; ++h)
        for (int64_t x = 0; x < hd; ++x)
          EXPECT_NEAR(out[(i * H + h) * hd + x], naive_attention(q, kv, doc, i, h, x, H, hd, W, sinks[h]), 1e-12)
              << "S " << S << " W " << W << " query " << i;
    std::vector<double> dq(q.size(), 0.0), dkv(kv.size(), 0.0), dsinks(H, 0.0);
    ops::attention_backward(dq.data(), dkv.data(), dkv.data(), R.data(), stats.data(), q.data(), kv.data(), kv.data(),
                            doc.data(), B, S, H, int64_t(1), hd, sinks.data(), dsinks.data(), W);
    const double h = S > 100 ? 1e-4 : 1e-5;  // many outputs: round-off (see OpsGrad.AttentionAcrossTiles)
    EXPECT_LT(check_grad(f, q, dq, 150, h), 1e-6) << "S " << S << " W " << W;
    EXPECT_LT(check_grad(f, kv, dkv, 150, h), 1e-6) << "S " << S << " W " << W;
    EXPECT_LT(check_grad(f, sinks, dsinks, 2, h), 1e-6) << "S " << S << " W " << W;
  }
}

// A sink of -inf is no sink (the plain softmax, every bit); a very large sink takes
// all the probability mass (the output goes to 0).
TEST(AttentionV4Grad, SinkMinusInfinityIsPlainSoftmax) {
  const int64_t B = 1, S = 9, H = 2, hd = 4, N = B * S;
  auto q = randn(N * H * hd, 8), kv = randn(N * hd, 9);
  std::vector<int32_t> doc(N, 0);
  std::vector<double> a(N * H * hd), b(N * H * hd), st(B * H * S * 2);
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> sinks = {-inf, -inf};
  ops::attention_forward(a.data(), st.data(), q.data(), kv.data(), kv.data(), doc.data(), B, S, H, int64_t(1), hd);
  ops::attention_forward(b.data(), st.data(), q.data(), kv.data(), kv.data(), doc.data(), B, S, H, int64_t(1), hd,
                         sinks.data());
  EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(double)));
  sinks = {200.0, 200.0};
  ops::attention_forward(b.data(), st.data(), q.data(), kv.data(), kv.data(), doc.data(), B, S, H, int64_t(1), hd,
                         sinks.data());
  for (double v : b) EXPECT_LT(std::fabs(v), 1e-60);
}

// attention_cached (decoding) equals attention_forward bit for bit with sinks and a
// window, for queries in several tiles (the first key of a query's tile is the same).
TEST(AttentionV4Grad, CachedEqualsForwardWithSinksAndWindow) {
  for (int64_t W : {int64_t(0), int64_t(1), int64_t(40), int64_t(64), int64_t(100)}) {
    const int64_t S = 150, H = 2, hd = 4;
    auto qd = randn(S * H * hd, 10), kd = randn(S * hd, 11);
    std::vector<float> q(qd.begin(), qd.end()), kv(kd.begin(), kd.end()), sinks = {0.3f, -0.4f};
    std::vector<int32_t> doc(S, 0), pos(S), row(S, 0);
    for (int64_t i = 0; i < S; ++i) pos[i] = int32_t(i);
    std::vector<float> full(S * H * hd), st(H * S * 2), dec(S * H * hd);
    ops::attention_forward(full.data(), st.data(), q.data(), kv.data(), kv.data(), doc.data(), int64_t(1), S, H,
                           int64_t(1), hd, sinks.data(), W);
    ops::attention_cached(dec.data(), q.data(), kv.data(), kv.data(), row.data(), pos.data(), S, S, H, int64_t(1), hd,
                          sinks.data(), W);
    EXPECT_EQ(0, std::memcmp(full.data(), dec.data(), full.size() * sizeof(float))) << "window " << W;
  }
}

TEST(AttentionV4Grad, GroupedOutputProjection) {
  const int64_t N = 5, I = 12, G = 3, r = 2;
  auto x = randn(N * I, 12), w = randn(G * r * (I / G), 13), R = randn(N * G * r, 14);
  std::vector<double> out(N * G * r), dx(x.size(), 0.0), dw(w.size(), 0.0);
  auto f = [&] {
    ops::grouped_linear_forward(out.data(), x.data(), w.data(), N, I, G, r);
    return dot(out, R);
  };
  f();
  // Group g's outputs are its block of w times its columns of x only.
  for (int64_t i = 0; i < N; ++i)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t o = 0; o < r; ++o) {
        double s = 0;
        for (int64_t c = 0; c < I / G; ++c) s += w[(g * r + o) * (I / G) + c] * x[i * I + g * (I / G) + c];
        EXPECT_NEAR(out[i * G * r + g * r + o], s, 1e-12);
      }
  ops::grouped_linear_backward(dx.data(), dw.data(), R.data(), x.data(), w.data(), N, I, G, r);
  EXPECT_LT(check_grad(f, x, dx), 1e-6);
  EXPECT_LT(check_grad(f, w, dw), 1e-6);
}

// The whole sub-block (attention_v4_forward / _backward) over a flat parameter
// buffer: every tensor and the input against finite differences, with a window
// shorter than the rows and a document boundary.
TEST(AttentionV4Grad, WholeSubBlock) {
  for (int window : {0, 3}) {
    const ModelConfig c = ModelConfig::from_json({{"vocab_size", 8},
                                                  {"hidden_size", 8},
                                                  {"num_hidden_layers", 1},
                                                  {"num_attention_heads", 4},
                                                  {"head_dim", 6},
                                                  {"attention_type", "v4"},
                                                  {"q_lora_rank", 5},
                                                  {"qk_rope_head_dim", 4},
                                                  {"sliding_window", window},
                                                  {"o_groups", 2},
                                                  {"o_lora_rank", 3},
                                                  {"first_k_dense_replace", 1}});
    const ParamLayout layout = ParamLayout::build(c);
    std::vector<double> P = randn(layout.total(), 15, 0.4);
    for (const auto& t : layout.tensors())  // norms near 1, sinks away from 0
      if (t.shape.size() == 1)
        for (size_t i = 0; i < t.numel; ++i) P[t.offset + i] += 1.0;
    auto off = [&](const char* rest) { return layout.offset(ParamLayout::layer(0, rest)); };
    AttentionV4Offsets W;
    W.q_a = off("self_attn.q_a_proj.weight");
    W.q_a_norm = off("self_attn.q_a_norm.weight");
    W.q_b = off("self_attn.q_b_proj.weight");
    W.kv = off("self_attn.kv_proj.weight");
    W.kv_norm = off("self_attn.kv_norm.weight");
    W.o_a = off("self_attn.o_a_proj.weight");
    W.o_b = off("self_attn.o_b_proj.weight");
    W.sinks = off("self_attn.sinks");
    const int64_t B = 2, S = 7, N = B * S, d = c.d();
    std::vector<int32_t> doc = {0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0}, pos(N);
    for (int64_t i = 0; i < N; ++i) pos[i] = (i % S == 0 || doc[i] != doc[i - 1]) ? 0 : pos[i - 1] + 1;
    auto a = randn(N * d, 16), R = randn(N * d, 17);
    AttentionV4Cache<double> L;
    std::vector<double> out(N * d);
    auto f = [&] {
      attention_v4_forward(out.data(), L, W, P.data(), a.data(), pos.data(), doc.data(), B, S, c);
      return dot(out, R);
    };
    f();
    std::vector<double> G(P.size(), 0.0), da(a.size(), 0.0);
    AttentionV4Scratch<double> X;
    attention_v4_backward(da.data(), G.data(), R.data(), L, W, P.data(), a.data(), pos.data(), doc.data(), B, S, c, X);
    double worst_all = check_grad(f, a, da);
    EXPECT_LT(worst_all, 1e-6) << "window " << window;
    for (const auto& t : layout.tensors()) {
      if (t.name.find("self_attn") == std::string::npos) continue;
      std::vector<double> x(P.begin() + t.offset, P.begin() + t.offset + t.numel);
      std::vector<double> g(G.begin() + t.offset, G.begin() + t.offset + t.numel);
      double gmax = 0, worst = 0;
      for (double v : g) gmax = std::max(gmax, std::fabs(v));
      for (size_t i = 0; i < t.numel; ++i)
        worst = std::max(worst, rel_err(fd(f, P[t.offset + i], 1e-5), g[i], 1e-5 * (1 + gmax)));
      // (as the whole-model check: the normalisations' curvature puts central differences
      // at h = 1e-5 a few 1e-6 off for the norm weights)
      EXPECT_LT(worst, 1e-5) << t.name << " window " << window;
      worst_all = std::max(worst_all, worst);
    }
    std::printf("[ fd ] V4 attention sub-block, window %d: worst relative error %.2e\n", window, worst_all);
  }
}
