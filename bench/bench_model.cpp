// Throughput of one training micro-step (forward + backward) and of a full optimizer
// step of the model, in float, for the example configurations. Reports tokens/s and
// achieved GFLOP/s (MODEL.md section 9 FLOPs per token) as counters.
#include <benchmark/benchmark.h>

#include <random>

#include "moe/model.hpp"
#include "optim/adamw.hpp"
#include "train/flops.hpp"
#include "train/step.hpp"

using namespace moetune;

namespace {

ModelConfig small_config() {
  return ModelConfig::from_json({{"vocab_size", 512},
                                 {"hidden_size", 256},
                                 {"num_hidden_layers", 4},
                                 {"num_attention_heads", 4},
                                 {"n_routed_experts", 8},
                                 {"num_experts_per_tok", 2},
                                 {"max_position_embeddings", 256}});
}

MicroBatch random_batch(int rows, int seq_len, int vocab, uint64_t seed) {
  std::mt19937_64 g(seed);
  MicroBatch mb;
  mb.rows = rows;
  mb.seq_len = seq_len;
  const int64_t n = int64_t(rows) * seq_len;
  mb.input_ids.resize(n);
  mb.labels.resize(n);
  mb.doc_ids.assign(n, 0);
  for (int64_t i = 0; i < n; ++i) mb.labels[i] = mb.input_ids[i] = int32_t(g() % vocab);
  return mb;
}

// args: rows, seq_len
void BM_ForwardBackward(benchmark::State& state) {
  const auto cfg = small_config();
  Model<float> m(cfg);
  m.init(1);
  const auto mb = random_batch(int(state.range(0)), int(state.range(1)), cfg.vocab_size, 2);
  const LossNorm norm{double(mb.count_targets()), 1, mb.rows};
  for (auto _ : state) {
    m.zero_grad();
    auto st = m.forward_backward(mb, norm, true);
    benchmark::DoNotOptimize(st.ce);
  }
  const double tokens = double(mb.tokens()) * state.iterations();
  state.counters["tokens/s"] = benchmark::Counter(tokens, benchmark::Counter::kIsRate);
  state.counters["GFLOP/s"] =
      benchmark::Counter(tokens * flops_per_token(cfg, mb.seq_len) / 1e9, benchmark::Counter::kIsRate);
}
BENCHMARK(BM_ForwardBackward)->Args({8, 128})->Args({4, 256})->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_TrainStep(benchmark::State& state) {
  const auto cfg = small_config();
  Model<float> m(cfg);
  m.init(1);
  AdamWConfig ac;
  ac.weight_decay = 0.1;
  AdamW<float> opt(m.layout(), ac);
  std::vector<MicroBatch> batch = {random_batch(8, 128, cfg.vocab_size, 3)};
  for (auto _ : state) {
    auto r = train_step(m, opt, batch, 1e-4, 1.0);
    benchmark::DoNotOptimize(r.loss);
  }
  const double tokens = double(batch[0].tokens()) * state.iterations();
  state.counters["tokens/s"] = benchmark::Counter(tokens, benchmark::Counter::kIsRate);
  state.counters["GFLOP/s"] =
      benchmark::Counter(tokens * flops_per_token(cfg, batch[0].seq_len) / 1e9, benchmark::Counter::kIsRate);
}
BENCHMARK(BM_TrainStep)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
BENCHMARK_MAIN();
