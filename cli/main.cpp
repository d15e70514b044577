// moetune command-line interface.
//   moetune init     --config CFG --out DIR [--seed S]        step-0 checkpoint
//   moetune train    --config CFG --out DIR [--init-from CKPT] [--set key=value ...]
//   moetune gen-data --out FILE [--docs N] [--vocab V] ...     synthetic JSONL for the demo
//   moetune tokenizer train|encode|decode|info ...              byte-level BPE (docs/tokenizer.md)
//   moetune data prepare|inspect ...                            token files for continued pre-training
//   moetune rl       --init-from SFT --prompts F --out DIR ...   RL post-training (docs/rl.md)
//   moetune generate --ckpt DIR --prompts F --out F.jsonl       completions with a KV cache
//   moetune eval     --ckpt DIR --prompts F [--samples k]       pass@1 / pass@k on held-out prompts
//   moetune bench    --config CFG [--steps N] [--init-from CKPT]  timed training steps, per-phase breakdown
// Every user error prints "error: <message naming file/line/key>" and exits 1.
#include <CLI/CLI.hpp>
#include <csignal>
#include <cstdio>
#include <climits>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "dist/collective.hpp"
#include "dist/environment.hpp"
#include "io/checkpoint.hpp"
#include "io/fsutil.hpp"
#include "io/hf_convert.hpp"
#include "io/json_parse.hpp"
#include "io/token_file.hpp"
#include "moe/config.hpp"
#include "moe/error.hpp"
#include "train/run_config.hpp"
#include "tokenizer/tokenizer.hpp"
#include "train/synthetic.hpp"
#include "train/arith_task.hpp"
#include "train/bench.hpp"
#include "train/prepare.hpp"
#include "train/rl_trainer.hpp"
#include "train/rollout.hpp"
#include "train/text_corpus.hpp"
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
    j = parse_json(fsutil::read_file(path));
  } catch (const JsonError& e) {
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

// Parses "1,2,3" / "1 2 3" / "[1, 2, 3]" into ids.
std::vector<int32_t> parse_ids(const std::string& s) {
  std::vector<int32_t> ids;
  std::string cur;
  const auto flush = [&] {
    if (cur.empty()) return;
    size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(cur, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != cur.size() || v < 0 || v > INT32_MAX) throw Error("--ids: '" + cur + "' is not a token id");
    ids.push_back(int32_t(v));
    cur.clear();
  };
  for (char c : s) {
    if (c == ',' || c == ' ' || c == '[' || c == ']' || c == '\n' || c == '\t')
      flush();
    else
      cur += c;
  }
  flush();
  return ids;
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
  std::string init_tok;
  init->add_option("--tokenizer", init_tok,
                   "Tokenizer to store in the checkpoint as tokenizer.json: \"byte\", a tokenizer.json or a "
                   "checkpoint (default: data.tokenizer of a run config, else none)");

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
                    "Continue exactly from this checkpoint (weights, optimizer state, step, data position); it must be "
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
                "Continue the base checkpoint's optimizer state (AdamW moments or Muon momentum) and step count "
                "(default: a fresh optimizer)");
  sft->add_flag("--auto-resume", sopt.auto_resume, "Continue from the newest valid checkpoint in --out, if any");
  sft->add_option("--set", sft_sets, "Override a run-config key, e.g. --set train.steps=200");
  sft->add_option("--peak-gflops", sopt.peak_gflops, "Peak GFLOP/s for MFU (default: measured)");
  sft->add_flag("--quiet", sft_quiet, "No progress lines");

  // ---- rl
  auto* rlc = app.add_subcommand(
      "rl", "RL post-training with verifiable rewards: rollouts, rewards, GRPO-family updates (docs/rl.md)");
  std::string rl_config;
  RlOptions ropt;
  std::vector<std::string> rl_sets;
  bool rl_quiet = false;
  rlc->add_option("--init-from", ropt.init_from, "The checkpoint to post-train (usually an SFT checkpoint); also "
                                                 "the frozen reference when rl.beta > 0");
  rlc->add_option("--prompts", ropt.prompts, "Training prompts: JSONL {\"prompt\"|\"messages\"|\"question\", "
                                             "\"answer\", ...} (docs/rewards.md)")
      ->required();
  rlc->add_option("--valid-prompts", ropt.valid_prompts,
                  "Held-out prompts: greedy pass@1 every rl.eval_every steps and after the last");
  rlc->add_option("--out", ropt.out_dir, "Output directory: metrics.jsonl and step-NNNNNNNN checkpoints")->required();
  rlc->add_option("--config", rl_config, "Run config (sections rl, train, optim, parallel; default: defaults)");
  rlc->add_option("--set", rl_sets, "Override a run-config key, e.g. --set rl.num_generations=8");
  rlc->add_option("--resume-from", ropt.resume_from, "Continue exactly from this RL checkpoint");
  rlc->add_flag("--auto-resume", ropt.auto_resume, "Continue from the newest valid checkpoint in --out, if any");
  rlc->add_option("--peak-gflops", ropt.peak_gflops, "Peak GFLOP/s for MFU (default: measured)");
  rlc->add_flag("--quiet", rl_quiet, "No progress lines");

  // ---- generate / eval
  auto add_inference = [](CLI::App* c, InferenceOptions& o, double& temp) {
    c->add_option("--ckpt", o.ckpt, "Checkpoint directory (its tokenizer.json, else the byte tokenizer)")->required();
    c->add_option("--prompts", o.prompts, "Prompt JSONL: {\"prompt\"|\"messages\"|\"question\", ...}")->required();
    c->add_option("--temperature", temp, "Sampling temperature; 0 = greedy");
    c->add_option("--top-k", o.gen.sampling.top_k, "Keep the k most likely tokens (0 = off)");
    c->add_option("--top-p", o.gen.sampling.top_p, "Nucleus sampling threshold (1 = off)");
    c->add_option("--max-new-tokens", o.gen.max_new_tokens, "Longest completion (default 64)");
    c->add_option("--seed", o.gen.seed, "Seed of the counter-based sampler (default 1)");
    c->add_option("--batch-size", o.gen.batch_size, "Completions decoded together (default 32)");
    c->add_option("--ep", o.ep, "Expert-parallel group size under mpirun (default 1)");
    c->add_option("--threads", o.threads, "OpenMP threads per rank (default: OpenMP's)");
  };
  auto* genc = app.add_subcommand("generate", "Write completions of a checkpoint for a prompt file (KV cache)");
  InferenceOptions gopt;
  gopt.gen.seed = 1;
  double gen_temp = 1.0;
  std::string gen_outf;
  bool gen_quiet = false;
  add_inference(genc, gopt, gen_temp);
  genc->add_option("--samples", gopt.samples, "Completions per prompt (default 1)");
  genc->add_option("--out", gen_outf, "completions.jsonl to write")->required();
  genc->add_flag("--quiet", gen_quiet, "No summary line");
  auto* evalc = app.add_subcommand("eval", "Greedy pass@1 and sampled pass@k of a checkpoint on held-out prompts");
  InferenceOptions eopt;
  eopt.gen.seed = 1;
  eopt.samples = 0;
  double eval_temp = 1.0;
  std::string eval_reward = "math", eval_weights, eval_cmd, eval_json;
  add_inference(evalc, eopt, eval_temp);
  evalc->add_option("--samples", eopt.samples, "Sampled completions per prompt for pass@k (default 0 = greedy only)");
  evalc->add_option("--reward", eval_reward, "Reward functions, comma-separated (default math; docs/rewards.md)");
  evalc->add_option("--reward-weights", eval_weights, "Their weights, comma-separated (default 1 each)");
  evalc->add_option("--reward-command", eval_cmd, "Program of the \"command\" reward");
  evalc->add_option("--json", eval_json, "Also write the result object to this file");

  // ---- bench
  auto* benchc = app.add_subcommand(
      "bench", "Time warm-up + N training steps of a run config at this MPI layout, per phase (bench/README.md)");
  std::string bench_config;
  std::vector<std::string> bench_sets;
  BenchOptions bopt;
  int bench_ep = 0, bench_threads = 0;
  bool bench_quiet = false;
  benchc->add_option("--config", bench_config, "Run config JSON (the data section's files are not read: synthetic "
                                               "documents are used)")
      ->required();
  benchc->add_option("--set", bench_sets, "Override a run-config key, e.g. --set train.micro_batch_size=4");
  benchc->add_option("--steps", bopt.steps, "Timed steps (default 10)");
  benchc->add_option("--warmup", bopt.warmup, "Untimed warm-up steps first (default 2)");
  auto* bench_ep_opt = benchc->add_option("--ep", bench_ep, "Expert-parallel group size (= --set parallel.ep=N)");
  auto* bench_threads_opt =
      benchc->add_option("--threads", bench_threads, "OpenMP threads per rank (= --set train.threads=N)");
  benchc->add_option("--init-from", bopt.init_from,
                     "Start from this checkpoint (its model section replaces the config's) instead of a fresh "
                     "init: a trained router's balance, as in post-training");
  benchc->add_option("--json", bopt.json_path, "Also write every number as one JSON object to this file");
  benchc->add_option("--peak-gflops", bopt.peak_gflops,
                     "Vendor peak GFLOP/s per rank: MFU is reported against it too (the measured FMA peak always)");
  benchc->add_flag("--quiet", bench_quiet, "No table on stdout");

  // ---- gen-data
  auto* gen = app.add_subcommand("gen-data", "Write synthetic data: a token dataset, or the arithmetic task");
  std::string gen_out, gen_task = "progression";
  int gen_docs = 2000, gen_vocab = 64, gen_min = 8, gen_max = 48;
  uint64_t gen_seed = 1;
  ArithTaskConfig arith;
  gen->add_option("--task", gen_task,
                  "progression (a JSONL token dataset, --out FILE) or arith (arithmetic problems: --out DIR gets "
                  "pretrain.jsonl, sft.jsonl, train_prompts.jsonl, test_prompts.jsonl)");
  gen->add_option("--digits", arith.digits, "arith: operand digits (1..9, default 2)");
  gen->add_option("--ops", arith.ops, "arith: operations, a subset of \"+-*\" (default \"+-\")");
  gen->add_option("--sft", arith.train_sft, "arith: SFT samples (default 20000)");
  gen->add_option("--train-prompts", arith.train_prompts, "arith: RL training prompts (default 2000)");
  gen->add_option("--test-prompts", arith.test_prompts, "arith: held-out test prompts (default 500)");
  gen->add_option("--sft-carry-error", arith.sft_carry_error,
                  "arith: share of SFT samples with a carry answered as if the carry were forgotten (noisy "
                  "demonstrations that the math reward catches; default 0)");
  gen->add_option("--out", gen_out, "JSONL file to write (progression) or directory (arith)")->required();
  gen->add_option("--docs", gen_docs, "Number of documents")->check(CLI::PositiveNumber);
  gen->add_option("--vocab", gen_vocab, "Vocabulary size of the model that will read it")->check(CLI::Range(8, 1 << 24));
  gen->add_option("--min-len", gen_min, "Shortest document (tokens)")->check(CLI::PositiveNumber);
  gen->add_option("--max-len", gen_max, "Longest document (tokens)")->check(CLI::PositiveNumber);
  gen->add_option("--seed", gen_seed, "Generator seed");

  // ---- tokenizer
  auto* tokc = app.add_subcommand("tokenizer", "Train and inspect byte-level BPE tokenizers (docs/tokenizer.md)");
  tokc->require_subcommand(1);
  auto* tok_train = tokc->add_subcommand("train", "Learn a byte-level BPE from text / JSONL {\"text\"} files");
  std::vector<std::string> tt_inputs;
  std::string tt_out;
  int tt_vocab = 0;
  int64_t tt_min_freq = 2;
  TextCorpusOptions tt_corpus;
  bool tt_quiet = false;
  tok_train->add_option("--input", tt_inputs, "Text or JSONL files (one or more)")->required();
  tok_train->add_option("--vocab-size", tt_vocab, "Vocabulary size, 256 bytes and 7 special tokens included (>= 263)")
      ->required();
  tok_train->add_option("--out", tt_out, "tokenizer.json to write (Hugging Face format)")->required();
  tok_train->add_option("--min-frequency", tt_min_freq, "Stop when the best pair occurs fewer times (default 2)");
  tok_train->add_option("--format", tt_corpus.format, "auto (*.jsonl/*.json are JSONL) | text | jsonl");
  tok_train->add_option("--text-split", tt_corpus.text_split, "Documents of a text file: file | paragraph | line");
  tok_train->add_option("--jsonl-key", tt_corpus.jsonl_key, "Field of a JSONL line holding the text (default text)");
  tok_train->add_flag("--quiet", tt_quiet, "No progress lines");
  auto* tok_encode = tokc->add_subcommand("encode", "Print the token ids of a text");
  std::string te_tok = "byte", te_text, te_file;
  tok_encode->add_option("--tokenizer", te_tok, "tokenizer.json, a checkpoint directory, or \"byte\" (default)");
  auto* te_text_opt = tok_encode->add_option("--text", te_text, "Text to encode");
  tok_encode->add_option("--file", te_file, "File whose bytes to encode")->excludes(te_text_opt);
  auto* tok_decode = tokc->add_subcommand("decode", "Print the text of token ids");
  std::string td_tok = "byte", td_ids;
  tok_decode->add_option("--tokenizer", td_tok, "tokenizer.json, a checkpoint directory, or \"byte\" (default)");
  tok_decode->add_option("--ids", td_ids, "Ids, e.g. \"72,105\"")->required();
  auto* tok_info = tokc->add_subcommand("info", "Describe a tokenizer: size, merges, special tokens, SHA-256");
  std::string ti_tok = "byte";
  tok_info->add_option("--tokenizer", ti_tok, "tokenizer.json, a checkpoint directory, or \"byte\" (default)");

  // ---- data
  auto* datac = app.add_subcommand("data", "Prepare and inspect token files for continued pre-training (docs/data.md)");
  datac->require_subcommand(1);
  auto* prep = datac->add_subcommand("prepare", "Tokenize text / JSONL {\"text\"} files once into a token file");
  PrepareOptions popt;
  std::string prep_tok = "byte";
  bool prep_no_eos = false, prep_quiet = false;
  prep->add_option("--input", popt.inputs, "Text or JSONL files (one or more), read in order")->required();
  prep->add_option("--out", popt.out, "Token file to write (atomically), e.g. train.bin")->required();
  prep->add_option("--tokenizer", prep_tok, "tokenizer.json, a checkpoint directory, or \"byte\" (default)");
  prep->add_option("--format", popt.corpus.format, "auto (*.jsonl/*.json are JSONL) | text | jsonl");
  prep->add_option("--text-split", popt.corpus.text_split, "Documents of a text file: file (default) | paragraph | line");
  prep->add_option("--jsonl-key", popt.corpus.jsonl_key, "Field of a JSONL line holding the text (default text)");
  prep->add_flag("--bos", popt.bos, "Start every document with <|bos|>");
  prep->add_option("--eos", popt.eos, "Special token appended to every document (default <|eos|>)");
  prep->add_flag("--no-eos", prep_no_eos, "Append nothing to documents");
  prep->add_flag("--quiet", prep_quiet, "No progress lines");
  auto* insp = datac->add_subcommand("inspect", "Describe a token file (and check it)");
  std::string insp_path, insp_tok;
  int insp_show = 0;
  insp->add_option("file", insp_path, "Token file")->required();
  insp->add_option("--tokenizer", insp_tok, "Tokenizer to decode with (checked against the file's SHA-256)");
  insp->add_option("--show", insp_show, "Decode the first N documents (needs --tokenizer)");

  // ---- convert
  auto* convc = app.add_subcommand(
      "convert", "Convert a checkpoint to or from the Hugging Face transformers layout (docs/checkpoint.md)");
  std::string conv_to, conv_from, conv_in, conv_out;
  double conv_shard_mib = 0;
  convc->add_option("--to", conv_to, "hf: write the Hugging Face form (stacked experts) of a moetune checkpoint");
  convc->add_option("--from", conv_from, "hf: read a Hugging Face DeepSeek directory into a moetune checkpoint");
  convc->add_option("input", conv_in, "Checkpoint directory to read")->required();
  convc->add_option("output", conv_out, "Directory to write (replaced only if empty or a checkpoint)")->required();
  convc->add_option("--max-shard-mib", conv_shard_mib,
                    "With --to hf: shards of at most this many MiB plus model.safetensors.index.json (0 = one file)");

  // ---- help-config
  auto* keys = app.add_subcommand("config-keys", "Print every run-config key with its default and meaning");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return rank == 0 ? app.exit(e) : (e.get_exit_code() == 0 ? 0 : 1);
  }
  try {
    if ((*init || *gen || *keys || *tokc || *datac || *convc) && rank != 0) return 0;  // single-writer commands: rank 0 only
    if (*init) {
      std::ifstream probe(init_config);
      ModelConfig cfg = model_config_from_any(init_config, init_sets);
      nlohmann::json j = nlohmann::json::parse(probe, nullptr, false);
      const bool run_config = j.is_object() && (j.contains("train") || j.contains("data"));
      if (!init_seed_given && run_config && j.contains("train"))
        init_seed = RunConfig::from_file(init_config).train.seed;
      if (init_tok.empty() && run_config) init_tok = RunConfig::from_file(init_config).data.tokenizer;
      write_initial_checkpoint(cfg, init_seed, init_out, init_tok);
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
    } else if (*rlc) {
      RunConfig rc = rl_config.empty() ? RunConfig{} : RunConfig::from_file(rl_config);
      if (!ropt.init_from.empty() && !ropt.resume_from.empty())
        throw Error("rl: --init-from starts a new run; it cannot be combined with --resume-from");
      const std::string from = !ropt.resume_from.empty() ? ropt.resume_from : ropt.init_from;
      if (!from.empty()) {
        rc.model = load_checkpoint_config(from);
      } else if (ropt.auto_resume) {
        const std::string latest = find_latest_valid_checkpoint(ropt.out_dir, [](const std::string&) {});
        if (latest.empty()) throw Error("rl: --auto-resume found no checkpoint in " + ropt.out_dir + " and no --init-from was given");
        rc.model = load_checkpoint_config(latest);
      }
      for (const auto& s : rl_sets) rc.set(s);
      rc.validate(rl_config.empty() ? "rl" : rl_config);
      ropt.progress = !rl_quiet;
      run_rl(rc, ropt);
    } else if (*benchc) {
      RunConfig rc = RunConfig::from_file(bench_config);
      if (!bopt.init_from.empty()) rc.model = load_checkpoint_config(bopt.init_from);
      for (const auto& s : bench_sets) rc.set(s);
      if (bench_ep_opt->count() > 0) {
        if (bench_ep < 1) throw Error("bench: --ep must be >= 1, got " + std::to_string(bench_ep));
        rc.parallel.ep = bench_ep;
      }
      if (bench_threads_opt->count() > 0) {
        if (bench_threads < 1) throw Error("bench: --threads must be >= 1, got " + std::to_string(bench_threads));
        rc.train.threads = bench_threads;
      }
      rc.validate(bench_config);
      bopt.table = !bench_quiet;
      run_bench(rc, bopt);
    } else if (*convc) {
      if ((conv_to.empty()) == (conv_from.empty()))
        throw Error("convert: give exactly one of --to hf and --from hf");
      const std::string& fmt = conv_to.empty() ? conv_from : conv_to;
      if (fmt != "hf") throw Error("convert: unknown format '" + fmt + "' (the one format is hf)");
      if (!(conv_shard_mib >= 0)) throw Error("convert: --max-shard-mib must be >= 0");
      if (!conv_from.empty() && conv_shard_mib > 0) throw Error("convert: --max-shard-mib goes with --to hf");
      const ConvertReport r = conv_to.empty() ? convert_from_hf(conv_in, conv_out)
                                              : convert_to_hf(conv_in, conv_out,
                                                              uint64_t(conv_shard_mib * 1024 * 1024));
      std::printf("wrote %s (%s form, model_type %s): %lld tensors, %lld parameters\n", conv_out.c_str(),
                  conv_to.empty() ? "moetune" : "Hugging Face", r.model_type.c_str(), (long long)r.tensors,
                  (long long)r.parameters);
      for (const auto& n : r.notes) std::printf("note: %s\n", n.c_str());
    } else if (*genc) {
      gopt.gen.sampling.temperature = gen_temp;
      gopt.progress = !gen_quiet;
      run_generate(gopt, gen_outf);
    } else if (*evalc) {
      eopt.gen.sampling.temperature = eval_temp;
      RunConfig tmp;
      tmp.rl.reward = eval_reward;
      tmp.rl.reward_weights = eval_weights;
      tmp.rl.reward_command = eval_cmd;
      run_eval(eopt, reward_spec_of(tmp.rl), eval_json);
    } else if (*gen) {
      if (gen_task == "arith") {
        arith.seed = gen_seed;
        const ArithTaskStats st = write_arith_task(arith, gen_out);
        std::printf("wrote the arithmetic task to %s: %s\n", gen_out.c_str(), st.describe().c_str());
      } else if (gen_task == "progression") {
        if (gen_min > gen_max) throw Error("gen-data: --min-len exceeds --max-len");
        write_synthetic_jsonl(gen_out, gen_docs, gen_vocab, gen_min, gen_max, gen_seed);
        std::printf("wrote %d documents to %s\n", gen_docs, gen_out.c_str());
      } else {
        throw Error("gen-data: --task must be progression or arith, got '" + gen_task + "'");
      }
    } else if (*tok_train) {
      BpeTrainer trainer;
      TextCorpusStats total;
      for (const auto& path : tt_inputs) {
        const auto st = for_each_text_document(path, tt_corpus, [&](std::string&& doc, const std::string&) {
          trainer.add_text(doc);
        });
        total.documents += st.documents;
        total.bytes += st.bytes;
        if (!tt_quiet)
          std::printf("tokenizer train: %s: %lld documents, %.1f MB\n", path.c_str(),
                      static_cast<long long>(st.documents), double(st.bytes) / 1e6);
      }
      if (total.documents == 0) throw Error("tokenizer train: the --input files hold no text");
      if (!tt_quiet) {
        std::printf("tokenizer train: %lld documents, %.1f MB, %lld distinct words; learning up to %d tokens\n",
                    static_cast<long long>(total.documents), double(total.bytes) / 1e6,
                    static_cast<long long>(trainer.distinct_words()), tt_vocab);
        std::fflush(stdout);
      }
      const Tokenizer t = trainer.train({tt_vocab, tt_min_freq, !tt_quiet});
      t.save(tt_out);
      std::printf("wrote %s: %s\n", tt_out.c_str(), t.describe().c_str());
      if (t.vocab_size() < tt_vocab)
        std::printf("note: %d tokens instead of %d: no pair of tokens occurs %lld or more times any more "
                    "(more text or a lower --min-frequency gives more)\n",
                    t.vocab_size(), tt_vocab, static_cast<long long>(tt_min_freq));
    } else if (*tok_encode) {
      const Tokenizer t = Tokenizer::from_spec(te_tok);
      const std::string text = te_file.empty() ? te_text : fsutil::read_file(te_file);
      const auto ids = t.encode(text);
      std::string out;
      for (size_t i = 0; i < ids.size(); ++i) out += (i ? " " : "") + std::to_string(ids[i]);
      std::printf("%s\n", out.c_str());
    } else if (*tok_decode) {
      const Tokenizer t = Tokenizer::from_spec(td_tok);
      std::fputs(t.decode(parse_ids(td_ids)).c_str(), stdout);
      std::printf("\n");
    } else if (*tok_info) {
      const Tokenizer t = Tokenizer::from_spec(ti_tok);
      std::printf("%s\n", t.describe().c_str());
      std::printf("sha256 %s\n", t.sha256_hex().c_str());
      for (int32_t id = 0; id < t.vocab_size(); ++id)
        if (t.is_special(id)) std::printf("special %d %s\n", id, t.token(id).c_str());
    } else if (*prep) {
      if (prep_no_eos) popt.eos.clear();
      popt.progress = !prep_quiet;
      const Tokenizer t = Tokenizer::from_spec(prep_tok);
      if (popt.progress) std::printf("data prepare: tokenizer %s\n", t.describe().c_str());
      const PrepareStats st = prepare_token_file(popt, t);
      std::printf("wrote %s: %lld documents, %lld tokens from %.1f MB of text (%.2f bytes/token; %lld empty "
                  "documents skipped) in %.2f s (%.1f MB/s)\n",
                  popt.out.c_str(), static_cast<long long>(st.documents), static_cast<long long>(st.tokens),
                  double(st.bytes) / 1e6, double(st.bytes) / double(std::max<int64_t>(st.tokens, 1)),
                  static_cast<long long>(st.empty), st.seconds, double(st.bytes) / 1e6 / std::max(st.seconds, 1e-9));
    } else if (*insp) {
      const TokenFile f(insp_path);
      uint64_t longest = 0;
      for (uint64_t d = 0; d < f.num_docs(); ++d) longest = std::max(longest, f.doc_length(d));
      std::printf("%s: moetune token file, %llu documents, %llu tokens (%u-byte ids), longest document %llu, "
                  "vocab_size %llu\ntokenizer sha256 %s\n",
                  insp_path.c_str(), static_cast<unsigned long long>(f.num_docs()),
                  static_cast<unsigned long long>(f.num_tokens()), f.token_bytes(),
                  static_cast<unsigned long long>(longest), static_cast<unsigned long long>(f.vocab_size()),
                  sha256_to_hex(f.tokenizer_sha256()).c_str());
      if (insp_show > 0 && insp_tok.empty()) throw Error("data inspect: --show needs --tokenizer");
      if (!insp_tok.empty()) {
        const Tokenizer t = Tokenizer::from_spec(insp_tok);
        if (t.sha256_hex() != sha256_to_hex(f.tokenizer_sha256()))
          throw Error(insp_path + ": --tokenizer " + insp_tok + " (sha256 " + t.sha256_hex() +
                      ") is not the tokenizer this file was prepared with (sha256 " +
                      sha256_to_hex(f.tokenizer_sha256()) + ")");
        std::printf("tokenizer matches: %s\n", t.describe().c_str());
        for (uint64_t d = 0; d < std::min<uint64_t>(uint64_t(insp_show), f.num_docs()); ++d) {
          std::vector<int32_t> ids(f.doc_length(d));
          f.copy(d, 0, ids.size(), ids.data());
          std::printf("--- document %llu (%zu tokens)\n%s\n", static_cast<unsigned long long>(d), ids.size(),
                      t.decode(ids).c_str());
        }
      }
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
