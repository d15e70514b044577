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

#include "io/checkpoint.hpp"
#include "moe/error.hpp"
#include "moe/model.hpp"
#include "optim/adamw.hpp"
#include "optim/schedule.hpp"
#include "train/data.hpp"
#include "train/flops.hpp"
#include "train/step.hpp"

namespace moetune {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

std::string step_dir(const std::string& out, int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step-%08lld", static_cast<long long>(step));
  return (fs::path(out) / buf).string();
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

template <class T>
TrainSummary train_impl(const RunConfig& rc, const TrainOptions& opt) {
  const ModelConfig& cfg = rc.model;
  const int threads = rc.train.threads > 0 ? rc.train.threads : omp_get_max_threads();
  omp_set_num_threads(threads);

  fs::create_directories(opt.out_dir);
  Model<T> model(cfg);
  if (!opt.init_from.empty()) {
    load_model_weights(opt.init_from, cfg, model.layout(), model.params(), model.expert_bias());
  } else {
    model.init(rc.train.seed);
  }
  AdamWConfig ac;
  ac.beta1 = rc.optim.beta1;
  ac.beta2 = rc.optim.beta2;
  ac.eps = rc.optim.eps;
  ac.weight_decay = rc.optim.weight_decay;
  AdamW<T> adamw(model.layout(), ac);
  ScheduleConfig sched;
  sched.kind = rc.optim.schedule;
  sched.lr = rc.optim.lr;
  sched.warmup_steps = rc.optim.warmup_steps;
  sched.total_steps = rc.train.steps;
  sched.min_lr_ratio = rc.optim.min_lr_ratio;
  validate(sched);

  auto docs = read_jsonl_documents(rc.data.train_path, cfg.vocab_size);
  const size_t n_docs = docs.size();
  BatchLoader loader(std::move(docs), rc.data, rc.train.seed);

  const double flops_tok = flops_per_token(cfg, rc.data.seq_len);
  const double peak = opt.peak_gflops > 0 ? opt.peak_gflops * 1e9 : measure_peak_flops(threads);
  if (opt.progress) {
    std::printf("moetune train: %zu documents from %s, %lld rows/epoch, seq_len %d\n", n_docs,
                rc.data.train_path.c_str(), static_cast<long long>(loader.rows_per_epoch()), rc.data.seq_len);
    std::printf("model: %d layers (%d MoE), d=%d, E=%d, K=%d, %zu parameters, %s precision, %d threads\n",
                cfg.num_hidden_layers, cfg.num_moe_layers(), cfg.d(), cfg.E(), cfg.K(), model.layout().total(),
                rc.train.precision.c_str(), threads);
    std::printf("MFU denominator: %.1f GFLOP/s (%s, %s); %.3f MFLOP per token\n", peak / 1e9,
                opt.peak_gflops > 0 ? "given by --peak-gflops" : "measured FMA probe", cpu_model_name().c_str(),
                flops_tok / 1e6);
    std::fflush(stdout);
  }

  std::ofstream metrics(fs::path(opt.out_dir) / "metrics.jsonl", std::ios::trunc);
  if (!metrics) throw Error(opt.out_dir + "/metrics.jsonl: cannot open for writing");

  TrainSummary sum;
  sum.peak_flops = peak;
  std::vector<double> tps;
  int64_t consecutive_skips = 0;
  for (int64_t step = 1; step <= rc.train.steps; ++step) {
    auto batch = loader.next_global_batch(rc.train.micro_batch_size, rc.train.grad_accum_steps);
    const double lr = lr_at(sched, step);
    const auto t0 = std::chrono::steady_clock::now();
    StepResult r = train_step(model, adamw, batch, lr, rc.optim.max_grad_norm);
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double tok_s = double(r.tokens) / dt;
    const double mfu = flops_tok * tok_s / peak;
    if (step > 1 || rc.train.steps == 1) tps.push_back(tok_s);
    if (r.skipped) {
      ++sum.skipped_steps;
      if (++consecutive_skips >= 10)
        throw Error("step " + std::to_string(step) + ": 10 consecutive non-finite steps; stopping (loss " +
                    std::to_string(r.loss) + ", grad norm " + std::to_string(r.grad_norm) + ")");
    } else {
      consecutive_skips = 0;
    }
    if (step == 1) sum.first_loss = r.loss;
    sum.last_loss = r.loss;
    sum.steps = step;

    json load = json::array();
    double worst = 0;
    for (size_t j = 0; j < r.expert_counts.size(); ++j) {
      const auto& c = r.expert_counts[j];
      double mean = 0, mx = 0;
      for (auto v : c) {
        mean += double(v);
        mx = std::max(mx, double(v));
      }
      mean /= double(c.size());
      const double ratio = mean > 0 ? mx / mean : 0;
      worst = std::max(worst, ratio);
      load.push_back({{"layer", cfg.first_k_dense_replace + int(j)}, {"max", mx}, {"mean", mean},
                      {"max_over_mean", ratio}});
    }
    json m = {{"step", step},
              {"loss", r.loss},
              {"aux_loss", r.aux_loss},
              {"seq_aux_loss", r.seq_aux_loss},
              {"z_loss", r.z_loss},
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
              {"expert_load", load}};
    metrics << m.dump() << "\n";
    metrics.flush();
    if (opt.progress && (step % rc.train.log_every == 0 || step == 1 || step == rc.train.steps)) {
      std::printf("step %5lld/%lld | loss %.4f | aux %.2e seq %.2e z %.2e | lr %.2e | gnorm %.3f | %.0f tok/s | "
                  "MFU %.2f%% | load max/mean %.2f%s\n",
                  static_cast<long long>(step), static_cast<long long>(rc.train.steps), r.loss, r.aux_loss,
                  r.seq_aux_loss, r.z_loss, lr, r.grad_norm, tok_s, 100 * mfu, worst,
                  r.skipped ? " | SKIPPED (non-finite)" : "");
      std::fflush(stdout);
    }
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
                    {"run_config", rc.to_json()}};
      save_checkpoint(dir, cfg, model.layout(), model.params(), model.expert_bias(), &adamw.exp_avg(),
                      &adamw.exp_avg_sq(), adamw.step_count(), state);
      sum.final_checkpoint = dir;
      if (opt.progress) std::printf("saved checkpoint %s\n", dir.c_str());
    }
  }
  sum.tokens_per_s = median(tps);
  sum.mfu = flops_tok * sum.tokens_per_s / peak;
  if (opt.progress)
    std::printf("done: %lld steps, loss %.4f -> %.4f, median %.0f tok/s, MFU %.2f%%, %lld skipped steps\n",
                static_cast<long long>(sum.steps), sum.first_loss, sum.last_loss, sum.tokens_per_s, 100 * sum.mfu,
                static_cast<long long>(sum.skipped_steps));
  return sum;
}

}  // namespace

TrainSummary run_training(const RunConfig& rc, const TrainOptions& opt) {
  if (opt.out_dir.empty()) throw Error("train: --out is required");
  if (rc.train.precision == "double") return train_impl<double>(rc, opt);
  return train_impl<float>(rc, opt);
}

void write_initial_checkpoint(const ModelConfig& cfg, uint64_t seed, const std::string& out_dir) {
  Model<float> model(cfg);
  model.init(seed);
  json state = {{"step", 0}, {"seed", seed}};
  save_checkpoint<float>(out_dir, cfg, model.layout(), model.params(), model.expert_bias(), nullptr, nullptr, 0,
                         state);
}

}  // namespace moetune
