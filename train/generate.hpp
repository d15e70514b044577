// Batched generation with a KV cache (MODEL.md section 10): prefill of a chunk of
// prompts, then decode steps of every live row until each stops (a stop token, or
// max_new_tokens = truncated). Used by `moetune generate`, `moetune eval` and the
// rollouts of `moetune rl`.
//
// Layout invariance: the requests are cut into fixed chunks of `batch_size` in request
// order and each chunk is decoded on its own, so every GEMM sees the same rows on any
// number of ranks; the draws are keyed by (seed, step, prompt, sample, position). Under
// expert parallelism the ranks of an expert-parallel group decode their chunks in
// lockstep (a rank whose rows are done still takes part with zero tokens) until every
// row of the group is done.
#pragma once
#include <cstdint>
#include <vector>

#include "dist/grid.hpp"
#include "moe/model.hpp"
#include "train/sampling.hpp"

namespace moetune {

struct GenerationConfig {
  SamplingConfig sampling;
  int max_new_tokens = 64;
  int batch_size = 32;            // completions decoded together (one chunk)
  std::vector<int32_t> stop_ids;  // a completion ends with (and includes) the first of these
  uint64_t seed = 0;
  int64_t step = 0;               // part of the sampling key (the RL step)
  bool record_routing = false;    // keep the expert selections of every fed token
};

struct GenRequest {
  std::vector<int32_t> prompt;  // rendered prompt ids (up to and including <|assistant|>)
  int64_t prompt_index = 0;     // global prompt index (sampling key)
  int sample_index = 0;         // sample of that prompt (sampling key)
};

struct Completion {
  std::vector<int32_t> tokens;  // generated ids, the stop token included
  std::vector<float> logprobs;  // the decoder's log_softmax(z/τ) of each generated token
  bool truncated = false;       // max_new_tokens reached without a stop token
  // With record_routing: the selections of the tokens fed to the decoder (the prompt,
  // then every generated token but the last), [MoE layer] (positions * K), position order.
  RoutingTrace routing;
};

struct GenerationStats {
  int64_t new_tokens = 0;    // generated over all ranks
  int64_t decode_steps = 0;  // model calls of this rank (prefills included)
  double seconds = 0;        // wall time of the call
};

// Collective over grid.world: every rank passes the same requests and gets every
// completion, in request order. The model must hold this rank's experts (expert stage
// installed when ep > 1). capacity: the longest prompt + max_new_tokens must fit
// max_position_embeddings (checked, the error names rl.max_new_tokens).
template <class T>
std::vector<Completion> generate(Model<T>& model, const dist::ProcessGrid& grid, const std::vector<GenRequest>& reqs,
                                 const GenerationConfig& gc, GenerationStats* stats = nullptr);

}  // namespace moetune
