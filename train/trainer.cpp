// Training loop: one global batch per step, AdamW with the configured schedule,
// progress and metrics with tokens/s and MFU (MODEL.md section 9), checkpoints.
#include "train/trainer.hpp"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <limits>

#include "dist/checkpoint_parallel.hpp"
#include "dist/collective.hpp"
#include "dist/fault.hpp"
#include "io/fsutil.hpp"
#include "io/manifest.hpp"
#include "dist/parallel_trainer.hpp"
#include "io/checkpoint.hpp"
#include "moe/error.hpp"
#include "moe/model.hpp"
#include "optim/adamw.hpp"
#include "optim/schedule.hpp"
#include "io/token_file.hpp"
#include "tokenizer/tokenizer.hpp"
#include "train/data.hpp"
#include "train/sft_data.hpp"
#include "train/flops.hpp"
#include "train/step.hpp"

namespace moetune {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// The documents of a data file: token-id JSONL, SFT JSONL rendered with the chat
// template and the run's tokenizer (overlong samples truncated, skipped or refused), or
// a token file (memory-mapped; it must come from the run's tokenizer).
std::shared_ptr<const DocumentSource> load_documents(const DataConfig& dc, const std::string& path, int vocab_size,
                                                     const std::optional<Tokenizer>& tok, bool talk) {
  if (dc.format == "bin") {
    auto src = std::make_shared<TokenFileDocuments>(path, vocab_size);
    const std::string file_sha = sha256_to_hex(src->file().tokenizer_sha256());
    if (tok && file_sha != tok->sha256_hex())
      throw Error(path + ": this token file was prepared with the tokenizer of sha256 " + file_sha.substr(0, 12) +
                  ", but the run's tokenizer is " + tok->describe() +
                  (dc.tokenizer.empty() ? " (set key 'data.tokenizer' to the tokenizer.json given to moetune data prepare)"
                                        : " (key 'data.tokenizer')"));
    return src;
  }
  if (dc.format == "tokens") {
    if (TokenFile::looks_like(path))
      throw Error(path + ": is a token file (moetune data prepare); set data.format = \"bin\" to read it");
    return std::make_shared<VectorDocuments>(read_jsonl_documents(path, vocab_size), path);
  }
  auto samples = read_sft_jsonl(path, *tok, vocab_size);
  const size_t n = samples.size();
  const auto st = apply_overlong(samples, dc.seq_len, dc.overlong, path);
  if (talk)
    std::printf("sft data %s: %zu samples, %lld truncated, %lld skipped (seq_len %d, data.overlong %s)\n",
                path.c_str(), n, static_cast<long long>(st.truncated), static_cast<long long>(st.skipped), dc.seq_len,
                dc.overlong.c_str());
  return std::make_shared<VectorDocuments>(sft_documents(std::move(samples)), path);
}


template <class T>
TrainSummary train_impl(const RunConfig& rc, const TrainOptions& opt) {
  const ModelConfig& cfg = rc.model;
  const int threads = apply_threads(rc);

  // Set-up is collective: it succeeds on every rank or fails on every rank with one
  // message (bad layout, unreadable data or checkpoint), never leaving a rank waiting.
  dist::Comm world = dist::Comm::world();
  std::optional<dist::ProcessGrid> grid_holder;
  std::unique_ptr<dist::ParallelTrainer<T>> trainer_holder;
  std::unique_ptr<BatchLoader> loader_holder;
  size_t n_docs = 0;
  int M = 0;
  std::string resume_dir;
  TrainResumeState resume_state;
  std::vector<MicroBatch> valid;
  std::optional<Tokenizer> tokenizer;
  int64_t start_step = 1;
  double resume_load_s = 0;
  ScheduleConfig sched = rc.schedule_config();
  dist::run_collectively(world, [&] {
    grid_holder.emplace(dist::ProcessGrid::create(world, rc.parallel.ep, cfg));
  });
  dist::ProcessGrid& grid = *grid_holder;
  dist::run_collectively(world, [&] {
    M = global_micro_batches(rc, grid.world_size);
    validate(sched);
    if (grid.world_rank == 0) fs::create_directories(opt.out_dir);
    trainer_holder = make_trainer<T>(cfg, grid, rc);
    Model<T>& m = trainer_holder->model();
    // Temporary directories of checkpoints whose writing was interrupted are incomplete
    // by construction (a checkpoint only gets its name once complete): remove them.
    if (grid.world_rank == 0) remove_incomplete_checkpoints(opt.out_dir);
    if (opt.auto_resume && opt.resume_from.empty())
      resume_dir = find_latest_valid_checkpoint(opt.out_dir, [&](const std::string& w) {
        if (grid.world_rank == 0) std::fprintf(stderr, "warning: %s\n", w.c_str());
      });
    else if (!opt.resume_from.empty()) {
      resume_dir = opt.resume_from;
      verify_manifest(resume_dir);  // an explicit checkpoint must be complete and intact
    }
    if (!resume_dir.empty()) {
      const auto tl = std::chrono::steady_clock::now();
      load_model_weights(resume_dir, cfg, m.layout(), m.params(), m.expert_bias(), &m.tid2eid());
      std::vector<T> mo, vo;
      int64_t ostep = 0;
      if (!load_optimizer_state(resume_dir, m.layout(), mo, vo, ostep, rc.optim.name))
        throw Error(resume_dir + ": no optimizer state; cannot resume exactly (use --init-from to start afresh)");
      trainer_holder->set_optimizer_state(mo, vo, ostep);
      resume_state = read_train_resume_state(resume_dir);
      start_step = resume_state.step + 1;
      resume_load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - tl).count();
    } else if (!opt.init_from.empty()) {
      load_model_weights(opt.init_from, cfg, m.layout(), m.params(), m.expert_bias(), &m.tid2eid());
      if (opt.continue_optimizer) {
        std::vector<T> mo, vo;
        int64_t ostep = 0;
        if (!load_optimizer_state(opt.init_from, m.layout(), mo, vo, ostep, rc.optim.name))
          throw Error(opt.init_from + ": --continue-optimizer: the checkpoint has no optimizer state");
        trainer_holder->set_optimizer_state(mo, vo, ostep);
      }
    } else {
      m.init(rc.train.seed);
    }
    // Every rank reads the data and builds the same global batch; rank r trains on its
    // contiguous share of the micro-batches.
    tokenizer = resolve_tokenizer(rc, !resume_dir.empty() ? resume_dir : opt.init_from);
    auto docs = load_documents(rc.data, rc.data.train_path, cfg.vocab_size, tokenizer,
                               grid.world_rank == 0 && opt.progress);
    n_docs = size_t(docs->num_docs());
    DataConfig dc = rc.data;
    if (dc.overlong == "skip") dc.overlong = "truncate";  // already applied to the SFT samples
    loader_holder = std::make_unique<BatchLoader>(std::move(docs), dc, rc.train.seed);
    if (!rc.data.valid_path.empty()) {
      // The validation set: every row of it once, in file order, padded with empty
      // (all-ignored) micro-batches to a multiple of the number of ranks.
      DataConfig vc = rc.data;
      vc.shuffle = false;
      vc.train_path = rc.data.valid_path;
      if (vc.overlong == "skip") vc.overlong = "truncate";
      BatchLoader vl(load_documents(rc.data, rc.data.valid_path, cfg.vocab_size, tokenizer, false), vc,
                     rc.train.seed);
      const int64_t rows = vl.rows_per_epoch();
      int vm = int((rows + rc.train.micro_batch_size - 1) / rc.train.micro_batch_size);
      vm = (vm + grid.world_size - 1) / grid.world_size * grid.world_size;
      valid = vl.next_global_batch(rc.train.micro_batch_size, vm);
      int64_t seen = 0;  // rows beyond the first epoch are masked out
      for (auto& mb : valid)
        for (int r = 0; r < mb.rows; ++r, ++seen)
          if (seen >= rows)
            std::fill(mb.labels.begin() + int64_t(r) * mb.seq_len, mb.labels.begin() + int64_t(r + 1) * mb.seq_len,
                      kIgnoreIndex);
    }
    if (!resume_dir.empty())
      loader_holder->set_state({resume_state.epoch, resume_state.row});
  });
  dist::ParallelTrainer<T>& trainer = *trainer_holder;
  Model<T>& model = trainer.model();
  BatchLoader& loader = *loader_holder;
  const bool root = grid.world_rank == 0;
  const bool talk = root && opt.progress;

  const double flops_tok = flops_per_token(cfg, rc.data.seq_len);
  // Peak of one rank (its threads), measured by rank 0's FMA probe; the job's peak
  // assumes every rank has cores of its own.
  double peak_rank = opt.peak_gflops > 0 ? opt.peak_gflops * 1e9 : (root ? measure_peak_flops(threads) : 0.0);
  grid.world.broadcast(std::span<double>(&peak_rank, 1), 0);
  const double peak = peak_rank * grid.world_size;
  if (talk) {
    std::printf("moetune train: %zu documents from %s, %lld rows/epoch, seq_len %d\n", n_docs,
                rc.data.train_path.c_str(), static_cast<long long>(loader.rows_per_epoch()), rc.data.seq_len);
    if (tokenizer) std::printf("tokenizer: %s (carried in every checkpoint)\n", tokenizer->describe().c_str());
    if (loader.split_documents() > 0)
      std::printf("data.overlong split: %lld documents longer than seq_len cut into %lld units\n",
                  static_cast<long long>(loader.split_documents()), static_cast<long long>(loader.num_units()));
    std::printf("model: %d layers (%d MoE), d=%d, E=%d, K=%d, %zu parameters, %s precision\n",
                cfg.num_hidden_layers, cfg.num_moe_layers(), cfg.d(), cfg.E(), cfg.K(),
                ParamLayout::build(cfg).total(), rc.train.precision.c_str());
    std::printf("grid: %s, %d threads per rank; global batch %d micro-batches x %d rows; ZeRO stage %d, "
                "optimizer %s, optimizer state %.1f MiB on rank 0\n",
                grid.describe().c_str(), threads, M, rc.train.micro_batch_size, trainer.zero_stage(),
                rc.optim.name.c_str(), double(trainer.optimizer_state_bytes()) / (1 << 20));
    std::printf("MFU denominator: %.1f GFLOP/s = %d ranks x %.1f (%s, %s); %.3f MFLOP per token\n", peak / 1e9,
                grid.world_size, peak_rank / 1e9, opt.peak_gflops > 0 ? "given by --peak-gflops" : "measured FMA probe",
                cpu_model_name().c_str(), flops_tok / 1e6);
    std::fflush(stdout);
  }

  std::ofstream metrics;
  int64_t skipped_before = 0;  // steps skipped before the checkpoint we resume from
  if (root) {
    metrics = open_metrics(opt.out_dir, start_step, &skipped_before);
    if (talk && start_step > 1)
      std::printf("resuming from %s at step %lld (loaded in %.3f s, manifest verified)\n", resume_dir.c_str(),
                  static_cast<long long>(start_step), resume_load_s);
  }

  TrainSummary sum;
  sum.peak_flops = peak;
  sum.final_checkpoint = resume_dir;
  std::vector<double> tps;
  int64_t consecutive_skips = 0;
  for (int64_t step = start_step; step <= rc.train.steps; ++step) {
    auto batch = loader.next_global_batch(rc.train.micro_batch_size, M);
    const double lr = lr_at(sched, step);
    trainer.stats = dist::ParallelStats{};
    // Fault injection (tests): a non-finite gradient on this rank for this step only.
    const bool poison = dist::fault_requested("nan", step, grid.world_rank);
    const size_t poison_at = model.layout().offset("model.norm.weight");
    const T poison_saved = model.params()[poison_at];
    if (poison) model.params()[poison_at] = std::numeric_limits<T>::quiet_NaN();
    const auto t0 = std::chrono::steady_clock::now();
    StepResult r = trainer.step(batch, lr, rc.optim.max_grad_norm);
    if (poison) model.params()[poison_at] = poison_saved;
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double tok_s = double(r.tokens) / dt;
    const double mfu = flops_tok * tok_s / peak;
    if (step > 1 || rc.train.steps == 1) tps.push_back(tok_s);
    if (r.skipped) {
      ++sum.skipped_steps;
      if (talk)
        std::printf("step %lld: loss %g, grad norm %g: not finite, update skipped (%lld skipped so far)\n",
                    static_cast<long long>(step), r.loss, r.grad_norm, static_cast<long long>(sum.skipped_steps));
      if (++consecutive_skips >= rc.train.max_consecutive_skips)
        throw Error("step " + std::to_string(step) + ": " + std::to_string(consecutive_skips) +
                    " consecutive non-finite steps (train.max_consecutive_skips); stopping. The last good "
                    "checkpoint is " + (sum.final_checkpoint.empty() ? std::string("(none written)") : sum.final_checkpoint));
    } else {
      consecutive_skips = 0;
    }
    if (step == start_step) sum.first_loss = r.loss;
    sum.last_loss = r.loss;
    sum.steps = step;

    // Load imbalance over experts (max/mean per MoE layer) and over EP ranks (tokens
    // each rank's experts receive).
    json load = json::array();
    double worst = 0, worst_rank = 0;
    for (size_t j = 0; j < r.expert_counts.size(); ++j) {
      const auto& c = r.expert_counts[j];
      double mean = 0, mx = 0;
      for (auto v : c) {
        mean += double(v);
        mx = std::max(mx, double(v));
      }
      mean /= double(c.size());
      std::vector<double> per_rank(grid.ep, 0.0);
      for (size_t e = 0; e < c.size(); ++e) per_rank[e / (c.size() / grid.ep)] += double(c[e]);
      const double rmean = mean * double(c.size()) / grid.ep;
      const double rmax = *std::max_element(per_rank.begin(), per_rank.end());
      const double ratio = mean > 0 ? mx / mean : 0, rratio = rmean > 0 ? rmax / rmean : 0;
      worst = std::max(worst, ratio);
      worst_rank = std::max(worst_rank, rratio);
      const int ml = cfg.moe_layer(int(j));  // the MTP block's MoE layer is logged as "mtp.0"
      load.push_back({{"layer", ml == ModelConfig::kMtpLayer ? json("mtp.0") : json(ml)}, {"max", mx}, {"mean", mean},
                      {"max_over_mean", ratio}, {"rank_max_over_mean", rratio}});
    }
    // Communication: this rank's numbers, maximum over ranks for the time.
    std::vector<double> comm = {trainer.stats.exchange.dispatch_s, trainer.stats.exchange.combine_s,
                                trainer.stats.reduce_s};
    grid.world.allreduce_max(std::span<double>(comm));
    std::vector<int64_t> bytes = {trainer.stats.exchange.dispatch_bytes, trainer.stats.exchange.combine_bytes,
                                  trainer.stats.reduce_bytes};
    grid.world.allreduce_sum(std::span<int64_t>(bytes));
    double valid_loss = std::numeric_limits<double>::quiet_NaN();
    if (!valid.empty() && ((rc.train.eval_every > 0 && step % rc.train.eval_every == 0) || step == rc.train.steps))
      valid_loss = trainer.evaluate(valid);
    if (root) {
      json m = {{"step", step},
                {"loss", r.loss},
                {"aux_loss", r.aux_loss},
                {"seq_aux_loss", r.seq_aux_loss},
                {"z_loss", r.z_loss},
                {"mtp_loss", r.mtp_loss},
                {"lr", lr},
                {"grad_norm", r.grad_norm},
                {"clip_coef", r.clip_coef},
                {"tokens", r.tokens},
                {"targets", r.n_targets},
                {"step_time_s", dt},
                {"tokens_per_s", tok_s},
                {"mfu", mfu},
                {"dropped_pairs", r.dropped_pairs},
                {"skipped", r.skipped},
                {"skipped_total", skipped_before + sum.skipped_steps},
                {"dispatch_s", comm[0]},
                {"combine_s", comm[1]},
                {"grad_reduce_s", comm[2]},
                {"dispatch_bytes", bytes[0]},
                {"combine_bytes", bytes[1]},
                {"grad_reduce_bytes", bytes[2]},
                {"expert_load", load}};
      if (!std::isnan(valid_loss)) m["valid_loss"] = valid_loss;
      metrics << m.dump() << "\n";
      metrics.flush();
    }
    if (talk && (step % rc.train.log_every == 0 || step == 1 || step == rc.train.steps)) {
      char mtp[48] = "";  // the MTP loss (MODEL.md section 12), only with an MTP block
      if (cfg.mtp()) std::snprintf(mtp, sizeof mtp, " | mtp %.4f", r.mtp_loss);
      std::printf("step %5lld/%lld | loss %.4f | aux %.2e seq %.2e z %.2e%s | lr %.2e | gnorm %.3f | %.0f tok/s | "
                  "MFU %.2f%% | load max/mean %.2f (ranks %.2f) | a2a %.0f ms%s\n",
                  static_cast<long long>(step), static_cast<long long>(rc.train.steps), r.loss, r.aux_loss,
                  r.seq_aux_loss, r.z_loss, mtp, lr, r.grad_norm, tok_s, 100 * mfu, worst, worst_rank,
                  1e3 * (comm[0] + comm[1]), r.skipped ? " | SKIPPED (non-finite)" : "");
    }
    // The validation loss is printed whenever it is computed, logged step or not.
    if (talk && !std::isnan(valid_loss))
      std::printf("step %5lld | valid loss %.4f\n", static_cast<long long>(step), valid_loss);
    if (talk) std::fflush(stdout);
    dist::maybe_inject_fault("after-step", step, grid.world_rank);
    const bool last = step == rc.train.steps;
    if ((rc.train.save_every > 0 && step % rc.train.save_every == 0) || last) {
      const std::string dir = step_dir(opt.out_dir, step);
      json state = {{"step", step},
                    {"lr", lr},
                    {"loss", r.loss},
                    {"schedule", {{"kind", sched.kind}, {"lr", sched.lr}, {"warmup_steps", sched.warmup_steps},
                                  {"total_steps", sched.total_steps}, {"min_lr_ratio", sched.min_lr_ratio}}},
                    {"data", {{"epoch", loader.state().epoch}, {"row", loader.state().row}}},
                    {"seed", rc.train.seed},
                    {"layout", {{"world_size", grid.world_size}, {"ep", grid.ep}}},
                    {"run_config", rc.to_json()}};
      const auto ts = std::chrono::steady_clock::now();
      std::vector<T> m, v;
      trainer.gather_optimizer_state(m, v);
      dist::save_checkpoint_parallel(dir, grid, cfg, model.layout(), model.params(), model.expert_bias(), &m, &v,
                                     trainer.optimizer().step_count(), state, tokenizer ? tokenizer->json() : "",
                                     &model.tid2eid(), rc.optim.name);
      const double save_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - ts).count();
      sum.final_checkpoint = dir;
      if (talk) {
        uintmax_t bytes = 0;
        for (const auto& e : fs::directory_iterator(dir))
          if (e.is_regular_file()) bytes += e.file_size();
        std::printf("saved checkpoint %s (%.1f MiB in %.3f s, %.0f MiB/s, checksums included)\n", dir.c_str(),
                    double(bytes) / (1 << 20), save_s, double(bytes) / (1 << 20) / save_s);
      }
      if (root && rc.train.keep_checkpoints > 0) prune_checkpoints(opt.out_dir, rc.train.keep_checkpoints);
    }
  }
  sum.tokens_per_s = median(tps);
  sum.mfu = flops_tok * sum.tokens_per_s / peak;
  if (talk)
    std::printf("done: %lld steps, loss %.4f -> %.4f, median %.0f tok/s, MFU %.2f%%, %lld skipped steps\n",
                static_cast<long long>(sum.steps), sum.first_loss, sum.last_loss, sum.tokens_per_s, 100 * sum.mfu,
                static_cast<long long>(sum.skipped_steps));
  return sum;
}

}  // namespace

int apply_threads(const RunConfig& rc) {
  const int threads = rc.train.threads > 0 ? rc.train.threads : omp_get_max_threads();
  omp_set_num_threads(threads);
  return threads;
}

template <class T>
std::unique_ptr<dist::ParallelTrainer<T>> make_trainer(const ModelConfig& cfg, dist::ProcessGrid& grid,
                                                       const RunConfig& rc) {
  auto t = std::make_unique<dist::ParallelTrainer<T>>(
      cfg, grid, rc.optimizer_config(), rc.parallel.zero_stage,
      dist::parse_reduction(rc.parallel.reduction, "parallel.reduction"));
  t->set_overlap_a2a(rc.parallel.overlap_a2a);
  return t;
}
template std::unique_ptr<dist::ParallelTrainer<float>> make_trainer(const ModelConfig&, dist::ProcessGrid&,
                                                                    const RunConfig&);
template std::unique_ptr<dist::ParallelTrainer<double>> make_trainer(const ModelConfig&, dist::ProcessGrid&,
                                                                     const RunConfig&);

int global_micro_batches(const RunConfig& rc, int ranks) {
  const int M = rc.train.micro_batches(ranks);
  if (M < ranks)
    throw Error("key 'train.global_batch_size': the global batch has " + std::to_string(M) +
                " micro-batches but there are " + std::to_string(ranks) +
                " ranks; every rank needs at least one micro-batch");
  if (M % ranks != 0)
    throw Error("key 'train.global_batch_size': " + std::to_string(M) + " micro-batches cannot be shared equally by " +
                std::to_string(ranks) + " ranks");
  return M;
}

std::string step_dir(const std::string& out, int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step-%08lld", static_cast<long long>(step));
  return (fs::path(out) / buf).string();
}

// Step checkpoint directories of out_dir, newest first.
std::vector<fs::path> step_dirs(const std::string& out) {
  std::vector<fs::path> v;
  if (!fs::is_directory(out)) return v;
  for (const auto& e : fs::directory_iterator(out)) {
    const std::string n = e.path().filename().string();
    if (e.is_directory() && n.size() == 13 && n.rfind("step-", 0) == 0 &&
        n.find_first_not_of("0123456789", 5) == std::string::npos)
      v.push_back(e.path());
  }
  std::sort(v.rbegin(), v.rend());
  return v;
}

void prune_checkpoints(const std::string& out, int keep) {
  const auto dirs = step_dirs(out);
  std::error_code ec;
  for (size_t i = size_t(keep); i < dirs.size(); ++i) fs::remove_all(dirs[i], ec);
}

// The run's tokenizer (docs/tokenizer.md): data.tokenizer when set, else the one of the
// checkpoint the run starts from, else the byte tokenizer when the data needs one (SFT
// text, token files); none for pre-tokenized JSONL without either. `start` is the
// checkpoint directory the run starts from ("" for none).
std::optional<Tokenizer> resolve_tokenizer(const RunConfig& rc, const std::string& start) {
  const std::string carried = start.empty() ? std::string() : (fs::path(start) / "tokenizer.json").string();
  std::optional<Tokenizer> from_ckpt;
  if (!carried.empty() && fs::exists(carried)) from_ckpt = Tokenizer::load(carried);
  std::optional<Tokenizer> t;
  if (!rc.data.tokenizer.empty()) {
    t = Tokenizer::from_spec(rc.data.tokenizer);
    if (from_ckpt && from_ckpt->sha256_hex() != t->sha256_hex())
      throw Error("key 'data.tokenizer': " + rc.data.tokenizer + " (sha256 " + t->sha256_hex().substr(0, 12) +
                  ") is not the tokenizer of the checkpoint " + start + " (" + carried + ", sha256 " +
                  from_ckpt->sha256_hex().substr(0, 12) +
                  "); a model goes on with the tokenizer it was trained with (leave data.tokenizer unset to use it)");
  } else if (from_ckpt) {
    t = std::move(from_ckpt);
  } else if (rc.data.format == "sft" || rc.data.format == "bin") {
    t = Tokenizer::byte_level();
  }
  if (t && t->vocab_size() > rc.model.vocab_size)
    throw Error("key 'model.vocab_size': the tokenizer (" + t->describe() + ") has " +
                std::to_string(t->vocab_size()) + " tokens, more than model.vocab_size = " +
                std::to_string(rc.model.vocab_size));
  return t;
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}


void remove_incomplete_checkpoints(const std::string& out) {
  if (!fs::is_directory(out)) return;
  for (const auto& e : fs::directory_iterator(out)) {
    const std::string n = e.path().filename().string();
    if (e.is_directory() && n.rfind("step-", 0) == 0 && n.find(".tmp-") != std::string::npos) {
      std::error_code ec;
      fs::remove_all(e.path(), ec);
    }
  }
}

std::ofstream open_metrics(const std::string& out, int64_t start_step, int64_t* skipped_before) {
  const fs::path mpath = fs::path(out) / "metrics.jsonl";
  std::string kept;  // when resuming: the lines of the steps before the checkpoint
  int64_t skipped = 0;
  if (start_step > 1) {
    std::ifstream old(mpath);
    std::string line;
    while (std::getline(old, line)) {
      const json j = json::parse(line, nullptr, false);
      if (j.is_discarded() || !j.is_object() || !j.contains("step") || !j["step"].is_number_integer() ||
          j["step"].get<int64_t>() >= start_step)
        continue;  // a torn or foreign line, or a step the resumed run writes again
      kept += line + "\n";
      if (j.contains("skipped") && j["skipped"].is_boolean() && j["skipped"].get<bool>()) ++skipped;
    }
    // Through a temporary file and a rename: a full disk here leaves the old file whole.
    fsutil::write_file_atomic(mpath.string(), kept);
  }
  if (skipped_before) *skipped_before = skipped;
  std::ofstream metrics(mpath, start_step > 1 ? std::ios::app : std::ios::trunc);
  if (!metrics) throw Error(mpath.string() + ": cannot open for writing");
  return metrics;
}

std::string find_latest_valid_checkpoint(const std::string& out_dir,
                                         const std::function<void(const std::string&)>& warn) {
  for (const auto& d : step_dirs(out_dir)) {
    try {
      verify_manifest(d.string());
      return d.string();
    } catch (const std::exception& e) {
      warn("skipping checkpoint " + d.string() + ": " + e.what());
    }
  }
  return "";
}

namespace {

// trainer_state_count, and below INT64_MAX: the resumed run computes step + 1.
int64_t resume_count(const json& state, const std::string& dir, const std::string& key) {
  const int64_t v = trainer_state_count(state, dir, key);
  if (v == std::numeric_limits<int64_t>::max())
    throw Error((fs::path(dir) / "trainer_state.json").string() + ": key '" + key + "': " + std::to_string(v) +
                " is too large");
  return v;
}

}  // namespace

TrainResumeState read_train_resume_state(const std::string& dir) {
  const json state = load_trainer_state(dir);
  if (!state.contains("step") || !state.contains("data"))
    throw Error((fs::path(dir) / "trainer_state.json").string() + ": needs \"step\" and \"data\" to resume");
  TrainResumeState r;
  r.step = resume_count(state, dir, "step");
  r.epoch = resume_count(state, dir, "data.epoch");
  r.row = resume_count(state, dir, "data.row");
  return r;
}

RlResumeState read_rl_resume_state(const std::string& dir) {
  const json state = load_trainer_state(dir);
  if (!state.contains("step") || !state.contains("rl"))
    throw Error((fs::path(dir) / "trainer_state.json").string() + ": not an RL checkpoint (needs \"step\" and \"rl\")");
  RlResumeState r;
  r.step = resume_count(state, dir, "step");
  r.epoch = resume_count(state, dir, "rl.epoch");
  r.pos = resume_count(state, dir, "rl.pos");
  r.reference = trainer_state_string(state, dir, "rl.reference");
  return r;
}

TrainSummary run_training(const RunConfig& rc, const TrainOptions& opt) {
  if (opt.out_dir.empty()) throw Error("train: --out is required");
  if (rc.data.train_path.empty())
    throw Error("key 'data.train': no training data (set it in the run config or with --set data.train=FILE)");
  if (rc.train.precision == "double") return train_impl<double>(rc, opt);
  return train_impl<float>(rc, opt);
}

void write_initial_checkpoint(const ModelConfig& cfg, uint64_t seed, const std::string& out_dir,
                              const std::string& tokenizer_spec) {
  CheckpointWriteOptions wo;
  if (!tokenizer_spec.empty()) {
    const Tokenizer t = Tokenizer::from_spec(tokenizer_spec);
    if (t.vocab_size() > cfg.vocab_size)
      throw Error("key 'model.vocab_size': the tokenizer " + tokenizer_spec + " has " + std::to_string(t.vocab_size()) +
                  " tokens, more than model.vocab_size = " + std::to_string(cfg.vocab_size));
    wo.tokenizer_json = t.json();
  }
  Model<float> model(cfg);
  model.init(seed);
  json state = {{"step", 0}, {"seed", seed}};
  save_checkpoint<float>(out_dir, cfg, model.layout(), model.params(), model.expert_bias(), nullptr, nullptr, 0,
                         state, wo, &model.tid2eid());
}

}  // namespace moetune
