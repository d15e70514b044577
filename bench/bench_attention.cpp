// The attention core of training (ops::attention_forward / attention_backward: scores,
// causal document-masked softmax, probabilities times values, and their backward), in
// float, on the shapes of the example configs, with the packed documents of
// `moetune bench` (synthetic lengths 8..48) or one document per row. Reports achieved
// GFLOP/s over the work actually done (the causal pairs inside each document, 4 * hd
// FLOPs per query-key pair and head forward, 8 * hd backward) and tokens/s.
//
//   ./build/bench/moetune_bench_attention --benchmark_counters_tabular=true
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "moe/ops.hpp"

using namespace moetune;

namespace {

struct Shape {
  int64_t B, S, H, Hkv, hd;
  bool short_docs;  // synthetic documents of 8..48 tokens (as `moetune bench`) or one per row
};

// args: config (0 = small.json, 1 = d512.json), short documents (1) or one per row (0)
Shape shape_of(const benchmark::State& state) {
  const bool short_docs = state.range(1) != 0;
  if (state.range(0) == 0) return {8, 128, 8, 4, 32, short_docs};
  return {4, 512, 8, 4, 64, short_docs};
}

struct Inputs {
  std::vector<float> qkv, out, stats, dout, dqkv;
  std::vector<int32_t> doc;
  double pairs = 0;  // causal (query, key) pairs inside documents, over rows
};

Inputs make_inputs(const Shape& s) {
  std::mt19937_64 g(7);
  std::normal_distribution<float> nd(0.f, 1.f);
  Inputs in;
  const int64_t N = s.B * s.S, w = (s.H + 2 * s.Hkv) * s.hd;
  in.qkv.resize(size_t(N * w));
  for (auto& x : in.qkv) x = nd(g);
  in.dout.resize(size_t(N * s.H * s.hd));
  for (auto& x : in.dout) x = nd(g);
  in.out.assign(size_t(N * s.H * s.hd), 0.f);
  in.stats.assign(size_t(s.B * s.H * s.S * 2), 0.f);
  in.dqkv.assign(in.qkv.size(), 0.f);
  in.doc.resize(size_t(N));
  std::uniform_int_distribution<int> len(8, 48);
  for (int64_t b = 0; b < s.B; ++b) {
    int32_t id = 0;
    for (int64_t i = 0; i < s.S;) {
      const int64_t n = s.short_docs ? std::min<int64_t>(len(g), s.S - i) : s.S;
      for (int64_t j = 0; j < n; ++j) in.doc[size_t(b * s.S + i + j)] = id;
      in.pairs += double(n) * double(n + 1) / 2;
      i += n;
      ++id;
    }
  }
  return in;
}

void run(benchmark::State& state, bool backward) {
  const Shape s = shape_of(state);
  Inputs in = make_inputs(s);
  const int64_t qd = s.H * s.hd, kd = s.Hkv * s.hd, ld = qd + 2 * kd;
  float* q = in.qkv.data();
  auto forward = [&] {
    ops::attention_forward(in.out.data(), in.stats.data(), q, q + qd, q + qd + kd, in.doc.data(), s.B, s.S, s.H,
                           s.Hkv, s.hd, static_cast<const float*>(nullptr), 0, ld, ld);
  };
  forward();
  for (auto _ : state) {
    if (backward) {
      float* dq = in.dqkv.data();
      ops::attention_backward(dq, dq + qd, dq + qd + kd, in.dout.data(), in.stats.data(), q, q + qd, q + qd + kd,
                              in.doc.data(), s.B, s.S, s.H, s.Hkv, s.hd, static_cast<const float*>(nullptr), static_cast<float*>(nullptr), 0, ld, ld);
      benchmark::DoNotOptimize(in.dqkv.data());
    } else {
      forward();
      benchmark::DoNotOptimize(in.out.data());
    }
  }
  const double flops = in.pairs * double(s.H) * double(s.hd) * (backward ? 8.0 : 4.0);
  state.counters["GFLOP/s"] = benchmark::Counter(flops * double(state.iterations()) / 1e9, benchmark::Counter::kIsRate);
  state.counters["tokens/s"] =
      benchmark::Counter(double(s.B * s.S) * double(state.iterations()), benchmark::Counter::kIsRate);
}

void BM_AttentionForward(benchmark::State& state) { run(state, false); }
void BM_AttentionBackward(benchmark::State& state) { run(state, true); }

#define MOETUNE_ATTN_ARGS ArgNames({"d512", "short_docs"})->Args({0, 1})->Args({0, 0})->Args({1, 1})->Args({1, 0})
BENCHMARK(BM_AttentionForward)->MOETUNE_ATTN_ARGS->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_AttentionBackward)->MOETUNE_ATTN_ARGS->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
