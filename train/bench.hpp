// `moetune bench`: warm-up steps plus N timed training steps of a run config at the
// current MPI layout, on synthetic documents (train/synthetic.hpp), through the same
// step `moetune train` runs (dist::ParallelTrainer::step). Reports the median step,
// its breakdown into phases (moe/profile.hpp), all-to-all and gradient-reduction bytes
// and seconds, memory per rank, tokens/s and MFU (train/flops.hpp); see bench/README.md.
#pragma once
#include <nlohmann/json.hpp>
#include <string>

#include "train/run_config.hpp"

namespace moetune {

struct BenchOptions {
  int warmup = 2;          // untimed steps first
  int steps = 10;          // timed steps (medians over these)
  double peak_gflops = 0;  // > 0: also report MFU against this vendor peak (GFLOP/s per rank)
  std::string json_path;   // rank 0 writes the result object here ("" = none)
  std::string init_from;   // a checkpoint to start from (weights + routing bias) instead of
                           // a fresh init: a trained router spreads tokens as in post-training
  bool table = true;       // rank 0 prints the human table on stdout
};

// Collective (every rank of MPI_COMM_WORLD calls it). Returns the result object (the
// same on every rank). Throws moetune::Error for bad options (naming the flag) or a bad
// layout (naming the key), on every rank alike.
nlohmann::json run_bench(const RunConfig& rc, const BenchOptions& opt);

// The human table of a result object.
std::string format_bench_table(const nlohmann::json& result);

}  // namespace moetune
