// Batch invariance and determinism (MODEL.md section 13), checked with memcmp: a row's
// logits do not depend on the rows that share its batch (1, 7 or 64 rows), the thread
// count changes no bit of a whole training step, and the GEMM kernels of every ISA this
// CPU runs give the same model. (A decode step equals the full forward: test_decode.)
#include <gtest/gtest.h>
#include <omp.h>

#include <cstring>
#include <vector>

#include "kernels/gemm.hpp"
#include "moe/model.hpp"
#include "optim/adamw.hpp"
#include "test_util.hpp"
#include "train/step.hpp"

using namespace moetune;
using namespace moetune::testing;

namespace {

ModelConfig cfg_for_invariance(const nlohmann::json& extra = nlohmann::json::object()) {
  nlohmann::json j = {{"vocab_size", 64},
                                 {"hidden_size", 32},
                                 {"num_hidden_layers", 3},
                                 {"num_attention_heads", 4},
                                 {"num_key_value_heads", 2},
                                 {"intermediate_size", 48},
                                 {"n_routed_experts", 8},
                                 {"num_experts_per_tok", 2},
                                 {"moe_intermediate_size", 16},
                                 {"n_shared_experts", 1},
                                 {"max_position_embeddings", 80},
                                 {"seq_aux_loss_coeff", 0.01},
                                 {"z_loss_coeff", 0.001},
                                 {"initializer_range", 0.1}};
  for (auto it = extra.begin(); it != extra.end(); ++it) j[it.key()] = it.value();
  return ModelConfig::from_json(j);
}

// mHC (3 streams) with an MTP block (MODEL.md section 12).
const nlohmann::json kHcMtp = {{"hc_mult", 3}, {"hc_sinkhorn_iters", 6}, {"num_nextn_predict_layers", 1}};
// DeepSeek-V4 attention (MODEL.md section 12): sinks, a sliding window shorter than the
// rows (a later tile's keys start inside the row), 2 output groups; and the same with
// mHC and MTP.
const nlohmann::json kV4Attention = {{"attention_type", "v4"}, {"q_lora_rank", 24}, {"qk_rope_head_dim", 4},
                                     {"o_groups", 2},          {"o_lora_rank", 12}, {"sliding_window", 20}};
nlohmann::json v4_everything() {
  nlohmann::json j = kV4Attention;
  for (auto it = kHcMtp.begin(); it != kHcMtp.end(); ++it) j[it.key()] = it.value();
  return j;
}

// `rows` rows of S tokens (two documents in row 0, padding in the last row).
MicroBatch rows_batch(int rows, int S, int V, uint64_t seed) { return make_batch(rows, S, V, seed); }

// The micro-batch made of rows [r0, r0 + n) of mb.
MicroBatch slice_rows(const MicroBatch& mb, int r0, int n) {
  MicroBatch out;
  out.rows = n;
  out.seq_len = mb.seq_len;
  const int64_t a = int64_t(r0) * mb.seq_len, b = a + int64_t(n) * mb.seq_len;
  out.input_ids.assign(mb.input_ids.begin() + a, mb.input_ids.begin() + b);
  out.labels.assign(mb.labels.begin() + a, mb.labels.begin() + b);
  out.doc_ids.assign(mb.doc_ids.begin() + a, mb.doc_ids.begin() + b);
  if (!mb.padding.empty()) out.padding.assign(mb.padding.begin() + a, mb.padding.begin() + b);
  return out;
}

struct Invariance : ::testing::Test {
  int saved_threads = omp_get_max_threads();
  kernels::Isa saved_isa = kernels::gemm_isa();
  void TearDown() override {
    omp_set_num_threads(saved_threads);
    kernels::set_gemm_isa(saved_isa);
  }
};

// Rows of 70 tokens (two attention tiles): every row's logits, computed inside batches
// of 64, 7 and 1 rows, are the same bytes.
// With mHC + MTP, the MTP block's logits too.
TEST_F(Invariance, RowLogitsDoNotDependOnTheBatch) {
  for (const auto& extra : {nlohmann::json::object(), kHcMtp, kV4Attention, v4_everything()}) {
    const ModelConfig cfg = cfg_for_invariance(extra);
    Model<float> m(cfg);
    m.init(11);
    for (auto& b : m.expert_bias())
      for (size_t e = 0; e < b.size(); ++e) b[e] = 0.02f * float(e % 3);
    const int S = 70, V = cfg.vocab_size;
    const MicroBatch all = rows_batch(64, S, V, 5);
    ForwardOptions fo{false};
    fo.mtp = true;
    m.forward(all, LossNorm{}, fo);
    const std::vector<float> big = m.logits(), big_mtp = m.mtp_logits();
    int compared = 0;
    for (int rows : {1, 7}) {
      for (int r0 : {0, 3, 64 - rows}) {
        m.forward(slice_rows(all, r0, rows), LossNorm{}, fo);
        ASSERT_EQ(m.logits().size(), size_t(rows) * S * V);
        EXPECT_EQ(0, std::memcmp(m.logits().data(), big.data() + int64_t(r0) * S * V, m.logits().size() * 4))
            << rows << " rows from row " << r0;
        if (cfg.mtp()) {
          ASSERT_EQ(m.mtp_logits().size(), size_t(rows) * S * V);
          EXPECT_EQ(0, std::memcmp(m.mtp_logits().data(), big_mtp.data() + int64_t(r0) * S * V,
                                   m.mtp_logits().size() * 4))
              << "MTP logits, " << rows << " rows from row " << r0;
        }
        ++compared;
      }
    }
    EXPECT_EQ(compared, 6);
  }
}

// Two AdamW steps on a global batch of two micro-batches: the weights, gradients and
// routing biases after them are the same bytes on 1, 2 and 3 threads, and so are the
// losses; with mHC + MTP too.
TEST_F(Invariance, ThreadCountChangesNoBitOfATrainingStep) {
  for (const auto& extra : {nlohmann::json::object(), kHcMtp, kV4Attention, v4_everything()}) {
    const ModelConfig cfg = cfg_for_invariance(extra);
    const std::vector<MicroBatch> batch = {rows_batch(3, 40, cfg.vocab_size, 1), rows_batch(2, 40, cfg.vocab_size, 2)};
    struct Result {
      std::vector<float> params, grads;
      std::vector<std::vector<float>> bias;
      double loss = 0, grad_norm = 0;
    };
    auto run = [&](int threads) {
      omp_set_num_threads(threads);
      Model<float> m(cfg);
      m.init(3);
      AdamWConfig ac;
      ac.weight_decay = 0.1;
      AdamW<float> opt(m.layout(), ac);
      Result r;
      for (int step = 0; step < 2; ++step) {
        const StepResult s = train_step(m, opt, batch, 1e-2, 1.0);
        EXPECT_FALSE(s.skipped);
        r.loss = s.loss;
        r.grad_norm = s.grad_norm;
      }
      r.params = m.params();
      r.grads = m.grads();
      r.bias = m.expert_bias();
      return r;
    };
    const Result one = run(1);
    for (int threads : {2, 3}) {
      const Result many = run(threads);
      EXPECT_EQ(0, std::memcmp(one.params.data(), many.params.data(), one.params.size() * 4)) << threads;
      EXPECT_EQ(0, std::memcmp(one.grads.data(), many.grads.data(), one.grads.size() * 4)) << threads;
      EXPECT_EQ(one.bias, many.bias) << threads;
      EXPECT_EQ(one.loss, many.loss) << threads;
      EXPECT_EQ(one.grad_norm, many.grad_norm) << threads;
    }
  }
}

// The model's logits and gradients are the same bytes with every GEMM kernel this CPU
// can run (kernels/gemm.hpp explains why); with mHC + MTP too.
TEST_F(Invariance, GemmIsaChangesNoBitOfTheModel) {
  const auto isas = kernels::supported_isas();
  if (isas.size() < 2) GTEST_SKIP() << "this CPU runs only the generic kernels";
  for (const auto& extra : {nlohmann::json::object(), kHcMtp, kV4Attention, v4_everything()}) {
    const ModelConfig cfg = cfg_for_invariance(extra);
    const std::vector<MicroBatch> batch = {rows_batch(2, 24, cfg.vocab_size, 8)};
    std::vector<float> want_logits, want_grads;
    for (kernels::Isa isa : isas) {
      kernels::set_gemm_isa(isa);
      Model<float> m(cfg);
      m.init(4);
      accumulate_gradients(m, batch);
      m.forward(batch[0], LossNorm{}, ForwardOptions{false});
      if (want_logits.empty()) {
        want_logits = m.logits();
        want_grads = m.grads();
        continue;
      }
      EXPECT_EQ(0, std::memcmp(want_logits.data(), m.logits().data(), want_logits.size() * 4))
          << kernels::isa_name(isa);
      EXPECT_EQ(0, std::memcmp(want_grads.data(), m.grads().data(), want_grads.size() * 4)) << kernels::isa_name(isa);
    }
  }
}

}  // namespace
