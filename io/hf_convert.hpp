// `moetune convert`: moetune checkpoints to and from the Hugging Face transformers
// layout of DeepSeek models (docs/checkpoint.md, "Hugging Face form").
//
// The two differ in three places only; every other tensor has the same name, shape
// and meaning in both:
//   - routed experts: moetune keeps one tensor per expert and projection,
//       <p>.mlp.experts.{e}.{gate,up}_proj.weight (F, d), <p>.mlp.experts.{e}.down_proj.weight (d, F);
//     transformers stacks them per layer (no ".weight"),
//       <p>.mlp.experts.gate_up_proj (E, 2F, d)   [e, 0:F] = gate_proj of e, [e, F:2F] = up_proj of e
//       <p>.mlp.experts.down_proj    (E, d, F)    [e] = down_proj of e;
//   - the hash-routing tables mlp.gate.tid2eid: I32 in moetune, I64 (torch.long) there;
//   - config.json: model_type / architectures / torch_dtype / hidden_act are added, and
//     a hash-routed model lists its layers in mlp_layer_types ("hash_moe" / "moe").
// Reading also accepts per-expert tensors (the hub's DeepSeek-V3 files), BF16 / F16 /
// F64 weights (converted to F32), sharded files with an index, and the transformers
// keys moetune has no use for; anything moetune cannot represent (MLA attention,
// compressed attention layers, quantised weights, another activation) is an Error
// naming the key or tensor.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "moe/config.hpp"

namespace moetune {

struct ConvertReport {
  std::string model_type;          // "deepseek_v3" | "deepseek_v4"
  int64_t tensors = 0;             // tensors written
  int64_t parameters = 0;          // trainable parameters (moetune's ParamLayout)
  std::vector<std::string> notes;  // what the user should know about the result
};

// config.json of the Hugging Face form of `cfg`.
nlohmann::json hf_config_json(const ModelConfig& cfg);
// The moetune configuration of a Hugging Face config.json (`where` names it in errors).
ModelConfig config_from_hf_json(const nlohmann::json& j, const std::string& where);

// Reads the moetune checkpoint <in_dir> (any layout moetune writes) and writes its
// Hugging Face form to <out_dir>: config.json, model.safetensors (F32, I64 tables) or
// shards of at most max_shard_bytes (0 = one file) with model.safetensors.index.json,
// and tokenizer.json if the checkpoint has one. <out_dir> is replaced atomically and
// only if it is empty or a checkpoint.
ConvertReport convert_to_hf(const std::string& in_dir, const std::string& out_dir, uint64_t max_shard_bytes = 0);

// Reads a Hugging Face DeepSeek directory <in_dir> and writes a step-0 moetune
// checkpoint to <out_dir> (same replacement rule), usable with --init-from.
ConvertReport convert_from_hf(const std::string& in_dir, const std::string& out_dir);

}  // namespace moetune
