// Model configuration: the Hugging Face style keys of MODEL.md section 1, with
// defaults, derived values resolved, and validation that names the offending key.
#pragma once
#include <nlohmann/json.hpp>
#include <string>

namespace moetune {

struct ModelConfig {
  int vocab_size = 512;
  int hidden_size = 256;
  int num_hidden_layers = 4;
  int num_attention_heads = 4;
  int num_key_value_heads = -1;  // -1: = num_attention_heads
  int head_dim = -1;             // -1: = hidden_size / num_attention_heads
  int max_position_embeddings = 256;
  double rope_theta = 10000.0;
  double rms_norm_eps = 1e-6;
  int first_k_dense_replace = 1;
  int intermediate_size = -1;  // -1: = 4 * hidden_size
  int n_routed_experts = 8;
  int num_experts_per_tok = 2;
  int moe_intermediate_size = -1;  // -1: = hidden_size
  int n_shared_experts = 1;
  std::string scoring_func = "sigmoid";  // "softmax" | "sigmoid" | "sqrtsoftplus" (MODEL.md 12)
  bool norm_topk_prob = true;
  double routed_scaling_factor = 1.0;
  int n_group = 1;
  int topk_group = 1;
  std::string topk_method = "noaux_tc";  // "greedy" | "noaux_tc"
  double bias_update_rate = 1e-3;
  double aux_loss_coeff = 0.0;
  double seq_aux_loss_coeff = 1e-4;
  double z_loss_coeff = 0.0;
  double capacity_factor = 0.0;
  bool tie_word_embeddings = false;
  double initializer_range = 0.02;
  // DeepSeek-V4 (MODEL.md section 12): the first num_hash_layers MoE layers route by the
  // fixed table mlp.gate.tid2eid (V,K); swiglu_limit c > 0 clamps the routed and shared
  // experts' gate (<= c) and up (in [-c, c]) projections; 0 = off.
  int num_hash_layers = 0;
  double swiglu_limit = 0.0;
  // mHC (MODEL.md section 12): hc_mult n residual streams per token, mixed around each
  // sub-block by learned coefficients (moe/hc.hpp); 1 = the plain residual stream.
  int hc_mult = 1;
  int hc_sinkhorn_iters = 20;
  double hc_eps = 1e-6;
  // MTP (MODEL.md section 12): 1 = one more decoder block (attention + MoE) that
  // predicts token t+2 from the final hidden state and the embedding of token t+1; its
  // cross-entropy times mtp_loss_weight is added to the loss. 0 = none.
  int num_nextn_predict_layers = 0;
  double mtp_loss_weight = 0.3;
  // DeepSeek-V4 attention (MODEL.md section 12), attention_type = "v4": low-rank q of
  // rank q_lora_rank, one shared key/value head of head_dim, RoPE (interleaved pairs) on
  // the last qk_rope_head_dim channels, a learned sink per head, an optional
  // sliding_window (0 = all keys), and the grouped output projection (o_groups groups,
  // each to o_lora_rank). "llama" (the default) is the attention of section 2, which
  // ignores the other V4 keys.
  std::string attention_type = "llama";  // "llama" | "v4"
  int q_lora_rank = 128;
  int qk_rope_head_dim = 32;
  int sliding_window = 0;
  int o_groups = 2;
  int o_lora_rank = 128;

  // Parses a JSON object. Unknown keys, wrong types and invalid combinations throw
  // moetune::Error naming `where` (a file name) and the key. Derived values (-1) are
  // resolved, so to_json() writes every key explicitly.
  static ModelConfig from_json(const nlohmann::json& j, const std::string& where = "config");
  static ModelConfig from_file(const std::string& path);
  nlohmann::json to_json() const;
  // Throws moetune::Error naming the key if the combination is invalid.
  void validate(const std::string& where = "config") const;
  // Sets one key from a string value ("hidden_size", "64"), then re-validates.
  void set(const std::string& key, const std::string& value, const std::string& where = "--set");

  // Derived quantities.
  int H() const { return num_attention_heads; }
  int Hkv() const { return num_key_value_heads; }
  int hd() const { return head_dim; }
  int d() const { return hidden_size; }
  int E() const { return n_routed_experts; }
  int K() const { return num_experts_per_tok; }
  int F() const { return moe_intermediate_size; }
  int shared_width() const { return n_shared_experts * moe_intermediate_size; }
  // The model-layer index of the MTP block (num_nextn_predict_layers = 1): its tensors
  // are named mtp.0.* (ParamLayout::layer), its experts and stage caches are keyed by it.
  static constexpr int kMtpLayer = 1 << 20;
  bool mtp() const { return num_nextn_predict_layers > 0; }
  // Model layer l (or kMtpLayer, always MoE) has a MoE FFN.
  bool is_moe_layer(int l) const { return l >= first_k_dense_replace; }
  // MoE layers: those of the main model, then the MTP block's (the last one, if any).
  int num_moe_layers() const;
  int num_main_moe_layers() const { return num_hidden_layers - first_k_dense_replace; }
  // The model layer of MoE layer j: first_k_dense_replace + j, or kMtpLayer.
  int moe_layer(int j) const { return j < num_main_moe_layers() ? first_k_dense_replace + j : kMtpLayer; }
  // MoE layer j (model layer first_k_dense_replace + j) routes by its tid2eid table.
  bool is_hash_moe_layer(int j) const { return j < num_hash_layers; }
  // Keys whose value was derived (not given): set() re-derives them, so
  // `--set model.hidden_size=64` also updates head_dim, intermediate_size, ...
  unsigned derived_mask = 0;
  bool sigmoid() const { return scoring_func == "sigmoid"; }
  bool sqrtsoftplus() const { return scoring_func == "sqrtsoftplus"; }
  bool noaux_tc() const { return topk_method == "noaux_tc"; }
  bool hc() const { return hc_mult > 1; }
  bool v4_attention() const { return attention_type == "v4"; }
};

}  // namespace moetune
