#include "dist/grid.hpp"

#include "moe/error.hpp"

namespace moetune::dist {

ProcessGrid ProcessGrid::create(const Comm& world, int ep, const ModelConfig& cfg) {
  ProcessGrid g;
  g.world_size = world.size();
  g.world_rank = world.rank();
  const std::string W = std::to_string(g.world_size);
  if (ep <= 0) throw Error("key 'parallel.ep': must be positive, got " + std::to_string(ep));
  if (g.world_size % ep != 0)
    throw Error("key 'parallel.ep': the number of ranks (" + W + ") must be divisible by ep (" + std::to_string(ep) +
                ")");
  if (cfg.E() % ep != 0)
    throw Error("key 'parallel.ep': n_routed_experts (" + std::to_string(cfg.E()) + ") must be divisible by ep (" +
                std::to_string(ep) + ")");
  g.ep = ep;
  g.ep_rank = g.world_rank % ep;
  g.ep_group = g.world_rank / ep;
  const int per = cfg.E() / ep;
  g.expert_begin = g.ep_rank * per;
  g.expert_end = g.expert_begin + per;
  g.world = world.dup();
  g.ep_comm = world.split(g.ep_group, g.ep_rank);
  g.edp_comm = world.split(g.ep_rank, g.ep_group);
  return g;
}

std::string ProcessGrid::describe() const {
  return "W=" + std::to_string(world_size) + " ep=" + std::to_string(ep) + " (" + std::to_string(world_size / ep) +
         " expert-data-parallel replicas)";
}

}  // namespace moetune::dist
