// Model<T>: the whole forward and backward of MODEL.md section 2-3 for one micro-batch.
//   h = embed[x]; per layer: h += Attn(RMSNorm(h)); h += FFN(RMSNorm(h));
//   logits = lm_head(RMSNorm(h)); CE + balance losses.
// Every activation the backward needs is kept in Impl (no recomputation).
#include "moe/model.hpp"

#include "moe/moe_layer.hpp"

#include "moe/error.hpp"
#include "moe/init.hpp"
#include "moe/mlp.hpp"
#include "moe/moe_layer.hpp"
#include "moe/ops.hpp"

namespace moetune {

template <class T>
struct Model<T>::Impl {
  struct Layer {
    // views into params (set once)
    size_t ln1, q, k, v, o, ln2;        // offsets
    size_t dg = 0, du = 0, dd = 0;       // dense FFN
    MoeWeights<T> moe;                    // pointers resolved per call (params may move)
    // activations of the last forward
    std::vector<T> h_in, a_in, rstd1, q_act, k_act, v_act, probs, ctx, h_mid, f_in, rstd2;
    MlpCache<T> dense;
    MoeCache<T> moe_cache;
  };
  std::vector<Layer> layers;
  size_t embed = 0, norm = 0, lm_head = 0;
  std::vector<T> h_final, x_final, rstd_final, logits, dlogits;
  std::vector<int32_t> pos, targets;
  MoeScratch<T> scratch;
  // work buffers reused across calls: hidden state, branch output and their gradients
  std::vector<T> h, tmp, dh, dx, dq, dk, dv, dctx;
  int rows = 0, seq_len = 0;
};

template <class T>
Model<T>::Model(const ModelConfig& cfg, int expert_begin, int expert_end)
    : cfg_(cfg), layout_(ParamLayout::build(cfg, expert_begin, expert_end)), impl_(std::make_unique<Impl>()) {
  local_stage_ = std::make_unique<LocalExpertStage<T>>(cfg.d(), cfg.F(), [this](int l) { return expert_views(l); });
  stage_ = local_stage_.get();
  params_.assign(layout_.total(), T(0));
  grads_.assign(layout_.total(), T(0));
  bias_.assign(cfg.num_moe_layers(), std::vector<float>(cfg.E(), 0.f));
  auto& I = *impl_;
  I.embed = layout_.offset("model.embed_tokens.weight");
  I.norm = layout_.offset("model.norm.weight");
  I.lm_head = cfg.tie_word_embeddings ? I.embed : layout_.offset("lm_head.weight");
  I.layers.resize(cfg.num_hidden_layers);
  for (int l = 0; l < cfg.num_hidden_layers; ++l) {
    auto& L = I.layers[l];
    auto off = [&](const std::string& rest) { return layout_.offset(ParamLayout::layer(l, rest)); };
    L.ln1 = off("input_layernorm.weight");
    L.q = off("self_attn.q_proj.weight");
    L.k = off("self_attn.k_proj.weight");
    L.v = off("self_attn.v_proj.weight");
    L.o = off("self_attn.o_proj.weight");
    L.ln2 = off("post_attention_layernorm.weight");
    if (!cfg.is_moe_layer(l)) {
      L.dg = off("mlp.gate_proj.weight");
      L.du = off("mlp.up_proj.weight");
      L.dd = off("mlp.down_proj.weight");
    }
  }
}

template <class T>
Model<T>::~Model() = default;

template <class T>
void Model<T>::init(uint64_t seed) {
  init_params(layout_, cfg_, seed, params_);
  for (auto& b : bias_) std::fill(b.begin(), b.end(), 0.f);
}

template <class T>
void Model<T>::zero_grad() {
  std::fill(grads_.begin(), grads_.end(), T(0));
}

template <class T>
const std::vector<T>& Model<T>::logits() const {
  return impl_->logits;
}

template <class T>
void Model<T>::set_expert_stage(ExpertStage<T>* stage) {
  stage_ = stage ? stage : local_stage_.get();
}

template <class T>
LocalExpertStage<T>& Model<T>::local_expert_stage() {
  return *local_stage_;
}

template <class T>
ExpertViews<T> Model<T>::expert_views(int l) {
  ExpertViews<T> v;
  for (int e = layout_.expert_begin(); e < layout_.expert_end(); ++e) {
    const size_t g = layout_.offset(ParamLayout::expert(l, e, "gate_proj"));
    const size_t u = layout_.offset(ParamLayout::expert(l, e, "up_proj"));
    const size_t dn = layout_.offset(ParamLayout::expert(l, e, "down_proj"));
    v.wg.push_back(params_.data() + g);
    v.wu.push_back(params_.data() + u);
    v.wd.push_back(params_.data() + dn);
    v.dwg.push_back(grads_.data() + g);
    v.dwu.push_back(grads_.data() + u);
    v.dwd.push_back(grads_.data() + dn);
  }
  return v;
}

namespace {

// Pointers of MoE layer l's gate and shared-expert weights inside a flat buffer.
template <class P, class T>
void moe_views(P& w, T* base, const ParamLayout& lay, const ModelConfig& c, int l) {
  w.gate = base + lay.offset(ParamLayout::layer(l, "mlp.gate.weight"));
  if (c.n_shared_experts > 0) {
    w.sg = base + lay.offset(ParamLayout::layer(l, "mlp.shared_experts.gate_proj.weight"));
    w.su = base + lay.offset(ParamLayout::layer(l, "mlp.shared_experts.up_proj.weight"));
    w.sd = base + lay.offset(ParamLayout::layer(l, "mlp.shared_experts.down_proj.weight"));
  }
}

}  // namespace

template <class T>
MicroStats Model<T>::forward_backward(const MicroBatch& mb, const LossNorm& norm, bool backward) {
  auto& I = *impl_;
  const ModelConfig& c = cfg_;
  const int B = mb.rows, S = mb.seq_len;
  const int64_t N = mb.tokens(), d = c.d(), V = c.vocab_size, H = c.H(), Hkv = c.Hkv(), hd = c.hd();
  const int64_t qd = H * hd, kvd = Hkv * hd;
  if (int64_t(mb.input_ids.size()) != N || int64_t(mb.labels.size()) != N || int64_t(mb.doc_ids.size()) != N)
    throw Error("micro-batch: input_ids/labels/doc_ids must have rows*seq_len elements");
  if (S > c.max_position_embeddings)
    throw Error("micro-batch: seq_len " + std::to_string(S) + " exceeds max_position_embeddings " +
                std::to_string(c.max_position_embeddings));
  for (int64_t i = 0; i < N; ++i)
    if (mb.input_ids[i] < 0 || mb.input_ids[i] >= V)
      throw Error("micro-batch: token id " + std::to_string(mb.input_ids[i]) + " at position " + std::to_string(i) +
                  " is outside the vocabulary [0, " + std::to_string(V) + ")");
  I.rows = B;
  I.seq_len = S;
  // RoPE positions restart at each document; targets shift labels by one.
  I.pos.resize(N);
  I.targets.resize(N);
  for (int64_t i = 0; i < N; ++i) {
    const bool start = i % S == 0 || mb.doc_ids[i] != mb.doc_ids[i - 1];
    I.pos[i] = start ? 0 : I.pos[i - 1] + 1;
    I.targets[i] = mb.target(i);
  }
  const T* P = params_.data();
  const BalanceScales sc{c.aux_loss_coeff / norm.n_micro, c.seq_aux_loss_coeff / norm.n_rows,
                         c.z_loss_coeff / norm.n_micro};
  MicroStats st;

  // ---- forward
  auto& h = I.h;
  auto& tmp = I.tmp;
  h.resize(N * d);
  tmp.resize(N * d);
  ops::embedding_forward(h.data(), mb.input_ids.data(), P + I.embed, N, d);
  int moe_j = 0;
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    auto& L = I.layers[l];
    L.h_in = h;
    L.a_in.resize(N * d);
    L.rstd1.resize(N);
    ops::rmsnorm_forward(L.a_in.data(), L.rstd1.data(), h.data(), P + L.ln1, N, d, c.rms_norm_eps);
    L.q_act.resize(N * qd);
    L.k_act.resize(N * kvd);
    L.v_act.resize(N * kvd);
    ops::linear_forward(L.q_act.data(), L.a_in.data(), P + L.q, N, d, qd);
    ops::linear_forward(L.k_act.data(), L.a_in.data(), P + L.k, N, d, kvd);
    ops::linear_forward(L.v_act.data(), L.a_in.data(), P + L.v, N, d, kvd);
    ops::rope_apply(L.q_act.data(), I.pos.data(), N, H, hd, c.rope_theta, +1);
    ops::rope_apply(L.k_act.data(), I.pos.data(), N, Hkv, hd, c.rope_theta, +1);
    L.probs.resize(int64_t(B) * H * S * S);
    L.ctx.resize(N * qd);
    ops::attention_forward(L.ctx.data(), L.probs.data(), L.q_act.data(), L.k_act.data(), L.v_act.data(),
                           mb.doc_ids.data(), B, S, H, Hkv, hd);
    ops::linear_forward(tmp.data(), L.ctx.data(), P + L.o, N, qd, d);
    for (int64_t i = 0; i < N * d; ++i) h[i] += tmp[i];
    L.h_mid = h;
    L.f_in.resize(N * d);
    L.rstd2.resize(N);
    ops::rmsnorm_forward(L.f_in.data(), L.rstd2.data(), h.data(), P + L.ln2, N, d, c.rms_norm_eps);
    if (!c.is_moe_layer(l)) {
      const int64_t Fi = c.intermediate_size;
      L.dense.resize(N, Fi);
      mlp_forward(tmp.data(), L.dense.g.data(), L.dense.u.data(), L.dense.a.data(), L.f_in.data(), P + L.dg,
                  P + L.du, P + L.dd, N, d, Fi);
    } else {
      moe_views(L.moe, P, layout_, c, l);
      moe_forward(tmp.data(), L.moe_cache, L.f_in.data(), L.moe, *stage_, l, bias_[moe_j].data(), c, B, S, sc);
      st.aux_loss += L.moe_cache.losses.aux;
      st.seq_aux_loss += L.moe_cache.losses.seq;
      st.z_loss += L.moe_cache.losses.z;
      st.expert_counts.push_back(L.moe_cache.routing.counts);
      st.dropped_pairs += L.moe_cache.routing.dropped;
      ++moe_j;
    }
    for (int64_t i = 0; i < N * d; ++i) h[i] += tmp[i];
  }
  I.h_final = h;
  I.x_final.resize(N * d);
  I.rstd_final.resize(N);
  ops::rmsnorm_forward(I.x_final.data(), I.rstd_final.data(), h.data(), P + I.norm, N, d, c.rms_norm_eps);
  I.logits.resize(N * V);
  ops::linear_forward(I.logits.data(), I.x_final.data(), P + I.lm_head, N, d, V);
  st.n_targets = 0;
  for (int64_t i = 0; i < N; ++i) st.n_targets += I.targets[i] != kIgnoreIndex;
  const double denom = norm.n_targets > 0 ? norm.n_targets : 1.0;
  if (backward) I.dlogits.resize(N * V);
  st.ce_sum = ops::cross_entropy_forward_backward(backward ? I.dlogits.data() : static_cast<T*>(nullptr),
                                                  I.logits.data(), I.targets.data(), N, V, 1.0 / denom);
  st.ce = st.ce_sum / denom;
  if (!backward) return st;

  // ---- backward
  T* G = grads_.data();
  auto &dh = I.dh, &dx = I.dx, &dq = I.dq, &dk = I.dk, &dv = I.dv, &dctx = I.dctx;
  dh.assign(N * d, T(0));
  dx.assign(N * d, T(0));
  dq.resize(N * qd);
  dk.resize(N * kvd);
  dv.resize(N * kvd);
  dctx.resize(N * qd);
  ops::linear_backward(dx.data(), G + I.lm_head, I.dlogits.data(), I.x_final.data(), P + I.lm_head, N, d, V);
  ops::rmsnorm_backward(dh.data(), G + I.norm, dx.data(), I.h_final.data(), P + I.norm, I.rstd_final.data(), N, d);
  for (int l = c.num_hidden_layers - 1; l >= 0; --l) {
    auto& L = I.layers[l];
    // FFN: h = h_mid + FFN(RMSNorm(h_mid))
    std::fill(dx.begin(), dx.end(), T(0));
    if (!c.is_moe_layer(l)) {
      const int64_t Fi = c.intermediate_size;
      mlp_backward(dx.data(), G + L.dg, G + L.du, G + L.dd, dh.data(), L.f_in.data(), L.dense.g.data(),
                   L.dense.u.data(), L.dense.a.data(), P + L.dg, P + L.du, P + L.dd, N, d, Fi, I.scratch.mlp);
    } else {
      --moe_j;
      MoeGrads<T> g;
      moe_views(g, G, layout_, c, l);
      moe_backward(dx.data(), g, dh.data(), L.f_in.data(), L.moe, *stage_, l, L.moe_cache, c, B, S, sc, I.scratch);
    }
    ops::rmsnorm_backward(dh.data(), G + L.ln2, dx.data(), L.h_mid.data(), P + L.ln2, L.rstd2.data(), N, d);
    // Attention: h_mid = h_in + o_proj(Attn(RMSNorm(h_in)))
    std::fill(dctx.begin(), dctx.end(), T(0));
    ops::linear_backward(dctx.data(), G + L.o, dh.data(), L.ctx.data(), P + L.o, N, qd, d);
    std::fill(dq.begin(), dq.end(), T(0));
    std::fill(dk.begin(), dk.end(), T(0));
    std::fill(dv.begin(), dv.end(), T(0));
    ops::attention_backward(dq.data(), dk.data(), dv.data(), dctx.data(), L.probs.data(), L.q_act.data(),
                            L.k_act.data(), L.v_act.data(), B, S, H, Hkv, hd);
    ops::rope_apply(dq.data(), I.pos.data(), N, H, hd, c.rope_theta, -1);
    ops::rope_apply(dk.data(), I.pos.data(), N, Hkv, hd, c.rope_theta, -1);
    std::fill(dx.begin(), dx.end(), T(0));
    ops::linear_backward(dx.data(), G + L.q, dq.data(), L.a_in.data(), P + L.q, N, d, qd);
    ops::linear_backward(dx.data(), G + L.k, dk.data(), L.a_in.data(), P + L.k, N, d, kvd);
    ops::linear_backward(dx.data(), G + L.v, dv.data(), L.a_in.data(), P + L.v, N, d, kvd);
    ops::rmsnorm_backward(dh.data(), G + L.ln1, dx.data(), L.h_in.data(), P + L.ln1, L.rstd1.data(), N, d);
  }
  ops::embedding_backward(G + I.embed, dh.data(), mb.input_ids.data(), N, d);
  return st;
}

template class Model<float>;
template class Model<double>;

}  // namespace moetune
