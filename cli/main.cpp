// moetune command-line interface.
//   moetune init     --config CFG --out DIR [--seed S]        step-0 checkpoint
//   moetune train    --config CFG --out DIR [--init-from CKPT] [--set key=value ...]
//   moetune gen-data --out FILE [--docs N] [--vocab V] ...     synthetic JSONL for the demo
// Every user error prints "error: <message naming file/line/key>" and exits 1.
#include <CLI/CLI.hpp>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "dist/collective.hpp"
#include "dist/environment.hpp"
#include "io/checkpoint.hpp"
#include "moe/config.hpp"
#include "moe/error.hpp"
#include "train/run_config.hpp"
#include "train/synthetic.hpp"
#include "train/trainer.hpp"

using namespace moetune;

namespace {

// A config file is either a run config ({"model": {...}, "train": ...}) or a bare
// model config.json; `init` accepts both.
ModelConfig model_config_from_any(const std::string& path, const std::vector<std::string>& sets) {
  std::ifstream in(path);
  if (!in) throw Error(path + ": cannot open file");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::parse_error& e) {
    throw Error(path + ": invalid JSON: " + e.what());
  }
  if (j.is_object() && (j.contains("model") || j.contains("train") || j.contains("data") || j.contains("optim"))) {
    RunConfig rc = RunConfig::from_file(path);
    for (const auto& s : sets) rc.set(s);
    return rc.model;
  }
  ModelConfig c = ModelConfig::from_json(j, path);
  for (const auto& s : sets) {
    const auto eq = s.find('=');
    if (eq == std::string::npos) throw Error("--set " + s + ": expected key=value");
    std::string key = s.substr(0, eq);
    if (key.rfind("model.", 0) == 0) key = key.substr(6);
    c.set(key, s.substr(eq + 1), "--set " + s);
  }
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  // MPI is always initialised (a plain `moetune train` is a one-rank job; under
  // mpirun every rank runs this same program).
  dist::Environment env(&argc, &argv);
  // A file-size limit (ulimit -f) must give a write error we report, not a signal.
  std::signal(SIGXFSZ, SIG_IGN);
  const int rank = dist::Environment::world_rank(), ranks = dist::Environment::world_size();
  CLI::App app{"moetune: full-parameter post-training of Mixture-of-Experts transformers on CPUs"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "moetune 0.1.0");

  // ---- init
  auto* init = app.add_subcommand("init", "Write a step-0 checkpoint (initial weights from a seed)");
  std::string init_config, init_out;
  uint64_t init_seed = 1234;
  bool init_seed_given = false;
  std::vector<std::string> init_sets;
  init->add_option("--config", init_config, "Run config (with a \"model\" section) or model config.json")
      ->required();
  init->add_option("--out", init_out, "Checkpoint directory to write")->required();
  init->add_option("--seed", init_seed, "Initialisation seed (default: train.seed of a run config, else 1234)")
      ->each([&](const std::string&) { init_seed_given = true; });
  init->add_option("--set", init_sets, "Override a key, e.g. --set model.hidden_size=64");

  // ---- train
  auto* train = app.add_subcommand("train", "Train (or post-train) a model on JSONL token data");
  std::string train_config;
  TrainOptions topt;
  std::vector<std::string> train_sets;
  bool quiet = false;
  train->add_option("--config", train_config, "Run config JSON (see docs/config.md)")->required();
  train->add_option("--out", topt.out_dir, "Output directory: metrics.jsonl and step-NNNNNNNN checkpoints")
      ->required();
  train->add_option("--init-from", topt.init_from,
                    "Start from this checkpoint's weights (its config.json replaces the run config's model section)");
  train->add_option("--resume-from", topt.resume_from,
                    "Continue exactly from this checkpoint (weights, AdamW state, step, data position); it must be "
                    "complete and intact (manifest.json checksums)");
  train->add_flag("--auto-resume", topt.auto_resume,
                  "Continue from the newest valid checkpoint in --out if there is one (invalid ones are skipped "
                  "with a warning), else start afresh");
  train->add_option("--set", train_sets, "Override a run-config key, e.g. --set train.steps=10 --set optim.lr=3e-4");
  train->add_option("--peak-gflops", topt.peak_gflops,
                    "Peak GFLOP/s for MFU (default: measured with an FMA probe at start-up)");
  train->add_flag("--quiet", quiet, "No progress lines");

  // ---- sft
  auto* sft = app.add_subcommand(
      "sft", "Post-train (supervised fine-tuning) a checkpoint on chat / prompt-completion JSONL (docs/sft.md)");
  std::string sft_config, sft_data, sft_valid;
  TrainOptions sopt;
  std::vector<std::string> sft_sets;
  bool sft_quiet = false;
  sft->add_option("--init-from", sopt.init_from, "Base checkpoint (any moetune checkpoint, any layout)")->required();
  sft->add_option("--data", sft_data, "SFT JSONL: {\"messages\": [...]}, {\"prompt\", \"completion\"} or token ids")
      ->required();
  sft->add_option("--out", sopt.out_dir, "Output directory: metrics.jsonl and step-NNNNNNNN checkpoints")->required();
  sft->add_option("--config", sft_config, "Run config for the data/train/optim/parallel sections (default: defaults)");
  sft->add_option("--valid", sft_valid, "Held-out SFT JSONL for the validation loss");
  sft->add_flag("--continue-optimizer", sopt.continue_optimizer,
                "Continue the base checkpoint's AdamW moments and step count (default: a fresh optimizer)");
  sft->add_flag("--auto-resume", sopt.auto_resume, "Continue from the newest valid checkpoint in --out, if any");
  sft->add_option("--set", sft_sets, "Override a run-config key, e.g. --set train.steps=200");
  sft->add_option("--peak-gflops", sopt.peak_gflops, "Peak GFLOP/s for MFU (default: measured)");
  sft->add_flag("--quiet", sft_quiet, "No progress lines");

  // ---- gen-data
  auto* gen = app.add_subcommand("gen-data", "Write a synthetic JSONL token dataset (for demos and tests)");
  std::string gen_out;
  int gen_docs = 2000, gen_vocab = 64, gen_min = 8, gen_max = 48;
  uint64_t gen_seed = 1;
  gen->add_option("--out", gen_out, "JSONL file to write")->required();
  gen->add_option("--docs", gen_docs, "Number of documents")->check(CLI::PositiveNumber);
  gen->add_option("--vocab", gen_vocab, "Vocabulary size of the model that will read it")->check(CLI::Range(8, 1 << 24));
  gen->add_option("--min-len", gen_min, "Shortest document (tokens)")->check(CLI::PositiveNumber);
  gen->add_option("--max-len", gen_max, "Longest document (tokens)")->check(CLI::PositiveNumber);
  gen->add_option("--seed", gen_seed, "Generator seed");

  // ---- help-config
  auto* keys = app.add_subcommand("config-keys", "Print every run-config key with its default and meaning");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return rank == 0 ? app.exit(e) : (e.get_exit_code() == 0 ? 0 : 1);
  }
  try {
    if ((*init || *gen || *keys) && rank != 0) return 0;  // single-writer commands: rank 0 only
    if (*init) {
      std::ifstream probe(init_config);
      ModelConfig cfg = model_config_from_any(init_config, init_sets);
      if (!init_seed_given) {
        nlohmann::json j = nlohmann::json::parse(probe, nullptr, false);
        if (j.is_object() && j.contains("train")) init_seed = RunConfig::from_file(init_config).train.seed;
      }
      write_initial_checkpoint(cfg, init_seed, init_out);
      std::printf("wrote step-0 checkpoint to %s (seed %llu)\n", init_out.c_str(),
                  static_cast<unsigned long long>(init_seed));
    } else if (*train) {
      RunConfig rc = RunConfig::from_file(train_config);
      for (const auto& s : train_sets) rc.set(s);
      if (!topt.init_from.empty() && (!topt.resume_from.empty() || topt.auto_resume))
        throw Error("train: --init-from starts a new run; it cannot be combined with --resume-from/--auto-resume");
      if (!topt.init_from.empty()) {
        rc.model = load_checkpoint_config(topt.init_from);
        rc.validate(train_config);
      }
      topt.progress = !quiet;
      run_training(rc, topt);
    } else if (*sft) {
      RunConfig rc = sft_config.empty() ? RunConfig{} : RunConfig::from_file(sft_config);
      rc.model = load_checkpoint_config(sopt.init_from);
      rc.data.format = "sft";
      rc.data.train_path = sft_data;
      if (!sft_valid.empty()) rc.data.valid_path = sft_valid;
      for (const auto& s : sft_sets) rc.set(s);
      rc.validate(sft_config.empty() ? "sft" : sft_config);
      sopt.progress = !sft_quiet;
      run_training(rc, sopt);
    } else if (*gen) {
      if (gen_min > gen_max) throw Error("gen-data: --min-len exceeds --max-len");
      write_synthetic_jsonl(gen_out, gen_docs, gen_vocab, gen_min, gen_max, gen_seed);
      std::printf("wrote %d documents to %s\n", gen_docs, gen_out.c_str());
    } else if (*keys) {
      std::fputs(describe_config_keys().c_str(), stdout);
    }
  } catch (const dist::CollectiveError& e) {
    // Every rank failed the same way: one message, every rank exits 1.
    std::fflush(stdout);
    if (rank == 0) std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    if (ranks > 1) dist::abort_job(e.what());  // other ranks may be inside a collective: end the job
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
