// Checkpoints written by every rank of the process grid at once (MODEL.md section 7).
// The model and optimizer tensors are split into E + 1 shards,
// `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`: shard 1 holds
// every dense tensor and the routing biases, shard 2 + e routed expert e of every
// layer. World rank 0 writes shard 1, the owner of expert e in EP group 0 writes
// shard 2 + e, all in parallel. The files depend only on the model, never on the
// (W, ep) layout that wrote them (the same bytes for every layout), and any checkpoint
// loads at any layout: each rank reads the tensors of its own layout.
//
// Atomicity: all ranks write into one temporary sibling directory; after a barrier
// and a verdict over all ranks rank 0 writes config.json, the indexes and
// trainer_state.json, fsyncs, and renames the directory into place. A failure on any
// rank removes the temporary directory and leaves an existing checkpoint intact.
// Ranks must share the file system that holds the checkpoint.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "dist/grid.hpp"
#include "io/checkpoint.hpp"
#include "moe/config.hpp"
#include "moe/params.hpp"

namespace moetune::dist {

// Collective over grid.world. `layout` is this rank's layout (its expert range).
// tokenizer_json: written by rank 0 as tokenizer.json when not empty. tid2eid: the
// hash-routing tables (required when cfg.num_hash_layers > 0), written in shard 1.
// optimizer: the optim.name of the state (tensor names and the "optimizer" metadata, as
// save_checkpoint).
template <class T>
void save_checkpoint_parallel(const std::string& dir, const ProcessGrid& grid, const ModelConfig& cfg,
                              const ParamLayout& layout, const std::vector<T>& params,
                              const std::vector<std::vector<float>>& bias, const std::vector<T>* exp_avg,
                              const std::vector<T>* exp_avg_sq, int64_t optimizer_step,
                              const nlohmann::json& trainer_state, const std::string& tokenizer_json = {},
                              const HashTables* tid2eid = nullptr, const std::string& optimizer = "adamw");

}  // namespace moetune::dist
