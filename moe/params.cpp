// Builds the canonical parameter layout of a model configuration.
#include "moe/params.hpp"

#include "moe/error.hpp"

namespace moetune {

std::string ParamLayout::layer(int l, const std::string& rest) {
  if (l >= ModelConfig::kMtpLayer) return "mtp." + std::to_string(l - ModelConfig::kMtpLayer) + "." + rest;
  return "model.layers." + std::to_string(l) + "." + rest;
}
std::string ParamLayout::expert(int l, int e, const std::string& proj) {
  return layer(l, "mlp.experts." + std::to_string(e) + "." + proj + ".weight");
}
std::string ParamLayout::bias_name(int l) { return layer(l, "mlp.gate.e_score_correction_bias"); }
std::string ParamLayout::tid2eid_name(int l) { return layer(l, "mlp.gate.tid2eid"); }

void ParamLayout::add(const std::string& name, std::vector<int64_t> shape, bool decay) {
  TensorInfo t;
  t.name = name;
  t.shape = std::move(shape);
  t.numel = 1;
  for (auto s : t.shape) t.numel *= static_cast<size_t>(s);
  // Align every tensor to 16 elements (64 bytes in float) for vectorised loops.
  total_ = (total_ + 15) / 16 * 16;
  t.offset = total_;
  t.decay = decay;
  total_ += t.numel;
  index_[t.name] = tensors_.size();
  tensors_.push_back(std::move(t));
}

const TensorInfo& ParamLayout::at(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) throw Error("unknown parameter tensor '" + name + "'");
  return tensors_[it->second];
}

bool ParamLayout::is_expert_tensor(const std::string& name) { return name.find(".mlp.experts.") != std::string::npos; }

std::pair<size_t, size_t> ParamLayout::expert_region(int l) const {
  if (expert_end_ <= expert_begin_) return {0, 0};
  const auto& first = at(expert(l, expert_begin_, "gate_proj"));
  const auto& last = at(expert(l, expert_end_ - 1, "down_proj"));
  return {first.offset, last.offset + last.numel};
}

ParamLayout ParamLayout::build(const ModelConfig& c, int expert_begin, int expert_end) {
  if (expert_end < 0) expert_end = c.E();
  if (expert_begin < 0 || expert_begin > expert_end || expert_end > c.E())
    throw Error("expert range [" + std::to_string(expert_begin) + ", " + std::to_string(expert_end) +
                ") is not inside [0, " + std::to_string(c.E()) + ")");
  ParamLayout p;
  p.expert_begin_ = expert_begin;
  p.expert_end_ = expert_end;
  const int64_t V = c.vocab_size, d = c.hidden_size, q = int64_t(c.H()) * c.hd(), kv = int64_t(c.Hkv()) * c.hd();
  p.add("model.embed_tokens.weight", {V, d}, true);
  // mHC connection of a sub-block (attn_hc, ffn_hc): fn ((2+n)n, n d), base ((2+n)n),
  // scale (3), as transformers' DeepseekV4HyperConnection.
  const int64_t n = c.hc_mult, M = (2 + n) * n;
  const auto add_hc = [&](const std::string& prefix) {
    p.add(prefix + ".fn", {M, n * d}, true);
    p.add(prefix + ".base", {M}, false);
    p.add(prefix + ".scale", {3}, false);
  };
  // One decoder block: model layer l, or the MTP block (ModelConfig::kMtpLayer).
  const auto add_block = [&](int l) {
    if (c.hc()) add_hc(layer(l, "attn_hc"));
    p.add(layer(l, "input_layernorm.weight"), {d}, false);
    if (c.v4_attention()) {
      // DeepSeek-V4 attention (MODEL.md section 12), transformers' deepseek_v4 names.
      const int64_t qr = c.q_lora_rank, hd = c.hd(), G = c.o_groups, orank = int64_t(G) * c.o_lora_rank;
      p.add(layer(l, "self_attn.q_a_proj.weight"), {qr, d}, true);
      p.add(layer(l, "self_attn.q_a_norm.weight"), {qr}, false);
      p.add(layer(l, "self_attn.q_b_proj.weight"), {q, qr}, true);
      p.add(layer(l, "self_attn.kv_proj.weight"), {hd, d}, true);
      p.add(layer(l, "self_attn.kv_norm.weight"), {hd}, false);
      p.add(layer(l, "self_attn.o_a_proj.weight"), {orank, q / G}, true);
      p.add(layer(l, "self_attn.o_b_proj.weight"), {d, orank}, true);
      p.add(layer(l, "self_attn.sinks"), {c.H()}, false);
    } else {
      p.add(layer(l, "self_attn.q_proj.weight"), {q, d}, true);
      p.add(layer(l, "self_attn.k_proj.weight"), {kv, d}, true);
      p.add(layer(l, "self_attn.v_proj.weight"), {kv, d}, true);
      p.add(layer(l, "self_attn.o_proj.weight"), {d, q}, true);
    }
    p.add(layer(l, "post_attention_layernorm.weight"), {d}, false);
    if (c.hc()) add_hc(layer(l, "ffn_hc"));
    if (!c.is_moe_layer(l)) {
      const int64_t I = c.intermediate_size;
      p.add(layer(l, "mlp.gate_proj.weight"), {I, d}, true);
      p.add(layer(l, "mlp.up_proj.weight"), {I, d}, true);
      p.add(layer(l, "mlp.down_proj.weight"), {d, I}, true);
    } else {
      const int64_t F = c.F();
      p.add(layer(l, "mlp.gate.weight"), {c.E(), d}, true);
      for (int e = expert_begin; e < expert_end; ++e) {
        p.add(expert(l, e, "gate_proj"), {F, d}, true);
        p.add(expert(l, e, "up_proj"), {F, d}, true);
        p.add(expert(l, e, "down_proj"), {d, F}, true);
      }
      if (c.n_shared_experts > 0) {
        const int64_t S = c.shared_width();
        p.add(layer(l, "mlp.shared_experts.gate_proj.weight"), {S, d}, true);
        p.add(layer(l, "mlp.shared_experts.up_proj.weight"), {S, d}, true);
        p.add(layer(l, "mlp.shared_experts.down_proj.weight"), {d, S}, true);
      }
    }
  };
  for (int l = 0; l < c.num_hidden_layers; ++l) add_block(l);
  const auto add_hc_head = [&](const std::string& prefix) {  // the head's collapse (DeepseekV4HyperHead)
    if (!c.hc()) return;
    p.add(prefix + ".hc_fn", {n, n * d}, true);
    p.add(prefix + ".hc_base", {n}, false);
    p.add(prefix + ".hc_scale", {1}, false);
  };
  add_hc_head("model.hc_head");
  p.add("model.norm.weight", {d}, false);
  if (!c.tie_word_embeddings) p.add("lm_head.weight", {V, d}, true);
  if (c.mtp()) {  // the MTP block (MODEL.md section 12), after the whole main model
    const std::string m = layer(ModelConfig::kMtpLayer, "");
    p.add(m + "enorm.weight", {d}, false);
    p.add(m + "hnorm.weight", {d}, false);
    p.add(m + "e_proj.weight", {d, d}, true);
    p.add(m + "h_proj.weight", {d, d}, true);
    add_block(ModelConfig::kMtpLayer);
    add_hc_head(m + "hc_head");
    p.add(m + "norm.weight", {d}, false);
  }
  p.total_ = (p.total_ + 15) / 16 * 16;
  return p;
}

}  // namespace moetune
