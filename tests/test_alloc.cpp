// No allocation in the steady state of a training step: after warm-up steps, a step of
// the same shapes allocates nothing on any thread (GEMM packing, attention, router,
// dispatch, experts, optimizer all reuse their buffers), except the per-layer
// statistics a step returns. Counted by replacing the global operator new of this test
// binary (kernels/global_new.hpp): it allocates as the moetune executable does
// (kernels::line_aligned_alloc) and counts while a test has counting switched on.
#include <gtest/gtest.h>

#include <atomic>

#include "kernels/global_new.hpp"
#include "moe/model.hpp"
#include "optim/adamw.hpp"
#include "test_util.hpp"
#include "train/step.hpp"

namespace {
std::atomic<bool> g_counting{false};
std::atomic<int64_t> g_allocs{0};

void* counted_alloc(std::size_t n) {
  if (g_counting.load(std::memory_order_relaxed)) g_allocs.fetch_add(1, std::memory_order_relaxed);
  return moetune::kernels::line_aligned_alloc(n);
}
}  // namespace

MOETUNE_REPLACE_GLOBAL_NEW(counted_alloc)

using namespace moetune;
using namespace moetune::testing;

namespace {

int64_t allocations_of(const std::function<void()>& f) {
  g_allocs = 0;
  g_counting = true;
  f();
  g_counting = false;
  return g_allocs.load();
}

// kernels::line_aligned_alloc, the operator new of this binary and of the moetune
// executable: a block of 4 KiB or more starts on a 64-byte line, whatever its size.
TEST(Alloc, LargeBlocksStartOnACacheLine) {
  for (size_t n : {size_t(1024), size_t(1025), size_t(4097), size_t(1) << 20, (size_t(1) << 22) + 3}) {
    std::vector<float> v(n);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(v.data()) % 64, 0u) << n << " floats";
    void* p = moetune::kernels::line_aligned_alloc(n * 4 + 1);
    ASSERT_NE(p, nullptr);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 64, 0u) << n * 4 + 1 << " bytes";
    std::free(p);
  }
}

TEST(Alloc, CounterSeesAllocations) {
  // The counter works: a vector of 100 floats is (at least) one allocation.
  const int64_t n = allocations_of([] {
    std::vector<float> v(100);
    asm volatile("" : : "g"(v.data()) : "memory");
  });
  EXPECT_GE(n, 1);
}

ModelConfig alloc_cfg(int dense_layers, int hc_mult = 1, int mtp = 0) {
  return ModelConfig::from_json({{"vocab_size", 64},
                                 {"hc_mult", hc_mult},
                                 {"num_nextn_predict_layers", mtp},
                                 {"hidden_size", 32},
                                 {"num_hidden_layers", 3},
                                 {"num_attention_heads", 4},
                                 {"num_key_value_heads", 2},
                                 {"first_k_dense_replace", dense_layers},
                                 {"intermediate_size", 48},
                                 {"n_routed_experts", 8},
                                 {"num_experts_per_tok", 2},
                                 {"moe_intermediate_size", 16},
                                 {"seq_aux_loss_coeff", 0.01},
                                 {"max_position_embeddings", 80}});
}

// Dense layers only: a forward + backward of two attention tiles per row allocates
// nothing at all once warm.
// With mHC (hc_mult 3) too: the streams, connection states and Sinkhorn scratch are
// reused buffers; and with an MTP block (which is a MoE layer: only its statistics).
TEST(Alloc, SteadyStateForwardBackwardAllocatesNothing) {
  for (int hc : {1, 3}) {
    const ModelConfig cfg = alloc_cfg(3, hc);
    Model<float> m(cfg);
    m.init(1);
    const MicroBatch mb = make_batch(3, 70, cfg.vocab_size, 1);
    const LossNorm norm{double(mb.count_targets()), 1, mb.rows};
    for (int i = 0; i < 2; ++i) m.forward_backward(mb, norm, true);
    EXPECT_EQ(allocations_of([&] { m.forward_backward(mb, norm, true); }), 0) << "hc_mult " << hc;
  }
}

// The same with DeepSeek-V4 attention (MODEL.md section 12): sinks, a sliding window
// shorter than the rows (keys of a later tile start inside the row), grouped output.
TEST(Alloc, SteadyStateForwardBackwardV4AttentionAllocatesNothing) {
  ModelConfig cfg = alloc_cfg(3);
  // (set() validates each key: the V4 sizes first, then the switch to "v4", then the window)
  for (const auto& [k, v] : std::vector<std::pair<const char*, const char*>>{{"q_lora_rank", "16"},
                                                                             {"qk_rope_head_dim", "4"},
                                                                             {"o_groups", "2"},
                                                                             {"o_lora_rank", "8"},
                                                                             {"attention_type", "v4"},
                                                                             {"sliding_window", "20"}})
    cfg.set(k, v);
  Model<float> m(cfg);
  m.init(1);
  const MicroBatch mb = make_batch(3, 70, cfg.vocab_size, 1);
  const LossNorm norm{double(mb.count_targets()), 1, mb.rows};
  for (int i = 0; i < 2; ++i) m.forward_backward(mb, norm, true);
  EXPECT_EQ(allocations_of([&] { m.forward_backward(mb, norm, true); }), 0);
}

// A whole AdamW training step of a MoE model (2 micro-batches): the only allocations
// left are the expert-count statistics the step returns (one vector per MoE layer,
// per micro-batch and for the step, plus their outer vectors); measured 14 here.
TEST(Alloc, SteadyStateTrainingStepAllocatesOnlyItsStatistics) {
  const ModelConfig cfg = alloc_cfg(1);
  Model<float> m(cfg);
  m.init(1);
  AdamWConfig ac;
  AdamW<float> opt(m.layout(), ac);
  const std::vector<MicroBatch> batch = {make_batch(3, 70, cfg.vocab_size, 1), make_batch(3, 70, cfg.vocab_size, 2)};
  for (int i = 0; i < 2; ++i) train_step(m, opt, batch, 1e-3, 1.0);
  const int64_t n = allocations_of([&] { train_step(m, opt, batch, 1e-3, 1.0); });
  const int64_t stats = int64_t(cfg.num_moe_layers() + 2) * (int64_t(batch.size()) + 2);
  EXPECT_LE(n, stats) << "allocations in a steady-state training step";
  EXPECT_GT(n, 0);  // the statistics are really counted (the bound is not vacuous)
}

// mHC + MTP: the MTP block is one more MoE layer, so one more statistics vector per
// micro-batch and step; nothing else.
TEST(Alloc, SteadyStateTrainingStepWithHyperConnectionsAndMtp) {
  const ModelConfig cfg = alloc_cfg(1, 2, 1);
  Model<float> m(cfg);
  m.init(1);
  AdamWConfig ac;
  AdamW<float> opt(m.layout(), ac);
  const std::vector<MicroBatch> batch = {make_batch(3, 70, cfg.vocab_size, 1), make_batch(3, 70, cfg.vocab_size, 2)};
  for (int i = 0; i < 2; ++i) train_step(m, opt, batch, 1e-3, 1.0);
  const int64_t n = allocations_of([&] { train_step(m, opt, batch, 1e-3, 1.0); });
  const int64_t stats = int64_t(cfg.num_moe_layers() + 2) * (int64_t(batch.size()) + 2);
  EXPECT_LE(n, stats) << "allocations in a steady-state training step";
}

}  // namespace
