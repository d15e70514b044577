// The single-process training loop behind `moetune train`: data -> train_step ->
// progress line + metrics.jsonl -> checkpoints.
#pragma once
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "dist/parallel_trainer.hpp"
#include "tokenizer/tokenizer.hpp"
#include "train/run_config.hpp"

namespace moetune {

struct TrainOptions {
  std::string out_dir;      // checkpoints and metrics.jsonl go here
  std::string init_from;    // optional checkpoint directory to start from (weights + routing bias)
  bool continue_optimizer = false;  // with init_from: also take its AdamW moments and step count
  std::string resume_from;  // continue exactly from this checkpoint (weights, optimizer, step, data position)
  bool auto_resume = false; // continue from the newest valid checkpoint in out_dir, if any
  double peak_gflops = 0;   // > 0: divide MFU by this instead of the measured FMA peak
  bool progress = true;     // one progress line per logged step on stdout
};

struct TrainSummary {
  int64_t steps = 0;
  double first_loss = 0, last_loss = 0;
  double tokens_per_s = 0;  // median over logged steps (first step excluded when possible)
  double mfu = 0;
  double peak_flops = 0;
  int64_t skipped_steps = 0;
  std::string final_checkpoint;
};

TrainSummary run_training(const RunConfig& rc, const TrainOptions& opt);

// The newest step-NNNNNNNN checkpoint of out_dir whose manifest verifies ("" if none);
// each invalid one met on the way is reported through `warn`.
std::string find_latest_valid_checkpoint(const std::string& out_dir,
                                         const std::function<void(const std::string&)>& warn);

// Where a run stopped, from <dir>/trainer_state.json (io/checkpoint.hpp
// load_trainer_state): "step" (the last completed step) and, for `train`/`sft`,
// "data": {"epoch", "row"} (BatchLoader::State), or, for `rl`, "rl": {"epoch", "pos",
// "reference"} (the prompt order and the reference checkpoint). Every field is checked:
// a missing key, a wrong type or a negative or too large value is a moetune::Error
// naming the file and the dotted key.
struct TrainResumeState {
  int64_t step = 0, epoch = 0, row = 0;
};
TrainResumeState read_train_resume_state(const std::string& dir);
struct RlResumeState {
  int64_t step = 0, epoch = 0, pos = 0;
  std::string reference;
};
RlResumeState read_rl_resume_state(const std::string& dir);

// Pieces of a run shared by `moetune train`, `sft` and `rl`.
// Micro-batches of the global batch over `ranks` ranks (RunConfig::micro_batches), at
// least one per rank and the same number on each; else a moetune::Error naming the key.
int global_micro_batches(const RunConfig& rc, int ranks);
// Sets OpenMP's thread count from train.threads (0 = OpenMP's default) and returns it.
int apply_threads(const RunConfig& rc);
// The trainer of a run on `grid`: optim.*, parallel.zero_stage and parallel.reduction.
template <class T>
std::unique_ptr<dist::ParallelTrainer<T>> make_trainer(const ModelConfig& cfg, dist::ProcessGrid& grid,
                                                       const RunConfig& rc);
// out/step-NNNNNNNN
std::string step_dir(const std::string& out, int64_t step);
// Step checkpoint directories of out, newest first.
std::vector<std::filesystem::path> step_dirs(const std::string& out);
// Removes all but the newest `keep` step checkpoints of out.
void prune_checkpoints(const std::string& out, int keep);
// Removes step-*.tmp-* directories (checkpoints whose writing was interrupted).
void remove_incomplete_checkpoints(const std::string& out);
// out/metrics.jsonl opened for writing; when resuming at start_step > 1 the lines of the
// earlier steps are kept (rewritten through a temporary file, so a failure leaves the old
// file whole; torn lines are dropped) and *skipped_before, if given, is the number of
// them marked "skipped". Throws moetune::Error if it cannot be opened.
std::ofstream open_metrics(const std::string& out, int64_t start_step, int64_t* skipped_before = nullptr);
// The run's tokenizer (docs/tokenizer.md): data.tokenizer when set (it must equal the
// tokenizer of the checkpoint `start`, if that has one), else the checkpoint's, else the
// byte tokenizer for data.format sft/bin; none otherwise. Checked against model.vocab_size.
std::optional<Tokenizer> resolve_tokenizer(const RunConfig& rc, const std::string& start);
double median(std::vector<double> v);

// `moetune init`: a step-0 checkpoint (weights from the seed, bias 0, no optimizer state),
// with the tokenizer `tokenizer_spec` ("byte", a tokenizer.json, a checkpoint; "" = none)
// as its tokenizer.json. Throws moetune::Error if that tokenizer exceeds model.vocab_size.
void write_initial_checkpoint(const ModelConfig& cfg, uint64_t seed, const std::string& out_dir,
                              const std::string& tokenizer_spec = "");

}  // namespace moetune
