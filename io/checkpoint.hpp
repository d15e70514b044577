// moetune checkpoints (MODEL.md section 7): a directory holding
//   config.json                 ModelConfig::to_json()
//   model.safetensors           every parameter plus the routing biases, F32, Hugging Face names
//                               (or model-0000k-of-0000n.safetensors + model.safetensors.index.json)
//   optimizer.safetensors       "<param>.exp_avg" / "<param>.exp_avg_sq" (AdamW), or
//                               "<param>.momentum_buffer" (a Muon matrix under optim.name
//                               "muon"), metadata "step" and "optimizer" ("adamw" | "muon")
//                               (or optimizer-0000k-of-0000n.safetensors + optimizer.safetensors.index.json)
//   trainer_state.json          whatever JSON object the trainer hands in
//   tokenizer.json              the run's tokenizer (Hugging Face format), when given
// Saving is atomic at the directory level: everything goes into "<dir>.tmp-<pid>",
// is fsynced, and only then replaces <dir>. Loading checks every name and shape.
// Call these on one rank: the files never depend on how many ranks trained.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "moe/config.hpp"
#include "moe/params.hpp"

namespace moetune {

struct CheckpointWriteOptions {
  // Largest data size of one safetensors shard; 0 = one model.safetensors (and one
  // optimizer.safetensors). A tensor larger than the limit gets a shard of its own;
  // if everything fits in one shard no index file is written (Hugging Face style).
  uint64_t max_shard_bytes = 0;
  // Written verbatim as tokenizer.json when not empty (the tokenizer travels with the model).
  std::string tokenizer_json;
  // optim.name of the state: names the optimizer tensors (optimizer_state_names) and is
  // written as the "optimizer" metadata of optimizer.safetensors.
  std::string optimizer = "adamw";
};

// Hash-routing tables, [hash layer j][V*K] int32 (Model::tid2eid(), MODEL.md section 12).
using HashTables = std::vector<std::vector<int32_t>>;

// Writes a checkpoint of `params` (layout.total() elements, viewed through `layout`)
// and the routing biases `bias` ([moe layer j][E], MoE layer j = model layer
// cfg.moe_layer(j): first_k_dense_replace + j, the MTP block's last; empty for a hash-routed layer, which has none).
// exp_avg / exp_avg_sq: both null (no optimizer file) or both layout.total() elements.
// trainer_state: a JSON object (null = {}). tid2eid: required (Error otherwise) when
// cfg.num_hash_layers > 0, written as I32 (V, K) "mlp.gate.tid2eid" of those layers.
// If <dir> exists it must be a directory that is empty or holds a config.json (a
// checkpoint); it is replaced only once the new one is complete, so any failure
// (unwritable parent, disk full) throws Error and leaves the old <dir> intact.
template <class T>
void save_checkpoint(const std::string& dir, const ModelConfig& cfg, const ParamLayout& layout,
                     const std::vector<T>& params, const std::vector<std::vector<float>>& bias,
                     const std::vector<T>* exp_avg, const std::vector<T>* exp_avg_sq, int64_t optimizer_step,
                     const nlohmann::json& trainer_state, const CheckpointWriteOptions& opt = {},
                     const HashTables* tid2eid = nullptr);

// Parses and validates <dir>/config.json; Error naming that file if missing or invalid.
ModelConfig load_checkpoint_config(const std::string& dir);

// Fills params (resized to layout.total(), zero in the alignment padding) and bias
// (resized to [cfg.num_moe_layers()][E], rows of hash-routed layers empty). Every tensor
// of the layout must be present with exactly its shape, and no other tensor may be; the
// biases are required when topk_method is noaux_tc and default to 0 under greedy routing
// when absent; a hash-routed layer has no bias but an I32 (V, K) tid2eid whose rows hold
// K distinct experts in [0, E), read into *tid2eid (required when cfg.num_hash_layers > 0).
template <class T>
void load_model_weights(const std::string& dir, const ModelConfig& cfg, const ParamLayout& layout,
                        std::vector<T>& params, std::vector<std::vector<float>>& bias, HashTables* tid2eid = nullptr);

// Error "<where>: tensor '<name>': ..." unless `table` is a valid hash-routing table of
// cfg: V*K entries, each row K distinct experts in [0, E).
void check_tid2eid(const std::string& where, const std::string& name, const std::vector<int32_t>& table,
                   const ModelConfig& cfg);

// Returns false (and leaves the outputs untouched) if the checkpoint has no optimizer
// state; otherwise fills both buffers (layout.total(), zero padding; a Muon matrix's
// momentum_buffer goes to exp_avg, its exp_avg_sq stays 0) and the step. `optimizer` is
// the run's optim.name: state written by another optimizer (metadata "optimizer",
// "adamw" when absent) is an Error naming the key optim.name.
template <class T>
bool load_optimizer_state(const std::string& dir, const ParamLayout& layout, std::vector<T>& exp_avg,
                          std::vector<T>& exp_avg_sq, int64_t& step, const std::string& optimizer = "adamw");

// <dir>/trainer_state.json, or {} if the file is absent. Error if it is not a JSON object.
nlohmann::json load_trainer_state(const std::string& dir);

// Fields of a loaded trainer_state.json, by dotted key ("step", "data.epoch"): a
// non-negative integer / a string, else Error "<dir>/trainer_state.json: key '<key>': ...".
int64_t trainer_state_count(const nlohmann::json& state, const std::string& dir, const std::string& key);
std::string trainer_state_string(const nlohmann::json& state, const std::string& dir, const std::string& key);

}  // namespace moetune
