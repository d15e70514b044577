// The inference paths of the model (MODEL.md section 10) and routing replay (section
// 11): a KV-cache decode gives the logits of a full forward over the same tokens; an
// inference forward equals a training forward bit for bit; replaying a forward's own
// routing changes no bit; a replayed (fixed) selection has exact gradients.
#include <gtest/gtest.h>

#include <cstring>

#include "moe/error.hpp"
#include "moe/model.hpp"
#include "moe/ops.hpp"
#include "test_util.hpp"

using namespace moetune;
using namespace moetune::testing;

namespace {

ModelConfig small_cfg(nlohmann::json extra = {}) {
  nlohmann::json j = {{"vocab_size", 40},
                      {"hidden_size", 16},
                      {"num_hidden_layers", 3},
                      {"num_attention_heads", 4},
                      {"num_key_value_heads", 2},
                      {"intermediate_size", 24},
                      {"n_routed_experts", 6},
                      {"num_experts_per_tok", 2},
                      {"moe_intermediate_size", 8},
                      {"max_position_embeddings", 32},
                      {"initializer_range", 0.2}};
  for (auto it = extra.begin(); it != extra.end(); ++it) j[it.key()] = it.value();
  return ModelConfig::from_json(j);
}

// One row of `len` tokens, one document.
MicroBatch one_row(const std::vector<int32_t>& toks) {
  MicroBatch mb;
  mb.rows = 1;
  mb.seq_len = int(toks.size());
  mb.input_ids = toks;
  mb.labels = toks;
  mb.doc_ids.assign(toks.size(), 0);
  return mb;
}

std::vector<int32_t> tokens(int n, int V, uint64_t seed) {
  std::vector<int32_t> t(n);
  uint64_t s = seed;
  for (auto& x : t) {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    x = int32_t((s >> 33) % uint64_t(V));
  }
  return t;
}

// The cached decode's logits against full forwards, for three rows of different prompt
// lengths decoded together (prefill, then one token per row per step, rows finishing at
// different steps): the number of positions whose logits differ in any bit, and the
// largest relative difference.
struct DecodeDiff {
  int mismatched = 0, compared = 0;
  double worst = 0;
};
template <class T>
DecodeDiff decode_vs_forward(const ModelConfig& cfg) {
  Model<T> m(cfg);
  m.init(3);
  for (auto& b : m.expert_bias())
    for (size_t e = 0; e < b.size(); ++e) b[e] = 0.01f * float(e % 3);
  const int V = cfg.vocab_size;
  const std::vector<std::vector<int32_t>> seqs = {tokens(14, V, 1), tokens(9, V, 2), tokens(20, V, 3)};
  const std::vector<int> prompt = {5, 1, 7};
  KvCache<T> kv;
  m.kv_init(kv, 3, 24);
  std::vector<T> logits;
  DecodeDiff diff;
  double& worst = diff.worst;
  auto compare = [&](int r, int upto, const T* got) {  // logits after tokens [0, upto] of row r
    Model<T>& mm = m;
    std::vector<int32_t> prefix(seqs[r].begin(), seqs[r].begin() + upto + 1);
    mm.forward(one_row(prefix), LossNorm{}, ForwardOptions{false});
    const T* want = mm.logits().data() + int64_t(upto) * V;
    double mx = 0;
    for (int v = 0; v < V; ++v) mx = std::max(mx, std::fabs(double(want[v])));
    for (int v = 0; v < V; ++v) worst = std::max(worst, std::fabs(double(got[v]) - double(want[v])) / (mx + 1e-30));
    diff.mismatched += std::memcmp(got, want, size_t(V) * sizeof(T)) != 0;
    ++diff.compared;
  };
  // Prefill: the three prompts in one call.
  std::vector<int32_t> row, tok;
  for (int r = 0; r < 3; ++r)
    for (int i = 0; i < prompt[r]; ++i) {
      row.push_back(r);
      tok.push_back(seqs[r][i]);
    }
  m.extend(kv, row.data(), tok.data(), int64_t(tok.size()), logits);
  // compare() runs full forwards through the same model, which must not disturb the cache.
  std::vector<T> prefill = logits;
  for (int r = 0; r < 3; ++r) compare(r, prompt[r] - 1, prefill.data() + int64_t(r) * V);
  EXPECT_EQ(kv.len, (std::vector<int32_t>{5, 1, 7}));
  // Decode: every live row gets its next token each step.
  std::vector<int> at = prompt;
  for (;;) {
    row.clear();
    tok.clear();
    for (int r = 0; r < 3; ++r)
      if (at[r] < int(seqs[r].size())) {
        row.push_back(r);
        tok.push_back(seqs[r][at[r]]);
      }
    if (row.empty()) break;
    m.extend(kv, row.data(), tok.data(), int64_t(tok.size()), logits);
    std::vector<T> got = logits;
    for (size_t i = 0; i < row.size(); ++i) {
      compare(row[i], at[row[i]], got.data() + int64_t(i) * V);
      ++at[row[i]];
    }
  }
  EXPECT_EQ(kv.len, (std::vector<int32_t>{14, 9, 20}));
  return diff;
}

}  // namespace

// Bit for bit (MODEL.md section 13): the decode runs the full forward's arithmetic.
TEST(Decode, KvCacheEqualsFullForwardDouble) {
  const DecodeDiff d = decode_vs_forward<double>(small_cfg());
  EXPECT_EQ(d.compared, 3 + (14 - 5) + (9 - 1) + (20 - 7));
  EXPECT_EQ(d.mismatched, 0) << "max relative difference " << d.worst;
}

TEST(Decode, KvCacheEqualsFullForwardFloat) {
  for (const char* scoring : {"sigmoid", "softmax"}) {
    const DecodeDiff d = decode_vs_forward<float>(small_cfg({{"scoring_func", scoring}}));
    EXPECT_EQ(d.mismatched, 0) << scoring << ": " << d.mismatched << " of " << d.compared
                               << " positions differ, max relative difference " << d.worst;
  }
}

// DeepSeek-V4 routing (MODEL.md section 12): extend() routes the hash layers by the new
// tokens' ids exactly as the full forward does.
TEST(Decode, KvCacheEqualsFullForwardV4Routing) {
  for (bool dbl : {true, false}) {
    const ModelConfig cfg = small_cfg(
        {{"first_k_dense_replace", 0}, {"num_hash_layers", 2}, {"scoring_func", "sqrtsoftplus"}, {"swiglu_limit", 0.4}});
    const DecodeDiff d = dbl ? decode_vs_forward<double>(cfg) : decode_vs_forward<float>(cfg);
    EXPECT_EQ(d.mismatched, 0) << (dbl ? "double" : "float") << ": max relative difference " << d.worst;
  }
}

// mHC (MODEL.md section 12): the streams, their connections and the head's collapse are
// per-token computations, so the decode still equals the full forward bit for bit.
TEST(Decode, KvCacheEqualsFullForwardHyperConnections) {
  for (bool dbl : {true, false}) {
    const ModelConfig cfg = small_cfg({{"hc_mult", 3}, {"hc_sinkhorn_iters", 4}});
    const DecodeDiff d = dbl ? decode_vs_forward<double>(cfg) : decode_vs_forward<float>(cfg);
    EXPECT_EQ(d.mismatched, 0) << (dbl ? "double" : "float") << ": max relative difference " << d.worst;
  }
}

// MTP (MODEL.md section 12): decoding uses the main model only; an MTP block changes no
// bit of it, and the training forward (which runs the block after the main logits) gives
// the same main logits as inference.
TEST(Decode, KvCacheEqualsFullForwardWithMtp) {
  for (int hc : {1, 2}) {
    const ModelConfig cfg = small_cfg({{"num_nextn_predict_layers", 1}, {"hc_mult", hc}});
    const DecodeDiff d = decode_vs_forward<float>(cfg);
    EXPECT_EQ(d.mismatched, 0) << "hc_mult " << hc << ": max relative difference " << d.worst;
    Model<float> m(cfg);
    m.init(5);
    const auto mb = make_batch(3, 10, cfg.vocab_size, 9);
    const MicroStats st = m.forward_backward(mb, LossNorm{}, true);
    EXPECT_GT(st.mtp_loss, 0);
    EXPECT_GT(st.n_mtp_targets, 0);
    const std::vector<float> train = m.logits();
    m.forward(mb, LossNorm{}, ForwardOptions{false});
    EXPECT_EQ(0, std::memcmp(train.data(), m.logits().data(), train.size() * sizeof(float)));
  }
}

// DeepSeek-V4 attention (MODEL.md section 12): the cache holds the one shared key/value
// head after RoPE; sinks, the partial interleaved RoPE, the rotation back of the output
// and the grouped output projection run as in the full forward. With and without a
// sliding window shorter than the rows (5 < 20), with V4 routing.
TEST(Decode, KvCacheEqualsFullForwardV4Attention) {
  for (int window : {0, 5})
    for (bool dbl : {true, false}) {
      const ModelConfig cfg = small_cfg({{"attention_type", "v4"},
                                         {"q_lora_rank", 12},
                                         {"qk_rope_head_dim", 2},
                                         {"o_groups", 2},
                                         {"o_lora_rank", 6},
                                         {"sliding_window", window},
                                         {"first_k_dense_replace", 1},
                                         {"num_hash_layers", 1},
                                         {"scoring_func", "sqrtsoftplus"}});
      Model<double> probe(cfg);
      probe.init(3);
      KvCache<double> kv;
      probe.kv_init(kv, 2, 4);
      EXPECT_EQ(kv.k[0].size(), size_t(2 * 4 * cfg.hd()));  // one shared head per position
      EXPECT_TRUE(kv.v[0].empty());
      const DecodeDiff d = dbl ? decode_vs_forward<double>(cfg) : decode_vs_forward<float>(cfg);
      EXPECT_EQ(d.compared, 3 + (14 - 5) + (9 - 1) + (20 - 7));
      EXPECT_EQ(d.mismatched, 0) << (dbl ? "double" : "float") << ", window " << window
                                 << ": max relative difference " << d.worst;
    }
}

// The whole DeepSeek-V4 shape at once: V4 attention with a window, mHC, the MTP block,
// hash and sqrtsoftplus routing, no dense layer.
TEST(Decode, KvCacheEqualsFullForwardV4Everything) {
  for (bool dbl : {true, false}) {
    const ModelConfig cfg = small_cfg({{"attention_type", "v4"}, {"q_lora_rank", 12}, {"qk_rope_head_dim", 2},
                                       {"o_groups", 2}, {"o_lora_rank", 6}, {"sliding_window", 5},
                                       {"first_k_dense_replace", 0}, {"num_hash_layers", 1},
                                       {"scoring_func", "sqrtsoftplus"}, {"hc_mult", 2},
                                       {"num_nextn_predict_layers", 1}});
    const DecodeDiff d = dbl ? decode_vs_forward<double>(cfg) : decode_vs_forward<float>(cfg);
    EXPECT_GT(d.compared, 0);
    EXPECT_EQ(d.mismatched, 0) << (dbl ? "double" : "float") << ": max relative difference " << d.worst;
  }
}

TEST(Decode, ExtendRejectsFullRowsAndBadTokens) {
  const auto cfg = small_cfg();
  Model<float> m(cfg);
  m.init(1);
  KvCache<float> kv;
  m.kv_init(kv, 1, 2);
  std::vector<float> logits;
  const int32_t row[3] = {0, 0, 0}, tok[3] = {1, 2, 3};
  EXPECT_THROW(m.extend(kv, row, tok, 3, logits), Error);
  const int32_t bad[1] = {cfg.vocab_size};
  EXPECT_THROW(m.extend(kv, row, bad, 1, logits), Error);
  EXPECT_THROW(m.kv_init(kv, 1, cfg.max_position_embeddings + 1), Error);
}

TEST(Decode, InferenceForwardEqualsTrainingForwardBitForBit) {
  for (int n : {1, 2}) {
    const auto cfg = small_cfg({{"seq_aux_loss_coeff", 0.01}, {"hc_mult", n}});
    Model<float> m(cfg);
    m.init(5);
    const auto mb = make_batch(3, 10, cfg.vocab_size, 9);
    m.forward(mb, LossNorm{}, ForwardOptions{true});
    const std::vector<float> train = m.logits();
    m.forward(mb, LossNorm{}, ForwardOptions{false});
    ASSERT_EQ(train.size(), m.logits().size());
    EXPECT_EQ(0, std::memcmp(train.data(), m.logits().data(), train.size() * sizeof(float))) << "hc_mult " << n;
  }
}

TEST(Replay, OwnRoutingChangesNoBit) {
  const auto cfg = small_cfg({{"capacity_factor", 1.0}});
  Model<float> m(cfg);
  m.init(7);
  const auto mb = make_batch(2, 12, cfg.vocab_size, 4);
  RoutingTrace rec;
  const MicroStats live = m.forward(mb, LossNorm{}, ForwardOptions{false, nullptr, &rec});
  ASSERT_EQ(int(rec.idx.size()), cfg.num_moe_layers());
  EXPECT_GT(live.dropped_pairs, 0);  // capacity drops are part of the replayed selection
  const std::vector<float> want = m.logits();
  const MicroStats rep = m.forward(mb, LossNorm{}, ForwardOptions{false, &rec, nullptr});
  EXPECT_EQ(0, std::memcmp(want.data(), m.logits().data(), want.size() * sizeof(float)));
  EXPECT_EQ(live.expert_counts, rep.expert_counts);
  EXPECT_EQ(live.dropped_pairs, rep.dropped_pairs);
}

// MTP (MODEL.md section 12): a forward for a caller's loss head (RL) runs the main model
// only, so the MTP block's MoE layer records an empty selection, counts nothing, and a
// replay of such a trace (rollout or pi_old) is accepted and changes no bit; a training
// step through the loss head then leaves the MTP layer's routing bias alone.
TEST(Replay, MtpLayerRoutesNothingOutsideTheSupervisedLoss) {
  const auto cfg = small_cfg({{"num_nextn_predict_layers", 1}, {"hc_mult", 2}});
  Model<float> m(cfg);
  m.init(7);
  const auto mb = make_batch(2, 12, cfg.vocab_size, 4);
  RoutingTrace rec;
  const MicroStats live = m.forward(mb, LossNorm{}, ForwardOptions{true, nullptr, &rec});
  const int nm = cfg.num_moe_layers();
  ASSERT_EQ(int(rec.idx.size()), nm);
  EXPECT_TRUE(rec.idx[nm - 1].empty());
  EXPECT_EQ(live.mtp_loss, 0.0);
  EXPECT_EQ(live.expert_counts.at(nm - 1), std::vector<int64_t>(cfg.E(), 0));
  const std::vector<float> want = m.logits();
  auto& dl = m.dlogits_buffer();
  dl.assign(m.logits().size(), 0.5f);
  m.backward(dl.data());  // no MTP gradient pending: only the main model's
  m.forward(mb, LossNorm{}, ForwardOptions{false, &rec, nullptr});
  EXPECT_EQ(0, std::memcmp(want.data(), m.logits().data(), want.size() * sizeof(float)));
  // KV-cache decode records the same empty MTP entry.
  KvCache<float> kv;
  m.kv_init(kv, 1, 4);
  std::vector<float> logits;
  const int32_t row[2] = {0, 0}, tok[2] = {1, 2};
  RoutingTrace dec;
  m.extend(kv, row, tok, 2, logits, &dec);
  ASSERT_EQ(int(dec.idx.size()), nm);
  EXPECT_TRUE(dec.idx[nm - 1].empty());
  EXPECT_EQ(int64_t(dec.idx[0].size()), 2 * cfg.K());
}

TEST(Replay, WrongShapeIsRejected) {
  const auto cfg = small_cfg();
  Model<float> m(cfg);
  m.init(7);
  const auto mb = make_batch(1, 6, cfg.vocab_size, 4);
  RoutingTrace rec;
  m.forward(mb, LossNorm{}, ForwardOptions{false, nullptr, &rec});
  const auto mb2 = make_batch(1, 7, cfg.vocab_size, 4);
  EXPECT_THROW(m.forward(mb2, LossNorm{}, ForwardOptions{false, &rec, nullptr}), Error);
}

// A replayed selection that differs from the live one: the loss is a smooth function
// of every parameter (the selection is fixed), so its gradient matches central
// differences, the router's included (weights come from the live scores).
TEST(Replay, FixedSelectionGradientMatchesFiniteDifferences) {
  const auto cfg = small_cfg({{"num_hidden_layers", 2}, {"seq_aux_loss_coeff", 0.05}, {"z_loss_coeff", 0.01},
                              {"first_k_dense_replace", 1}});
  Model<double> m(cfg);
  m.init(13);
  const auto mb = make_batch(2, 6, cfg.vocab_size, 21);
  const int64_t N = mb.tokens();
  RoutingTrace sel;
  sel.idx.assign(cfg.num_moe_layers(), std::vector<int32_t>(N * cfg.K()));
  sel.kept.assign(cfg.num_moe_layers(), std::vector<uint8_t>(N * cfg.K(), 1));
  for (auto& layer : sel.idx)
    for (int64_t t = 0; t < N; ++t) {  // experts (t, t+1) mod E: not what the router would pick
      layer[t * 2] = int32_t(t % cfg.E());
      layer[t * 2 + 1] = int32_t((t + 1) % cfg.E());
    }
  sel.kept[0][3] = 0;  // a dropped pair
  const LossNorm norm{double(mb.count_targets()), 1, 2};
  auto loss = [&](bool backward) {
    const MicroStats st = m.forward(mb, norm, ForwardOptions{backward, &sel, nullptr});
    auto& dl = m.dlogits_buffer();
    dl.resize(m.logits().size());
    const double ce = ops::cross_entropy_forward_backward(backward ? dl.data() : static_cast<double*>(nullptr),
                                                          m.logits().data(), m.targets().data(), N,
                                                          cfg.vocab_size, 1.0 / norm.n_targets) /
                      norm.n_targets;
    if (backward) m.backward(dl.data());
    return ce + st.aux_loss + st.seq_aux_loss + st.z_loss;
  };
  m.zero_grad();
  loss(true);
  const std::vector<double> g = m.grads();
  for (const auto& t : m.layout().tensors()) {
    double gmax = 0;
    for (size_t i = 0; i < t.numel; ++i) gmax = std::max(gmax, std::fabs(g[t.offset + i]));
    const double floor = 1e-5 * (1.0 + gmax);
    double worst = 0;
    const size_t step = t.numel <= 32 ? 1 : t.numel / 32;
    for (size_t i = 0; i < t.numel; i += step)
      worst = std::max(worst, rel_err(fd([&] { return loss(false); }, m.params()[t.offset + i], 1e-5),
                                      g[t.offset + i], floor));
    EXPECT_LT(worst, 1e-5) << t.name;
  }
}
