// The RL objective of MODEL.md section 11 through the whole model, in double: the
// gradient of (RL loss head + balance losses) with respect to every parameter tensor
// against central differences, for each loss_type, both importance-sampling levels,
// beta 0 and > 0, with clipped and unclipped tokens, with and without a replayed
// routing, and padding tokens that count in no balance loss. This is the path of
// `moetune rl`'s update: Model::forward -> rl_loss_head -> Model::backward.
#include <gtest/gtest.h>

#include <random>

#include "moe/model.hpp"
#include "test_util.hpp"
#include "train/rl_loss.hpp"
#include "train/step.hpp"

using namespace moetune;
using namespace moetune::testing;

namespace {

ModelConfig cfg_small() {
  return ModelConfig::from_json({{"vocab_size", 24},
                                 {"hidden_size", 8},
                                 {"num_hidden_layers", 2},
                                 {"num_attention_heads", 2},
                                 {"num_key_value_heads", 1},
                                 {"intermediate_size", 12},
                                 {"n_routed_experts", 4},
                                 {"num_experts_per_tok", 2},
                                 {"moe_intermediate_size", 6},
                                 {"max_position_embeddings", 16},
                                 {"seq_aux_loss_coeff", 0.02},
                                 {"aux_loss_coeff", 0.03},
                                 {"z_loss_coeff", 0.01},
                                 {"initializer_range", 0.4}});
}

struct RlCase {
  std::string loss_type, level;
  double beta;
  bool replay;
};

// Two completion rows: row 0 = prompt of 3 + completion of 5, row 1 = prompt of 2 +
// completion of 4 + padding. Labels: the completion tokens.
MicroBatch completion_rows(int V, uint64_t seed) {
  std::mt19937_64 g(seed);
  const int S = 8;
  MicroBatch mb;
  mb.rows = 2;
  mb.seq_len = S;
  mb.input_ids.resize(2 * S);
  mb.labels.assign(2 * S, kIgnoreIndex);
  mb.doc_ids.assign(2 * S, 0);
  for (auto& x : mb.input_ids) x = int32_t(g() % V);
  for (int t = 3; t < 8; ++t) mb.labels[t] = mb.input_ids[t];
  for (int t = 2; t < 6; ++t) mb.labels[S + t] = mb.input_ids[S + t];
  mb.padding.assign(2 * S, 0);
  for (int t = 6; t < 8; ++t) mb.doc_ids[S + t] = mb.padding[S + t] = 1;  // padding: in no routing statistic
  return mb;
}

}  // namespace

class RlModelGrad : public ::testing::TestWithParam<RlCase> {};

TEST_P(RlModelGrad, EveryParameterTensor) {
  const RlCase& pc = GetParam();
  const auto cfg = cfg_small();
  Model<double> m(cfg);
  m.init(17);
  const auto mb = completion_rows(cfg.vocab_size, 3);
  const int64_t N = mb.tokens();
  const LossNorm norm{1, 1, 2};
  RlLossConfig lc;
  lc.loss_type = pc.loss_type;
  lc.importance_sampling_level = pc.level;
  lc.epsilon = 0.2;
  lc.epsilon_high = 0.28;
  lc.beta = pc.beta;
  lc.temperature = 0.9;
  lc.max_new_tokens = 6;
  // pi_old = the current policy shifted per token, so that ratios fall inside and
  // outside the clip range; the reference is another perturbation.
  RoutingTrace sel;
  m.forward(mb, norm, ForwardOptions{false, nullptr, &sel});
  std::vector<double> lp(N), lp_old(N), lp_ref(N), adv(N, 0.0), w(N, 0.0);
  std::vector<int32_t> seq(N, -1);
  token_logprobs(lp.data(), nullptr, m.logits().data(), m.targets().data(), N, cfg.vocab_size, lc.temperature);
  std::mt19937_64 g(99);
  std::uniform_real_distribution<double> shift(-0.45, 0.45);
  const std::vector<int64_t> ntok = {5, 4};
  const auto wts = completion_token_weights(ntok, lc.loss_type, lc.max_new_tokens);
  const double A[2] = {0.8, -1.1};
  for (int64_t i = 0; i < N; ++i) {
    if (m.targets()[i] < 0) continue;
    const int r = int(i / mb.seq_len);
    lp_old[i] = lp[i] + (pc.level == "sequence" ? 0.5 * shift(g) : shift(g));
    lp_ref[i] = lp[i] + shift(g);
    adv[i] = A[r];
    w[i] = wts[r];
    seq[i] = r;
  }
  if (pc.replay)  // a selection the router would not make: experts (t, t+1) mod E
    for (auto& layer : sel.idx)
      for (int64_t t = 0; t < N; ++t) {
        layer[t * 2] = int32_t(t % cfg.E());
        layer[t * 2 + 1] = int32_t((t + 1) % cfg.E());
      }
  const RlTokens tk{m.targets().data(), lp_old.data(), pc.beta > 0 ? lp_ref.data() : nullptr, adv.data(), w.data(),
                    seq.data()};
  RlHeadStats stats;
  auto loss = [&](bool backward) {
    const MicroStats st = m.forward(mb, norm, ForwardOptions{backward, pc.replay ? &sel : nullptr, nullptr});
    auto& dl = m.dlogits_buffer();
    dl.resize(m.logits().size());
    const RlTokens t2{m.targets().data(), tk.lp_old, tk.lp_ref, tk.advantage, tk.weight, tk.seq};
    stats = rl_loss_head(backward ? dl.data() : static_cast<double*>(nullptr), m.logits().data(), N,
                         int64_t(cfg.vocab_size), t2, lc);
    if (backward) m.backward(dl.data());
    return stats.loss + st.aux_loss + st.seq_aux_loss + st.z_loss;
  };
  m.zero_grad();
  loss(true);
  ASSERT_EQ(stats.tokens, 9);
  if (pc.level == "token") {
    EXPECT_GT(stats.clipped_low + stats.clipped_high, 0) << "no clipped token";
    EXPECT_LT(stats.clipped_low + stats.clipped_high, stats.tokens) << "no unclipped token";
  }
  const std::vector<double> grads = m.grads();
  double worst_all = 0;
  for (const auto& t : m.layout().tensors()) {
    double gmax = 0;
    for (size_t i = 0; i < t.numel; ++i) gmax = std::max(gmax, std::fabs(grads[t.offset + i]));
    const double floor = 1e-5 * (1.0 + gmax);
    double worst = 0;
    const size_t step = t.numel <= 24 ? 1 : t.numel / 24;
    for (size_t i = 0; i < t.numel; i += step)
      worst = std::max(worst, rel_err(fd([&] { return loss(false); }, m.params()[t.offset + i], 1e-5),
                                      grads[t.offset + i], floor));
    EXPECT_LT(worst, 1e-5) << t.name;
    worst_all = std::max(worst_all, worst);
  }
  std::printf("rl %s/%s beta %g replay %d: worst FD relative error %.2e (clipped %lld of %lld)\n",
              pc.loss_type.c_str(), pc.level.c_str(), pc.beta, int(pc.replay), worst_all,
              static_cast<long long>(stats.clipped_low + stats.clipped_high), static_cast<long long>(stats.tokens));
}

INSTANTIATE_TEST_SUITE_P(
    Objectives, RlModelGrad,
    ::testing::Values(RlCase{"token_mean", "token", 0.0, false}, RlCase{"token_mean", "token", 0.1, true},
                      RlCase{"token_mean", "sequence", 0.0, true}, RlCase{"token_mean", "sequence", 0.1, false},
                      RlCase{"seq_mean_token_mean", "token", 0.0, true},
                      RlCase{"seq_mean_token_mean", "token", 0.1, false},
                      RlCase{"seq_mean_token_mean", "sequence", 0.1, true},
                      RlCase{"seq_mean_token_sum_norm", "token", 0.0, false},
                      RlCase{"seq_mean_token_sum_norm", "token", 0.1, true},
                      RlCase{"seq_mean_token_sum_norm", "sequence", 0.0, false}),
    [](const ::testing::TestParamInfo<RlCase>& i) {
      return i.param.loss_type + "_" + i.param.level + (i.param.beta > 0 ? "_kl" : "") +
             (i.param.replay ? "_replay" : "");
    });

// Padding (MicroBatch::padding) counts in no routing statistic: a micro-batch with an
// extra all-padding row and padded positions gives the expert loads and balance losses
// of the same rows without them; without the mask the padding changes them.
TEST(RlPadding, PaddingTokensCountInNoRoutingStatistic) {
  const auto cfg = cfg_small();
  Model<double> m(cfg);
  m.init(5);
  MicroBatch a = completion_rows(cfg.vocab_size, 8);
  const int S = a.seq_len;
  MicroBatch b = a;  // + one row of padding
  b.rows = 3;
  for (int t = 0; t < S; ++t) {
    b.input_ids.push_back(0);
    b.labels.push_back(kIgnoreIndex);
    b.doc_ids.push_back(1);
    b.padding.push_back(1);
  }
  const LossNorm na = global_loss_norm({a}), nb = global_loss_norm({b});
  EXPECT_EQ(na.n_rows, 2);
  EXPECT_EQ(nb.n_rows, 2);  // the padding row is not a sequence
  const MicroStats sa = m.forward(a, na, ForwardOptions{false});
  const MicroStats sb = m.forward(b, nb, ForwardOptions{false});
  EXPECT_EQ(sa.expert_counts, sb.expert_counts);
  EXPECT_NEAR(sa.aux_loss, sb.aux_loss, 1e-15);
  EXPECT_NEAR(sa.seq_aux_loss, sb.seq_aux_loss, 1e-15);
  EXPECT_NEAR(sa.z_loss, sb.z_loss, 1e-15);
  int64_t pairs = 0;
  for (auto v : sa.expert_counts[0]) pairs += v;
  EXPECT_EQ(pairs, int64_t(2 * S - 2) * cfg.K());  // padded positions not counted
  MicroBatch c = b;
  c.padding.clear();  // the same tokens, counted
  const MicroStats sc = m.forward(c, global_loss_norm({c}), ForwardOptions{false});
  EXPECT_NE(sa.expert_counts, sc.expert_counts);
  EXPECT_GT(std::fabs(sa.seq_aux_loss - sc.seq_aux_loss), 1e-9);
}
