// Model<T>: the whole forward and backward of MODEL.md section 2-3 for one micro-batch.
//   h = embed[x]; per layer: h += Attn(RMSNorm(h)); h += FFN(RMSNorm(h));
//   logits = lm_head(RMSNorm(h)); CE + balance losses.
// Every activation the backward needs is kept in Impl (no recomputation); inference
// (a forward without backward, and extend() over a KV cache) keeps none of them.
#include "moe/model.hpp"

#include <array>
#include <stdexcept>
#include <unordered_map>

#include "moe/attention_v4.hpp"
#include "moe/error.hpp"
#include "moe/hc.hpp"
#include "moe/init.hpp"
#include "moe/mlp.hpp"
#include "moe/moe_layer.hpp"
#include "moe/mtp.hpp"
#include "moe/ops.hpp"
#include "moe/profile.hpp"

namespace moetune {

namespace {
// v = n zeros / a copy of src[0, n), written by a team when large (kernels/parallel.hpp).
template <class T>
void assign_zeros(std::vector<T>& v, size_t n) {
  v.resize(n);
  kernels::parallel_fill(v.data(), int64_t(n), T(0));
}
template <class T>
void zero(std::vector<T>& v) {
  kernels::parallel_fill(v.data(), int64_t(v.size()), T(0));
}
template <class T>
void assign_copy(std::vector<T>& v, const T* src, size_t n) {
  v.resize(n);
  kernels::parallel_copy(v.data(), src, int64_t(n));
}
}  // namespace

// Offsets of a MoE layer's gate and shared-expert tensors in the flat buffers.
struct MoeOffsets {
  size_t gate = 0, sg = 0, su = 0, sd = 0;
  bool shared = false;
};

// Offsets of one mHC connection (fn, base, scale) in the flat buffers.
struct HcOffsets {
  size_t fn = 0, base = 0, scale = 0;
  template <class T>
  hc::HcWeights<T> weights(const T* P) const {
    return {P + fn, P + base, P + scale};
  }
  template <class T>
  hc::HcGrads<T> grads(T* G) const {
    return {G + fn, G + base, G + scale};
  }
};

template <class T>
struct Model<T>::Impl {
  struct Layer {
    // views into params (set once)
    size_t ln1, q = 0, k = 0, v = 0, o = 0, ln2;  // offsets (q..o: the default attention)
    AttentionV4Offsets v4;                        // attention_type "v4"
    size_t dg = 0, du = 0, dd = 0;       // dense FFN
    MoeOffsets moe_off;                  // MoE layers: gate and shared expert
    HcOffsets hc_attn, hc_ffn;           // mHC (hc_mult > 1): the connections of both sub-blocks
    MoeWeights<T> moe;                    // pointers resolved per call (params may move)
    // activations of the last forward
    // qkv (N, (H + 2 Hkv) hd): each row holds q, then k, then v (qkv_layout)
    std::vector<T> h_in, a_in, rstd1, qkv, attn_stats, ctx, h_mid, f_in, rstd2;
    AttentionV4Cache<T> v4_cache;
    MlpCache<T> dense;
    MoeCache<T> moe_cache;
    // mHC: the streams entering each sub-block (N,n,d), the sub-blocks' outputs (N,d)
    // and the connections' states. h_in / h_mid then hold the collapsed inputs u.
    std::vector<T> x_in, x_mid, y_attn, y_ffn;
    hc::HcState<T> hs_attn, hs_ffn;
  };
  // The decoder blocks: layers[l] is model layer l; with MTP, layers[num_hidden_layers]
  // is the MTP block (model-layer index ModelConfig::kMtpLayer).
  std::vector<Layer> layers;
  // MTP (MODEL.md section 12): h' = e_proj(enorm(embed(x_{t+1}))) + h_proj(hnorm(h_t)),
  // the block, its head's collapse (mHC), its norm and the shared LM head.
  struct Mtp {
    size_t enorm = 0, hnorm = 0, e_proj = 0, h_proj = 0, norm = 0;
    HcOffsets hc_head;
    std::vector<int32_t> ids, targets;                        // (N) input x_{t+1}, target x_{t+2}
    std::vector<T> h_t, e, e_n, e_rstd, h_n, h_rstd;          // inputs of h' and their norms
    std::vector<T> h_final, x_final, rstd_final, logits, dlogits, xs_final, dh_t;
    hc::HcState<T> hs_head;
    bool ran = false;  // the last training forward ran the block (backward() follows it)
  } mtp;
  // expert_views() per layer, and the buffers it was built for (rebuilt if they move).
  struct CachedViews {
    bool built = false;
    const T *params = nullptr, *grads = nullptr;
    ExpertViews<T> views;
  };
  std::unordered_map<int, CachedViews> expert_views;
  Layer work;  // the buffers of every layer in inference (forward without backward, extend)
  size_t embed = 0, norm = 0, lm_head = 0;
  HcOffsets hc_head;        // mHC: the head's collapse
  hc::HcState<T> hs_head;
  std::vector<T> xs_final;  // mHC: the streams entering the head (N,n,d)
  // mHC work buffers: the other stream buffer, the collapsed input u, and gradients
  std::vector<T> xs2, u, dxs, dxs2, du;
  hc::HcWork<T> hc_work;
  std::vector<T> h_final, x_final, rstd_final, logits, dlogits;
  std::vector<int32_t> pos, targets, ids, doc;
  BalanceScales sc;      // balance-loss weights of the last forward
  bool trained = false;  // the last forward kept what backward() needs
  MoeScratch<T> scratch;
  AttentionV4Scratch<T> v4_scratch;
  // work buffers reused across calls: hidden state, branch output and their gradients
  std::vector<T> h, tmp, dh, dx, dqkv, dctx;  // dqkv: the gradient of qkv, in its layout
  int rows = 0, seq_len = 0;
};

template <class T>
Model<T>::Model(const ModelConfig& cfg, int expert_begin, int expert_end)
    : cfg_(cfg), layout_(ParamLayout::build(cfg, expert_begin, expert_end)), impl_(std::make_unique<Impl>()) {
  local_stage_ = std::make_unique<LocalExpertStage<T>>(cfg.d(), cfg.F(), [this](int l) -> const ExpertViews<T>& { return expert_views(l); });
  stage_ = local_stage_.get();
  params_.assign(layout_.total(), T(0));
  grads_.assign(layout_.total(), T(0));
  bias_.assign(cfg.num_moe_layers(), std::vector<float>(cfg.E(), 0.f));
  for (int j = 0; j < cfg.num_hash_layers; ++j) bias_[j].clear();  // hash-routed: no bias
  tid2eid_.assign(cfg.num_hash_layers, std::vector<int32_t>(int64_t(cfg.vocab_size) * cfg.K(), 0));
  auto& I = *impl_;
  I.embed = layout_.offset("model.embed_tokens.weight");
  I.norm = layout_.offset("model.norm.weight");
  I.lm_head = cfg.tie_word_embeddings ? I.embed : layout_.offset("lm_head.weight");
  const auto hc_offsets = [&](const std::string& prefix, const char* fn, const char* base, const char* scale) {
    return HcOffsets{layout_.offset(prefix + fn), layout_.offset(prefix + base), layout_.offset(prefix + scale)};
  };
  if (cfg.hc()) I.hc_head = hc_offsets("model.hc_head.", "hc_fn", "hc_base", "hc_scale");
  I.layers.resize(cfg.num_hidden_layers + (cfg.mtp() ? 1 : 0));
  for (int li = 0; li < int(I.layers.size()); ++li) {
    auto& L = I.layers[li];
    const int l = li < cfg.num_hidden_layers ? li : ModelConfig::kMtpLayer;
    auto off = [&](const std::string& rest) { return layout_.offset(ParamLayout::layer(l, rest)); };
    L.ln1 = off("input_layernorm.weight");
    if (cfg.v4_attention()) {
      L.v4.q_a = off("self_attn.q_a_proj.weight");
      L.v4.q_a_norm = off("self_attn.q_a_norm.weight");
      L.v4.q_b = off("self_attn.q_b_proj.weight");
      L.v4.kv = off("self_attn.kv_proj.weight");
      L.v4.kv_norm = off("self_attn.kv_norm.weight");
      L.v4.o_a = off("self_attn.o_a_proj.weight");
      L.v4.o_b = off("self_attn.o_b_proj.weight");
      L.v4.sinks = off("self_attn.sinks");
    } else {
      L.q = off("self_attn.q_proj.weight");
      L.k = off("self_attn.k_proj.weight");
      L.v = off("self_attn.v_proj.weight");
      L.o = off("self_attn.o_proj.weight");
    }
    L.ln2 = off("post_attention_layernorm.weight");
    if (cfg.hc()) {
      L.hc_attn = hc_offsets(ParamLayout::layer(l, "attn_hc."), "fn", "base", "scale");
      L.hc_ffn = hc_offsets(ParamLayout::layer(l, "ffn_hc."), "fn", "base", "scale");
    }
    if (!cfg.is_moe_layer(l)) {
      L.dg = off("mlp.gate_proj.weight");
      L.du = off("mlp.up_proj.weight");
      L.dd = off("mlp.down_proj.weight");
    } else {
      L.moe_off.gate = off("mlp.gate.weight");
      L.moe_off.shared = cfg.n_shared_experts > 0;
      if (L.moe_off.shared) {
        L.moe_off.sg = off("mlp.shared_experts.gate_proj.weight");
        L.moe_off.su = off("mlp.shared_experts.up_proj.weight");
        L.moe_off.sd = off("mlp.shared_experts.down_proj.weight");
      }
    }
  }
  if (cfg.mtp()) {
    auto off = [&](const std::string& rest) { return layout_.offset(ParamLayout::layer(ModelConfig::kMtpLayer, rest)); };
    I.mtp.enorm = off("enorm.weight");
    I.mtp.hnorm = off("hnorm.weight");
    I.mtp.e_proj = off("e_proj.weight");
    I.mtp.h_proj = off("h_proj.weight");
    I.mtp.norm = off("norm.weight");
    if (cfg.hc()) I.mtp.hc_head = hc_offsets(ParamLayout::layer(ModelConfig::kMtpLayer, "hc_head."), "hc_fn", "hc_base",
                                             "hc_scale");
  }
}

template <class T>
Model<T>::~Model() = default;

template <class T>
void Model<T>::init(uint64_t seed) {
  init_params(layout_, cfg_, seed, params_);
  for (auto& b : bias_) std::fill(b.begin(), b.end(), 0.f);
  for (int j = 0; j < cfg_.num_hash_layers; ++j) tid2eid_[j] = init_tid2eid(cfg_, seed, cfg_.moe_layer(j));
}

template <class T>
void Model<T>::zero_grad() {
  zero(grads_);
}

template <class T>
const std::vector<T>& Model<T>::logits() const {
  return impl_->logits;
}

template <class T>
const std::vector<int32_t>& Model<T>::targets() const {
  return impl_->targets;
}

template <class T>
const std::vector<T>& Model<T>::mtp_logits() const {
  return impl_->mtp.logits;
}

template <class T>
const std::vector<int32_t>& Model<T>::mtp_targets() const {
  return impl_->mtp.targets;
}

template <class T>
std::vector<T>& Model<T>::dlogits_buffer() {
  return impl_->dlogits;
}

template <class T>
int64_t Model<T>::activation_bytes() const {
  const auto& I = *impl_;
  int64_t b = 0;
  const auto add = [&b](const auto&... v) { ((b += int64_t(v.capacity() * sizeof(v[0]))), ...); };
  const auto add_layer = [&](const typename Impl::Layer& L) {
    add(L.h_in, L.a_in, L.rstd1, L.qkv, L.attn_stats, L.ctx, L.h_mid, L.f_in, L.rstd2);
    b += L.v4_cache.bytes();
    add(L.dense.gu, L.dense.a, L.moe_cache.shared.gu, L.moe_cache.shared.a);
    const auto& m = L.moe_cache;
    add(m.logits, m.xp, m.yp, m.routing.scores, m.routing.idx, m.routing.weight, m.routing.kept);
    add(L.x_in, L.x_mid, L.y_attn, L.y_ffn);
    for (const auto* s : {&L.hs_attn, &L.hs_ffn}) add(s->mix, s->rstd, s->pre, s->post, s->comb);
  };
  for (const auto& L : I.layers) add_layer(L);
  add_layer(I.work);
  add(I.h_final, I.x_final, I.rstd_final, I.logits, I.dlogits, I.h, I.tmp, I.dh, I.dx, I.dqkv, I.dctx);
  add(I.xs_final, I.xs2, I.u, I.dxs, I.dxs2, I.du, I.hs_head.mix, I.hs_head.rstd, I.hs_head.pre);
  add(I.hc_work.dpre, I.hc_work.dpost, I.hc_work.dcomb, I.hc_work.da, I.hc_work.dmix);
  const auto& M = I.mtp;
  add(M.h_t, M.e, M.e_n, M.e_rstd, M.h_n, M.h_rstd, M.h_final, M.x_final, M.rstd_final, M.logits, M.dlogits,
      M.xs_final, M.dh_t, M.hs_head.mix, M.hs_head.rstd, M.hs_head.pre);
  add(I.scratch.dyp, I.scratch.dxp, I.scratch.dweight, I.scratch.dlogits, I.scratch.mlp);
  b += I.v4_scratch.bytes();
  return b;
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
const ExpertViews<T>& Model<T>::expert_views(int l) {
  auto& cached = impl_->expert_views[l];
  if (cached.built && cached.params == params_.data() && cached.grads == grads_.data()) return cached.views;
  cached.built = true;
  cached.params = params_.data();
  cached.grads = grads_.data();
  ExpertViews<T>& v = cached.views;
  v = ExpertViews<T>{};
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
  v.swiglu_limit = cfg_.swiglu_limit;
  return v;
}

namespace {

// Pointers of a MoE layer's gate and shared-expert weights inside a flat buffer, from
// the offsets looked up once at construction.
template <class P, class T>
void moe_views(P& w, T* base, const MoeOffsets& o) {
  w.gate = base + o.gate;
  if (o.shared) {
    w.sg = base + o.sg;
    w.su = base + o.su;
    w.sd = base + o.sd;
  }
}

}  // namespace

namespace {

template <class T>
void check_tokens(const int32_t* ids, int64_t n, int64_t V) {
  for (int64_t i = 0; i < n; ++i)
    if (ids[i] < 0 || ids[i] >= V)
      throw Error("micro-batch: token id " + std::to_string(ids[i]) + " at position " + std::to_string(i) +
                  " is outside the vocabulary [0, " + std::to_string(V) + ")");
}

// The hash tables must have V*K entries each (route_hash reads row ids[t] of each).
inline void check_tables(const std::vector<std::vector<int32_t>>& tid2eid, const ModelConfig& c) {
  for (const auto& t : tid2eid)
    if (int64_t(t.size()) != int64_t(c.vocab_size) * c.K())
      throw Error("tid2eid: a hash-routing table has " + std::to_string(t.size()) + " entries, expected V*K = " +
                  std::to_string(int64_t(c.vocab_size) * c.K()));
}

// Routing control of MoE layer j of a forward over the tokens `ids`; tid2eid: the
// model's hash tables (MoE layer j < num_hash_layers routes by tid2eid[j]).
inline RouteControl route_control(const ForwardOptions& opt, int j, const std::vector<std::vector<int32_t>>& tid2eid,
                                  const int32_t* ids, const uint8_t* padding = nullptr) {
  RouteControl rc;
  rc.padding = padding;
  if (j < int(tid2eid.size())) {
    rc.tid2eid = tid2eid[j].data();
    rc.token_ids = ids;
  }
  if (opt.replay) {
    rc.replay_idx = opt.replay->idx.at(j).data();
    rc.replay_kept = opt.replay->kept.at(j).data();
  }
  if (opt.record) {
    rc.record_idx = &opt.record->idx[j];
    rc.record_kept = &opt.record->kept[j];
  }
  return rc;
}

// a = RMSNorm_in(h) (N tokens) into L.a_in, the input of either attention.
template <class T, class Buf, class Wts>
void attention_norm(Buf& L, const Wts& W, const T* P, const T* h, int64_t N, const ModelConfig& c) {
  const int64_t d = c.d();
  L.a_in.resize(N * d);
  L.rstd1.resize(N);
  ops::rmsnorm_forward(L.a_in.data(), L.rstd1.data(), h, P + W.ln1, N, d, c.rms_norm_eps);
}
// The fused Q/K/V projection of the default attention, one grouped linear layer
// (ops::grouped_linear_*): the parameter layout stores q_proj, k_proj, v_proj one after
// the other (ParamLayout), so qkv = a [Wq; Wk; Wv]^T is one GEMM whose row holds q, k,
// v, with the same bits as three; attention and RoPE read q, k and v in place through
// their row stride.
struct QkvLayout {
  int64_t qd, kvd, ld;  // widths of q and of k (= v), and the row length qd + 2 kvd
  int64_t k_at() const { return qd; }
  int64_t v_at() const { return qd + kvd; }
};
inline QkvLayout qkv_layout(const ModelConfig& c) {
  const int64_t qd = int64_t(c.H()) * c.hd(), kvd = int64_t(c.Hkv()) * c.hd();
  return {qd, kvd, qd + 2 * kvd};
}
// q, k and v as the parts of one grouped linear layer (ops::grouped_linear_*), the
// weights at offsets q, k, v of P and their gradients at the same offsets of G (null:
// a forward).
template <class T>
std::array<ops::LinearPart<T>, 3> qkv_parts(const T* P, T* G, size_t q, size_t k, size_t v, const QkvLayout& Q) {
  return {ops::LinearPart<T>{P + q, G ? G + q : nullptr, Q.qd}, ops::LinearPart<T>{P + k, G ? G + k : nullptr, Q.kvd},
          ops::LinearPart<T>{P + v, G ? G + v : nullptr, Q.kvd}};
}

// Shared by forward() and extend(): the attention inputs of one layer, a = RMSNorm(h)
// and qkv with RoPE on q and k at pos (N tokens), into the buffers L with the weights W
// (the default attention; V4's are attention_v4_project).
template <class T, class Buf, class Wts>
void attention_inputs(Buf& L, const Wts& W, const T* P, const T* h, const int32_t* pos, int64_t N,
                      const ModelConfig& c) {
  const int64_t d = c.d(), hd = c.hd();
  const QkvLayout Q = qkv_layout(c);
  attention_norm(L, W, P, h, N, c);
  L.qkv.resize(N * Q.ld);
  ops::grouped_linear_forward<T, 3>(L.qkv.data(), L.a_in.data(), qkv_parts<T>(P, nullptr, W.q, W.k, W.v, Q), N, d);
  ops::rope_apply(L.qkv.data(), pos, N, c.H(), hd, c.rope_theta, +1, Q.ld);
  ops::rope_apply(L.qkv.data() + Q.k_at(), pos, N, c.Hkv(), hd, c.rope_theta, +1, Q.ld);
}

// The FFN sub-block of layer l: f_in = RMSNorm(h), out (N,d) = the dense MLP of a dense
// layer, or moe(L) (the caller's MoE call: its rows, balance scales and routing control).
template <class T, class Buf, class Wts, class MoeCall>
void ffn_forward(T* out, Buf& L, const Wts& W, const T* P, const T* h, int64_t N, const ModelConfig& c, int l,
                 MoeCall&& moe) {
  const int64_t d = c.d();
  L.f_in.resize(N * d);
  L.rstd2.resize(N);
  ops::rmsnorm_forward(L.f_in.data(), L.rstd2.data(), h, P + W.ln2, N, d, c.rms_norm_eps);
  if (c.is_moe_layer(l)) {
    moe(L);
    return;
  }
  // swiglu_limit clamps the MoE experts only (MODEL.md section 12 names the routed and
  // shared experts, as transformers' deepseek_v4 does); the dense FFN is never clamped.
  const int64_t Fi = c.intermediate_size;
  L.dense.resize(N, Fi);
  mlp_forward(out, L.dense.gu.data(), L.dense.a.data(), L.f_in.data(), P + W.dg, P + W.du, P + W.dd, N, d, Fi);
}

inline hc::HcShape hc_shape(const ModelConfig& c, bool head) {
  return hc::HcShape{c.hc_mult, c.d(), c.hc_sinkhorn_iters, c.hc_eps, c.rms_norm_eps, head};
}

// A sub-block's output y (n,d) joins the residual stream(s) h: with mHC (st non-null)
// its expansion into the streams (hc::leave_forward, into `spare`, then swapped in),
// else h += y.
template <class T>
void leave_sub_block(std::vector<T>& h, std::vector<T>& spare, const T* y, const hc::HcState<T>* st, int64_t n,
                     int64_t d, const hc::HcShape& hs) {
  if (st) {
    hc::leave_forward(spare.data(), y, h.data(), *st, n, hs);
    std::swap(h, spare);
  } else {
    kernels::parallel_add(h.data(), y, n * d);  // the residual
  }
}

}  // namespace

template <class T>
MicroStats Model<T>::forward(const MicroBatch& mb, const LossNorm& norm, const ForwardOptions& opt) {
  profile::Scope ps(profile::Phase::embedding);
  auto& I = *impl_;
  const ModelConfig& c = cfg_;
  const int B = mb.rows, S = mb.seq_len;
  const int64_t N = mb.tokens(), d = c.d(), V = c.vocab_size, H = c.H(), Hkv = c.Hkv(), hd = c.hd();
  const int64_t qd = H * hd;
  if (int64_t(mb.input_ids.size()) != N || int64_t(mb.labels.size()) != N || int64_t(mb.doc_ids.size()) != N ||
      (!mb.padding.empty() && int64_t(mb.padding.size()) != N))
    throw Error("micro-batch: input_ids/labels/doc_ids (and padding, if given) must have rows*seq_len elements");
  if (S > c.max_position_embeddings)
    throw Error("micro-batch: seq_len " + std::to_string(S) + " exceeds max_position_embeddings " +
                std::to_string(c.max_position_embeddings));
  check_tokens<T>(mb.input_ids.data(), N, V);
  const int nm = c.num_moe_layers();
  const bool run_mtp = opt.mtp && c.mtp();  // the MTP block's MoE layer is the last one, j = nm - 1
  if (opt.replay && (int(opt.replay->idx.size()) != nm || int(opt.replay->kept.size()) != nm))
    throw Error("routing replay: " + std::to_string(opt.replay->idx.size()) + " MoE layers given, the model has " +
                std::to_string(nm));
  if (opt.replay)
    for (int j = 0; j < nm; ++j)
      if (!(c.mtp() && j == nm - 1 && !run_mtp) &&  // the MTP layer, when it does not run, replays nothing
          (int64_t(opt.replay->idx[j].size()) != N * c.K() || int64_t(opt.replay->kept[j].size()) != N * c.K()))
        throw Error("routing replay: MoE layer " + std::to_string(j) + " has a selection of " +
                    std::to_string(opt.replay->idx[j].size()) + " entries for " + std::to_string(N) + " tokens x K " +
                    std::to_string(c.K()));
  if (opt.record) {
    opt.record->idx.assign(nm, {});
    opt.record->kept.assign(nm, {});
  }
  check_tables(tid2eid_, c);
  I.rows = B;
  I.seq_len = S;
  I.trained = opt.train;
  I.ids = mb.input_ids;
  I.doc = mb.doc_ids;
  // RoPE positions restart at each document; targets shift labels by one.
  I.pos.resize(N);
  I.targets.resize(N);
  for (int64_t i = 0; i < N; ++i) {
    const bool start = i % S == 0 || mb.doc_ids[i] != mb.doc_ids[i - 1];
    I.pos[i] = start ? 0 : I.pos[i - 1] + 1;
    I.targets[i] = mb.target(i);
  }
  const T* P = params_.data();
  I.sc = BalanceScales{c.aux_loss_coeff / norm.n_micro, c.seq_aux_loss_coeff / norm.n_rows,
                       c.z_loss_coeff / norm.n_micro};
  MicroStats st;
  st.expert_counts.reserve(c.num_moe_layers());

  // h: the residual stream (N,d), or with mHC the n streams (N,n,d); `in` is what a
  // sub-block reads: h itself, or with mHC the collapsed u (N,d).
  const bool hc = c.hc();
  const int64_t n = c.hc_mult;
  const hc::HcShape hs = hc_shape(c, false);
  auto& h = I.h;
  auto& tmp = I.tmp;
  h.resize(N * n * d);
  tmp.resize(N * d);
  if (hc) {
    I.xs2.resize(N * n * d);
    I.u.resize(N * d);
  }
  // The stream(s) from x (N,d): h = x, or with mHC x repeated n times.
  const auto enter_stream = [&](const T* x) {
    if (hc)
      hc::repeat_streams(h.data(), x, N, n, d);
    else
      std::copy_n(x, N * d, h.data());
  };
  int moe_j = 0;
  // One decoder block over h: layers[li], model layer l (l = kMtpLayer: the MTP block).
  const auto block = [&](int li, int l) {
    // Inference keeps nothing per layer: every layer uses the same buffers.
    auto& L = opt.train ? I.layers[li] : I.work;
    const auto& W = I.layers[li];
    profile::Scope pl(profile::Phase::attention);
    const T* in = h.data();
    if (hc) {
      if (opt.train) L.x_in = h;
      hc::enter_forward(I.u.data(), L.hs_attn, h.data(), W.hc_attn.weights(P), N, hs);
      in = I.u.data();
    }
    if (opt.train) assign_copy(L.h_in, in, size_t(N * d));
    if (c.v4_attention()) {
      attention_norm(L, W, P, in, N, c);
      attention_v4_forward(tmp.data(), L.v4_cache, W.v4, P, L.a_in.data(), I.pos.data(), mb.doc_ids.data(),
                           int64_t(B), int64_t(S), c);
    } else {
      attention_inputs(L, W, P, in, I.pos.data(), N, c);
      L.attn_stats.resize(int64_t(B) * H * S * 2);
      L.ctx.resize(N * qd);
      const QkvLayout Q = qkv_layout(c);
      ops::attention_forward(L.ctx.data(), L.attn_stats.data(), L.qkv.data(), L.qkv.data() + Q.k_at(),
                             L.qkv.data() + Q.v_at(), mb.doc_ids.data(), B, S, H, Hkv, hd,
                             static_cast<const T*>(nullptr), int64_t(0), Q.ld, Q.ld);
      ops::linear_forward(tmp.data(), L.ctx.data(), P + W.o, N, qd, d);
    }
    if (hc && opt.train) L.y_attn = tmp;
    leave_sub_block(h, I.xs2, tmp.data(), hc ? &L.hs_attn : nullptr, N, d, hs);
    pl.next(profile::Phase::dense_ffn);
    in = h.data();
    if (hc) {
      if (opt.train) L.x_mid = h;
      hc::enter_forward(I.u.data(), L.hs_ffn, h.data(), W.hc_ffn.weights(P), N, hs);
      in = I.u.data();
    }
    if (opt.train) assign_copy(L.h_mid, in, size_t(N * d));
    ffn_forward(tmp.data(), L, W, P, in, N, c, l, [&](auto& Lm) {
      moe_views(Lm.moe, P, W.moe_off);
      moe_forward(tmp.data(), Lm.moe_cache, Lm.f_in.data(), Lm.moe, *stage_, l, bias_[moe_j].data(), c, B, S, I.sc,
                  route_control(opt, moe_j, tid2eid_, mb.input_ids.data(),
                                mb.padding.empty() ? nullptr : mb.padding.data()));
      st.aux_loss += Lm.moe_cache.losses.aux;
      st.seq_aux_loss += Lm.moe_cache.losses.seq;
      st.z_loss += Lm.moe_cache.losses.z;
      st.expert_counts.push_back(Lm.moe_cache.routing.counts);
      st.dropped_pairs += Lm.moe_cache.routing.dropped;
      ++moe_j;
    });
    if (hc && opt.train) L.y_ffn = tmp;
    leave_sub_block(h, I.xs2, tmp.data(), hc ? &L.hs_ffn : nullptr, N, d, hs);
  };
  // The final hidden state (N,d) of the streams in h: h itself, or with mHC the
  // collapse by the head `hco` (its streams kept in xs, its state in hst).
  const auto final_hidden = [&](const HcOffsets& hco, std::vector<T>& xs, hc::HcState<T>& hst) -> const T* {
    if (!hc) return h.data();
    if (opt.train) xs = h;
    hc::enter_forward(I.u.data(), hst, h.data(), hco.weights(P), N, hc_shape(c, true));
    return I.u.data();
  };

  if (hc) {
    ops::embedding_forward(tmp.data(), mb.input_ids.data(), P + I.embed, N, d);
    hc::repeat_streams(h.data(), tmp.data(), N, n, d);
  } else {
    ops::embedding_forward(h.data(), mb.input_ids.data(), P + I.embed, N, d);
  }
  for (int l = 0; l < c.num_hidden_layers; ++l) block(l, l);
  ps.next(profile::Phase::lm_head);
  const T* hf = final_hidden(I.hc_head, I.xs_final, I.hs_head);  // before the final norm
  if (opt.train) assign_copy(I.h_final, hf, size_t(N * d));
  I.x_final.resize(N * d);
  I.rstd_final.resize(N);
  ops::rmsnorm_forward(I.x_final.data(), I.rstd_final.data(), hf, P + I.norm, N, d, c.rms_norm_eps);
  I.logits.resize(N * V);
  ops::linear_forward(I.logits.data(), I.x_final.data(), P + I.lm_head, N, d, V);
  st.n_targets = 0;
  for (int64_t i = 0; i < N; ++i) st.n_targets += I.targets[i] != kIgnoreIndex;

  // MTP (MODEL.md section 12): h' = e_proj(enorm(embed(x_{t+1}))) + h_proj(hnorm(h_t)),
  // h_t = hf, through the same block code, its own head; it predicts x_{t+2}.
  auto& M = I.mtp;
  M.ran = false;
  if (c.mtp() && !run_mtp) st.expert_counts.emplace_back(size_t(c.E()), 0);  // routed nothing
  if (!run_mtp) return st;
  M.ids.resize(N);
  M.targets.resize(N);
  for (int64_t i = 0; i < N; ++i) {
    M.ids[i] = mb.mtp_input(i);
    M.targets[i] = mb.mtp_target(i);
  }
  assign_copy(M.h_t, hf, size_t(N * d));
  M.e.resize(N * d);
  M.e_n.resize(N * d);
  M.e_rstd.resize(N);
  M.h_n.resize(N * d);
  M.h_rstd.resize(N);
  ops::embedding_forward(M.e.data(), M.ids.data(), P + I.embed, N, d);
  mtp_input_forward(tmp.data(), M.e_n.data(), M.e_rstd.data(), M.h_n.data(), M.h_rstd.data(), M.e.data(),
                    M.h_t.data(), P + M.enorm, P + M.hnorm, P + M.e_proj, P + M.h_proj, N, d, c.rms_norm_eps);
  enter_stream(tmp.data());
  block(c.num_hidden_layers, ModelConfig::kMtpLayer);
  const T* hm = final_hidden(M.hc_head, M.xs_final, M.hs_head);
  if (opt.train) assign_copy(M.h_final, hm, size_t(N * d));
  M.x_final.resize(N * d);
  M.rstd_final.resize(N);
  ops::rmsnorm_forward(M.x_final.data(), M.rstd_final.data(), hm, P + M.norm, N, d, c.rms_norm_eps);
  M.logits.resize(N * V);
  ops::linear_forward(M.logits.data(), M.x_final.data(), P + I.lm_head, N, d, V);
  // Its loss: mtp_loss_weight * sum of CE over its targets / the global MTP target count
  // (MODEL.md section 3's convention); the gradient is kept for backward().
  const double denom = norm.n_mtp_targets > 0 ? norm.n_mtp_targets : 1.0;
  if (opt.train) M.dlogits.resize(N * V);
  const double sum = ops::cross_entropy_forward_backward(opt.train ? M.dlogits.data() : static_cast<T*>(nullptr),
                                                         M.logits.data(), M.targets.data(), N, V,
                                                         c.mtp_loss_weight / denom);
  st.mtp_loss = c.mtp_loss_weight * sum / denom;
  for (int64_t i = 0; i < N; ++i) st.n_mtp_targets += M.targets[i] != kIgnoreIndex;
  M.ran = opt.train;
  return st;
}

template <class T>
void Model<T>::backward(const T* dlogits) {
  auto& I = *impl_;
  if (!I.trained) throw std::logic_error("Model::backward without a training forward");
  I.trained = false;  // the activations are consumed (the expert stage's caches are)
  const ModelConfig& c = cfg_;
  const int B = I.rows, S = I.seq_len;
  const int64_t N = int64_t(B) * S, d = c.d(), V = c.vocab_size, H = c.H(), Hkv = c.Hkv(), hd = c.hd();
  const int64_t qd = H * hd;
  const T* P = params_.data();
  T* G = grads_.data();
  auto &dh = I.dh, &dx = I.dx, &dqkv = I.dqkv, &dctx = I.dctx;
  const QkvLayout Q = qkv_layout(c);
  assign_zeros(dh, size_t(N * d));
  assign_zeros(dx, size_t(N * d));
  if (!c.v4_attention()) {
    dqkv.resize(N * Q.ld);
    dctx.resize(N * qd);
  }
  profile::Scope ps(profile::Phase::lm_head_bwd);
  // With mHC, dX (N,n,d) is the streams' gradient, dh the sub-block output's and du its
  // input's; without, dh is the residual stream's gradient and takes every term.
  const bool hc = c.hc();
  const int64_t n = c.hc_mult;
  const hc::HcShape hs = hc_shape(c, false);
  auto &dX = I.dxs, &dX2 = I.dxs2, &du = I.du;
  if (hc) {
    assign_zeros(dX, size_t(N * n * d));
    dX2.resize(N * n * d);
    du.resize(N * d);
  }
  T* dsub = hc ? du.data() : dh.data();  // where a sub-block's input gradient goes
  // One block's backward: on entry dX (mHC) or dh holds the gradient of the block's
  // output stream, on exit that of its input stream. layers[li], model layer l.
  const auto block = [&](int li, int l) {
    auto& L = I.layers[li];
    // FFN: h = h_mid + FFN(RMSNorm(h_mid)); with mHC X' = post FFN(RMSNorm(u)) + comb^T X
    ps.next(profile::Phase::dense_ffn_bwd);
    if (hc) {
      hc::leave_backward(dh.data(), dX2.data(), I.hc_work, dX.data(), L.y_ffn.data(), L.x_mid.data(), L.hs_ffn, N, hs);
      zero(du);
    }
    zero(dx);
    if (!c.is_moe_layer(l)) {
      const int64_t Fi = c.intermediate_size;
      mlp_backward(dx.data(), G + L.dg, G + L.du, G + L.dd, dh.data(), L.f_in.data(), L.dense.gu.data(),
                   L.dense.a.data(), P + L.dg, P + L.du, P + L.dd, N, d, Fi, I.scratch.mlp);
    } else {
      MoeGrads<T> g;
      moe_views(g, G, L.moe_off);
      moe_backward(dx.data(), g, dh.data(), L.f_in.data(), L.moe, *stage_, l, L.moe_cache, c, B, S, I.sc, I.scratch);
    }
    ops::rmsnorm_backward(dsub, G + L.ln2, dx.data(), L.h_mid.data(), P + L.ln2, L.rstd2.data(), N, d);
    if (hc) {
      hc::enter_backward(dX2.data(), L.hc_ffn.grads(G), du.data(), L.x_mid.data(), L.hs_ffn, L.hc_ffn.weights(P),
                         I.hc_work, N, hs);
      std::swap(dX, dX2);
    }
    // Attention: h_mid = h_in + o_proj(Attn(RMSNorm(h_in)))
    ps.next(profile::Phase::attention_bwd);
    if (hc) {
      hc::leave_backward(dh.data(), dX2.data(), I.hc_work, dX.data(), L.y_attn.data(), L.x_in.data(), L.hs_attn, N,
                         hs);
      zero(du);
    }
    if (c.v4_attention()) {
      zero(dx);
      attention_v4_backward(dx.data(), G, dh.data(), L.v4_cache, L.v4, P, L.a_in.data(), I.pos.data(), I.doc.data(),
                            int64_t(B), int64_t(S), c, I.v4_scratch);
    } else {
      zero(dctx);
      ops::linear_backward(dctx.data(), G + L.o, dh.data(), L.ctx.data(), P + L.o, N, qd, d);
      zero(dqkv);
      const T* qkv = L.qkv.data();
      ops::attention_backward(dqkv.data(), dqkv.data() + Q.k_at(), dqkv.data() + Q.v_at(), dctx.data(),
                              L.attn_stats.data(), qkv, qkv + Q.k_at(), qkv + Q.v_at(), I.doc.data(), B, S, H, Hkv,
                              hd, static_cast<const T*>(nullptr), static_cast<T*>(nullptr), int64_t(0), Q.ld, Q.ld);
      ops::rope_apply(dqkv.data(), I.pos.data(), N, H, hd, c.rope_theta, -1, Q.ld);
      ops::rope_apply(dqkv.data() + Q.k_at(), I.pos.data(), N, Hkv, hd, c.rope_theta, -1, Q.ld);
      zero(dx);
      ops::grouped_linear_backward<T, 3>(dx.data(), dqkv.data(), L.a_in.data(), qkv_parts<T>(P, G, L.q, L.k, L.v, Q), N,
                                         d);
    }
    ops::rmsnorm_backward(dsub, G + L.ln1, dx.data(), L.h_in.data(), P + L.ln1, L.rstd1.data(), N, d);
    if (hc) {
      hc::enter_backward(dX2.data(), L.hc_attn.grads(G), du.data(), L.x_in.data(), L.hs_attn, L.hc_attn.weights(P),
                         I.hc_work, N, hs);
      std::swap(dX, dX2);
    }
  };
  // A head's backward: from its logits' gradient to that of its streams, dX (mHC) or dh
  // (both overwritten). h_final: its norm's input; xs, hst: the head's collapse (mHC).
  const auto head = [&](const T* dl, const T* x_final, size_t norm_w, const T* h_final, const T* rstd,
                        const HcOffsets& hco, const std::vector<T>& xs, const hc::HcState<T>& hst) {
    zero(dx);
    zero(dh);
    ops::linear_backward(dx.data(), G + I.lm_head, dl, x_final, P + I.lm_head, N, d, V);
    ops::rmsnorm_backward(dh.data(), G + norm_w, dx.data(), h_final, P + norm_w, rstd, N, d);
    if (hc) {
      zero(dX);
      hc::enter_backward(dX.data(), hco.grads(G), dh.data(), xs.data(), hst, hco.weights(P), I.hc_work, N,
                         hc_shape(c, true));
    }
  };

  // MTP first (MODEL.md section 12): its head, its block, then its input combination,
  // which gives the gradient of h_t (M.dh_t) and of the embedding of x_{t+1}.
  auto& M = I.mtp;
  if (M.ran) {
    M.ran = false;
    head(M.dlogits.data(), M.x_final.data(), M.norm, M.h_final.data(), M.rstd_final.data(), M.hc_head, M.xs_final,
         M.hs_head);
    block(c.num_hidden_layers, ModelConfig::kMtpLayer);
    if (hc) hc::repeat_streams_backward(dh.data(), dX.data(), N, n, d);  // dh = d loss / d h'
    zero(dx);  // d loss / d embed(x_{t+1})
    assign_zeros(M.dh_t, size_t(N * d));
    mtp_input_backward(dx.data(), M.dh_t.data(), G + M.enorm, G + M.hnorm, G + M.e_proj, G + M.h_proj, dh.data(),
                       M.e.data(), M.h_t.data(), M.e_n.data(), M.e_rstd.data(), M.h_n.data(), M.h_rstd.data(),
                       P + M.enorm, P + M.hnorm, P + M.e_proj, P + M.h_proj, N, d, I.tmp);
    ops::embedding_backward(G + I.embed, dx.data(), M.ids.data(), N, d);
  }
  if (!c.mtp()) {  // the main head exactly as without MTP
    ops::linear_backward(dx.data(), G + I.lm_head, dlogits, I.x_final.data(), P + I.lm_head, N, d, V);
    ops::rmsnorm_backward(dh.data(), G + I.norm, dx.data(), I.h_final.data(), P + I.norm, I.rstd_final.data(), N, d);
    if (hc)
      hc::enter_backward(dX.data(), I.hc_head.grads(G), dh.data(), I.xs_final.data(), I.hs_head, I.hc_head.weights(P),
                         I.hc_work, N, hc_shape(c, true));
  } else {
    zero(dx);
    zero(dh);
    ops::linear_backward(dx.data(), G + I.lm_head, dlogits, I.x_final.data(), P + I.lm_head, N, d, V);
    ops::rmsnorm_backward(dh.data(), G + I.norm, dx.data(), I.h_final.data(), P + I.norm, I.rstd_final.data(), N, d);
    if (M.dh_t.size() == size_t(N * d))  // h_t feeds the MTP block too
      kernels::parallel_add(dh.data(), M.dh_t.data(), N * d);
    M.dh_t.clear();
    if (hc) {
      zero(dX);
      hc::enter_backward(dX.data(), I.hc_head.grads(G), dh.data(), I.xs_final.data(), I.hs_head, I.hc_head.weights(P),
                         I.hc_work, N, hc_shape(c, true));
    }
  }
  for (int l = c.num_hidden_layers - 1; l >= 0; --l) block(l, l);
  ps.next(profile::Phase::embedding_bwd);
  if (hc) hc::repeat_streams_backward(dh.data(), dX.data(), N, n, d);
  ops::embedding_backward(G + I.embed, dh.data(), I.ids.data(), N, d);
}

template <class T>
MicroStats Model<T>::forward_backward(const MicroBatch& mb, const LossNorm& norm, bool backward) {
  profile::Scope ps(profile::Phase::lm_head);  // the cross-entropy; forward and backward time their own phases
  ForwardOptions fo;
  fo.train = backward;
  fo.mtp = true;  // the supervised loss includes the MTP block's (MODEL.md section 12)
  MicroStats st = forward(mb, norm, fo);
  auto& I = *impl_;
  const int64_t N = mb.tokens(), V = cfg_.vocab_size;
  const double denom = norm.n_targets > 0 ? norm.n_targets : 1.0;
  if (backward) I.dlogits.resize(N * V);
  st.ce_sum = ops::cross_entropy_forward_backward(backward ? I.dlogits.data() : static_cast<T*>(nullptr),
                                                  I.logits.data(), I.targets.data(), N, V, 1.0 / denom);
  st.ce = st.ce_sum / denom;
  if (backward) this->backward(I.dlogits.data());
  return st;
}

template <class T>
void Model<T>::kv_init(KvCache<T>& kv, int rows, int capacity) const {
  if (capacity > cfg_.max_position_embeddings)
    throw Error("KV cache: " + std::to_string(capacity) + " positions exceed max_position_embeddings " +
                std::to_string(cfg_.max_position_embeddings));
  // V4 attention caches its one shared key/value head (after RoPE) in k; v stays empty.
  const bool v4 = cfg_.v4_attention();
  const int64_t kvd = v4 ? int64_t(cfg_.hd()) : int64_t(cfg_.Hkv()) * cfg_.hd();
  kv.rows = rows;
  kv.capacity = capacity;
  kv.len.assign(rows, 0);
  kv.k.resize(cfg_.num_hidden_layers);
  kv.v.resize(cfg_.num_hidden_layers);
  for (int l = 0; l < cfg_.num_hidden_layers; ++l) {
    kv.k[l].assign(int64_t(rows) * capacity * kvd, T(0));
    kv.v[l].assign(v4 ? 0 : int64_t(rows) * capacity * kvd, T(0));
  }
}

template <class T>
void Model<T>::extend(KvCache<T>& kv, const int32_t* row, const int32_t* tokens, int64_t n, std::vector<T>& logits,
                      RoutingTrace* record) {
  auto& I = *impl_;
  const ModelConfig& c = cfg_;
  const int64_t d = c.d(), V = c.vocab_size, H = c.H(), Hkv = c.Hkv(), hd = c.hd();
  const int64_t qd = H * hd, kvd = Hkv * hd;
  check_tokens<T>(tokens, n, V);
  check_tables(tid2eid_, c);
  I.trained = false;  // shares work buffers with forward(): a pending backward is void
  // Positions: each row's tokens continue its cached sequence.
  I.pos.resize(n);
  std::vector<int32_t> next(kv.len);
  std::vector<int64_t> last;  // index of each distinct row's last new token, in order of first appearance
  std::vector<int64_t> slot(kv.rows, -1);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t r = row[i];
    if (r < 0 || r >= kv.rows) throw Error("KV cache: row " + std::to_string(r) + " out of range");
    if (next[r] >= kv.capacity)
      throw Error("KV cache: row " + std::to_string(r) + " is full (" + std::to_string(kv.capacity) + " positions)");
    I.pos[i] = next[r]++;
    if (slot[r] < 0) {
      slot[r] = int64_t(last.size());
      last.push_back(i);
    } else {
      last[slot[r]] = i;
    }
  }
  const int nm = c.num_moe_layers();
  if (record) {
    record->idx.assign(nm, {});
    record->kept.assign(nm, {});
  }
  const T* P = params_.data();
  auto& L = I.work;
  auto& h = I.h;
  auto& tmp = I.tmp;
  const bool hc = c.hc();
  const int64_t nh = c.hc_mult;
  const hc::HcShape hs = hc_shape(c, false);
  h.resize(n * nh * d);
  tmp.resize(n * d);
  if (hc) {
    I.xs2.resize(n * nh * d);
    I.u.resize(n * d);
    ops::embedding_forward(tmp.data(), tokens, P + I.embed, n, d);
    hc::repeat_streams(h.data(), tmp.data(), n, nh, d);
  } else {
    ops::embedding_forward(h.data(), tokens, P + I.embed, n, d);
  }
  ForwardOptions fo{false, nullptr, record};
  int moe_j = 0;
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const auto& W = I.layers[l];
    const T* in = h.data();
    if (hc) {
      hc::enter_forward(I.u.data(), L.hs_attn, h.data(), W.hc_attn.weights(P), n, hs);
      in = I.u.data();
    }
    if (c.v4_attention()) {
      auto& A = L.v4_cache;
      attention_norm(L, W, P, in, n, c);
      attention_v4_project(A, W.v4, P, L.a_in.data(), I.pos.data(), n, c);
      for (int64_t i = 0; i < n; ++i)
        std::copy_n(A.kv.data() + i * hd, hd, kv.k[l].data() + (int64_t(row[i]) * kv.capacity + I.pos[i]) * hd);
      A.ctx.resize(n * qd);
      ops::attention_cached(A.ctx.data(), A.q.data(), kv.k[l].data(), kv.k[l].data(), row, I.pos.data(), n,
                            kv.capacity, H, int64_t(1), hd, P + W.v4.sinks, int64_t(c.sliding_window));
      attention_v4_output(tmp.data(), A, W.v4, P, I.pos.data(), n, c);
    } else {
      attention_inputs(L, W, P, in, I.pos.data(), n, c);
      const QkvLayout Q = qkv_layout(c);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t at = (int64_t(row[i]) * kv.capacity + I.pos[i]) * kvd;
        std::copy_n(L.qkv.data() + i * Q.ld + Q.k_at(), kvd, kv.k[l].data() + at);
        std::copy_n(L.qkv.data() + i * Q.ld + Q.v_at(), kvd, kv.v[l].data() + at);
      }
      L.ctx.resize(n * qd);
      ops::attention_cached(L.ctx.data(), L.qkv.data(), kv.k[l].data(), kv.v[l].data(), row, I.pos.data(), n,
                            kv.capacity, H, Hkv, hd, static_cast<const T*>(nullptr), int64_t(0), Q.ld);
      ops::linear_forward(tmp.data(), L.ctx.data(), P + W.o, n, qd, d);
    }
    leave_sub_block(h, I.xs2, tmp.data(), hc ? &L.hs_attn : nullptr, n, d, hs);
    in = h.data();
    if (hc) {
      hc::enter_forward(I.u.data(), L.hs_ffn, h.data(), W.hc_ffn.weights(P), n, hs);
      in = I.u.data();
    }
    ffn_forward(tmp.data(), L, W, P, in, n, c, l, [&](auto& Lm) {
      // Each new token is its own "row" of one position; no balance loss is computed.
      moe_views(Lm.moe, P, W.moe_off);
      moe_forward(tmp.data(), Lm.moe_cache, Lm.f_in.data(), Lm.moe, *stage_, l, bias_[moe_j].data(), c, int(n), 1,
                  BalanceScales{}, route_control(fo, moe_j, tid2eid_, tokens));
      ++moe_j;
    });
    leave_sub_block(h, I.xs2, tmp.data(), hc ? &L.hs_ffn : nullptr, n, d, hs);
  }
  for (int64_t i = 0; i < n; ++i) kv.len[row[i]] = std::max(kv.len[row[i]], I.pos[i] + 1);
  // Final norm and LM head of the last new token of each row only (with mHC, after the
  // head's collapse of every new token: per-token values, the same bits as forward()).
  const T* hf = h.data();
  if (hc) {
    hc::enter_forward(I.u.data(), I.hs_head, h.data(), I.hc_head.weights(P), n, hc_shape(c, true));
    hf = I.u.data();
  }
  const int64_t m = int64_t(last.size());
  tmp.resize(m * d);
  for (int64_t j = 0; j < m; ++j) std::copy_n(hf + last[j] * d, d, tmp.data() + j * d);
  I.x_final.resize(m * d);
  I.rstd_final.resize(m);
  ops::rmsnorm_forward(I.x_final.data(), I.rstd_final.data(), tmp.data(), P + I.norm, m, d, c.rms_norm_eps);
  logits.resize(m * V);
  ops::linear_forward(logits.data(), I.x_final.data(), P + I.lm_head, m, d, V);
}

template class Model<float>;
template class Model<double>;

}  // namespace moetune
