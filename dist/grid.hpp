// The process grid of MODEL.md-style expert parallelism. World = W ranks; attention
// and dense layers are data parallel over all W. Routed experts are sharded over
// expert-parallel (EP) groups of `ep` consecutive ranks, each group holding all E
// experts once; rank i of a group owns experts [i*E/ep, (i+1)*E/ep). Expert weights
// are replicated over the W/ep expert-data-parallel (EDP) groups {i, i+ep, i+2ep, ...}.
// ep = 1 is pure data parallelism, ep = W full expert parallelism.
#pragma once
#include <string>

#include "dist/comm.hpp"
#include "moe/config.hpp"

namespace moetune::dist {

struct ProcessGrid {
  int world_size = 1, world_rank = 0;
  int ep = 1;         // expert-parallel group size
  int ep_rank = 0;    // index inside the EP group
  int ep_group = 0;   // which EP group (= rank inside the EDP group)
  int expert_begin = 0, expert_end = 0;  // routed experts owned by this rank
  Comm world, ep_comm, edp_comm;

  // Collective over `world`. Throws moetune::Error naming `parallel.ep` when the
  // layout is impossible (W % ep, E % ep); every rank throws the same message.
  static ProcessGrid create(const Comm& world, int ep, const ModelConfig& cfg);
  std::string describe() const;
};

}  // namespace moetune::dist
