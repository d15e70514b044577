// `moetune bench`: the training step of `moetune train` (dist::ParallelTrainer::step),
// timed per phase. See train/bench.hpp and bench/README.md.
#include "train/bench.hpp"

#include <omp.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>

#include "dist/collective.hpp"
#include "dist/int128.hpp"
#include "dist/parallel_trainer.hpp"
#include "io/checkpoint.hpp"
#include "kernels/gemm.hpp"
#include "moe/error.hpp"
#include "moe/profile.hpp"
#include "train/data.hpp"
#include "train/flops.hpp"
#include "train/synthetic.hpp"
#include "train/trainer.hpp"

namespace moetune {
using json = nlohmann::json;

namespace {

double mib(double bytes) { return bytes / double(1 << 20); }

// Peak resident set of this process (getrusage; Linux reports KiB).
int64_t peak_rss_bytes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return int64_t(u.ru_maxrss) * 1024;
}

template <class T>
json bench_impl(const RunConfig& rc, const BenchOptions& opt) {
  const ModelConfig& cfg = rc.model;
  const int threads = apply_threads(rc);
  dist::Comm world = dist::Comm::world();
  std::optional<dist::ProcessGrid> grid_holder;
  std::unique_ptr<dist::ParallelTrainer<T>> trainer_holder;
  std::unique_ptr<BatchLoader> loader;
  int M = 0;
  dist::run_collectively(world, [&] {
    if (opt.steps <= 0) throw Error("bench: --steps must be > 0, got " + std::to_string(opt.steps));
    if (opt.warmup < 0) throw Error("bench: --warmup must be >= 0, got " + std::to_string(opt.warmup));
    grid_holder.emplace(dist::ProcessGrid::create(world, rc.parallel.ep, cfg));
  });
  dist::ProcessGrid& grid = *grid_holder;
  dist::run_collectively(world, [&] {
    M = global_micro_batches(rc, grid.world_size);
    trainer_holder = make_trainer<T>(cfg, grid, rc);
    auto& m = trainer_holder->model();
    if (!opt.init_from.empty())
      load_model_weights(opt.init_from, cfg, m.layout(), m.params(), m.expert_bias(), &m.tid2eid());
    else
      m.init(rc.train.seed);
    // Synthetic documents (as `moetune gen-data` writes), enough for every step without
    // a second epoch: lengths 8..48, about 28 tokens each.
    const int64_t tokens = int64_t(opt.warmup + opt.steps) * M * rc.train.micro_batch_size * rc.data.seq_len;
    const int docs = int(std::min<int64_t>(std::max<int64_t>(tokens / 20 + 16, 64), 1 << 22));
    DataConfig dc = rc.data;
    dc.format = "tokens";
    dc.train_path = "synthetic";
    dc.overlong = "truncate";
    loader = std::make_unique<BatchLoader>(
        synthetic_documents(docs, std::max(cfg.vocab_size, 4), 8, 48, rc.train.seed), dc, rc.train.seed);
  });
  dist::ParallelTrainer<T>& trainer = *trainer_holder;
  const bool root = grid.world_rank == 0;

  const double flops_tok = flops_per_token(cfg, rc.data.seq_len);
  // The FMA probe of train/flops.hpp on every rank at once (each with its threads):
  // the peak of the cores the job uses is the sum. (`moetune train` probes on rank 0
  // only and multiplies; there the other ranks busy-poll in MPI meanwhile, which can
  // take cores the probe needs.)
  grid.world.barrier();
  const double peak_mine = measure_peak_flops(threads);
  std::vector<double> peak_ranks(size_t(grid.world_size));
  grid.world.allgather(std::span<const double>(&peak_mine, 1), std::span<double>(peak_ranks));
  double peak = 0;
  for (double v : peak_ranks) peak += v;
  const double peak_rank = peak_ranks[0];
  const double vendor = opt.peak_gflops > 0 ? opt.peak_gflops * 1e9 * grid.world_size : 0.0;

  // Per timed step: wall seconds (max over ranks), this rank's phases, exchanges.
  std::vector<double> step_s, tok_s;
  std::vector<std::array<double, profile::kPhases>> phases;
  std::vector<double> other_s, phases_sum_s;  // this rank's, per timed step
  std::vector<double> a2a_dispatch_s, a2a_combine_s, a2a_overlap_s, reduce_s;
  std::vector<double> a2a_dispatch_b, a2a_combine_b, reduce_b;
  int64_t tokens_per_step = 0, skipped = 0;
  double first_loss = 0, last_loss = 0;
  for (int i = 0; i < opt.warmup + opt.steps; ++i) {
    auto batch = loader->next_global_batch(rc.train.micro_batch_size, M);
    trainer.stats = dist::ParallelStats{};
    profile::PhaseTimes pt;
    grid.world.barrier();  // every rank starts the step together
    const auto t0 = std::chrono::steady_clock::now();
    StepResult r;
    {
      profile::Activate on(pt);
      r = trainer.step(batch, rc.optim.lr, rc.optim.max_grad_norm);
    }
    double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double own_dt = dt;
    grid.world.allreduce_max(std::span<double>(&dt, 1));
    std::vector<double> comm = {trainer.stats.exchange.dispatch_s, trainer.stats.exchange.combine_s,
                                trainer.stats.reduce_s, trainer.stats.exchange.overlap_s};
    grid.world.allreduce_max(std::span<double>(comm));
    std::vector<int64_t> bytes = {trainer.stats.exchange.dispatch_bytes, trainer.stats.exchange.combine_bytes,
                                  trainer.stats.reduce_bytes};
    grid.world.allreduce_sum(std::span<int64_t>(bytes));
    if (i == 0) first_loss = r.loss;
    last_loss = r.loss;
    if (i < opt.warmup) continue;
    skipped += r.skipped ? 1 : 0;
    tokens_per_step = r.tokens;
    step_s.push_back(dt);
    tok_s.push_back(double(r.tokens) / dt);
    phases.push_back(pt.seconds);
    other_s.push_back(std::max(0.0, own_dt - pt.total()));
    phases_sum_s.push_back(pt.total());
    a2a_dispatch_s.push_back(comm[0]);
    a2a_combine_s.push_back(comm[1]);
    reduce_s.push_back(comm[2]);
    a2a_overlap_s.push_back(comm[3]);
    a2a_dispatch_b.push_back(double(bytes[0]));
    a2a_combine_b.push_back(double(bytes[1]));
    reduce_b.push_back(double(bytes[2]));
  }

  // This rank's median per phase; every rank's, gathered.
  const int W = grid.world_size;
  constexpr int kCols = profile::kPhases + 2;  // phases, other, own step seconds
  std::vector<double> mine(kCols);
  for (int p = 0; p < profile::kPhases; ++p) {
    std::vector<double> v;
    for (const auto& s : phases) v.push_back(s[size_t(p)]);
    mine[size_t(p)] = median(v);
  }
  mine[profile::kPhases] = median(other_s);
  mine[profile::kPhases + 1] = peak_rss_bytes();
  std::vector<double> all(size_t(W) * kCols);
  grid.world.allgather(std::span<const double>(mine), std::span<double>(all));

  const double step_med = median(step_s), tps = median(tok_s);
  json res;
  res["command"] = "moetune bench";
  res["config"] = rc.to_json();
  res["layout"] = {{"world_size", W}, {"ep", grid.ep}, {"edp", W / grid.ep}, {"zero_stage", trainer.zero_stage()},
                   {"reduction", rc.parallel.reduction}};
  res["threads"] = threads;
  res["precision"] = rc.train.precision;
  res["isa"] = kernels::isa_name(kernels::gemm_isa());
  res["cpu"] = cpu_model_name();
  res["init_from"] = opt.init_from;  // "" = a fresh init from train.seed
  res["warmup_steps"] = opt.warmup;
  res["timed_steps"] = opt.steps;
  res["skipped_steps"] = skipped;
  res["micro_batches"] = M;
  res["micro_batch_size"] = rc.train.micro_batch_size;
  res["seq_len"] = rc.data.seq_len;
  res["tokens_per_step"] = tokens_per_step;
  res["step_s"] = step_med;
  res["step_s_all"] = step_s;
  res["tokens_per_s"] = tps;
  res["flops_per_token"] = flops_tok;
  res["peak_flops_measured"] = peak;
  res["peak_flops_per_rank_measured"] = peak_rank;
  res["peak_flops_ranks_measured"] = peak_ranks;
  res["peak_probe"] = peak_probe_isa();
  res["mfu"] = mfu(flops_tok, tps, peak);
  if (vendor > 0) {
    res["peak_flops_vendor"] = vendor;
    res["mfu_vendor"] = mfu(flops_tok, tps, vendor);
  }
  res["first_loss"] = first_loss;
  res["last_loss"] = last_loss;
  // The breakdown of rank 0 (seconds per step, median over the timed steps).
  json ph = json::object();
  double sum = 0;
  for (int p = 0; p < profile::kPhases; ++p) {
    const double s = all[size_t(p)];
    sum += s;
    ph[profile::phase_name(profile::Phase(p))] = {{"s", s}, {"pct", step_med > 0 ? 100 * s / step_med : 0}};
  }
  res["phases"] = ph;
  res["phases_sum_s"] = sum;
  // Per timed step, the sum of rank 0's phases: disjoint intervals inside the step, so
  // each is at most that step's seconds (the medians above need not add up that way).
  res["phases_sum_s_all"] = phases_sum_s;
  res["other_s"] = all[profile::kPhases];
  json per_rank = json::array();
  const size_t total = trainer.model().layout().total();
  for (int q = 0; q < W; ++q) {
    const double* row = all.data() + size_t(q) * kCols;
    json pr = {{"rank", q}};
    json pp = json::object();
    for (int p = 0; p < profile::kPhases; ++p) pp[profile::phase_name(profile::Phase(p))] = row[p];
    pr["phases_s"] = pp;
    pr["other_s"] = row[profile::kPhases];
    pr["peak_rss_bytes"] = int64_t(row[profile::kPhases + 1]);
    per_rank.push_back(pr);
  }
  res["per_rank"] = per_rank;
  res["all_to_all"] = {{"dispatch_bytes", median(a2a_dispatch_b)}, {"combine_bytes", median(a2a_combine_b)},
                       {"dispatch_s", median(a2a_dispatch_s)}, {"combine_s", median(a2a_combine_s)},
                       {"overlap", rc.parallel.overlap_a2a}, {"overlap_s", median(a2a_overlap_s)},
                       {"note", "per step, bytes sent to other ranks summed over ranks, seconds max over ranks "
                                "(forward + backward); dispatch_s and combine_s are the exchanges' own time (posting "
                                "and waiting), overlap_s the layers' work that ran while one was in flight"}};
  res["grad_reduce"] = {{"bytes", median(reduce_b)}, {"s", median(reduce_s)}};
  // Rank 0's buffers (the same sizes on every rank of a layout with ep = 1).
  res["memory_rank0"] = {{"peak_rss_bytes", int64_t(all[profile::kPhases + 1])},
                         {"param_bytes", int64_t(total * sizeof(T))},
                         {"grad_bytes", int64_t(total * sizeof(T))},
                         {"optimizer_bytes", trainer.optimizer_state_bytes()},
                         {"activation_bytes", trainer.model().activation_bytes()},
                         {"grad_accumulator_bytes", trainer.accumulator_bytes()}};
  if (root && !opt.json_path.empty()) {
    std::ofstream out(opt.json_path);
    out << res.dump(2) << "\n";
    if (!out) throw Error(opt.json_path + ": cannot write (--json)");
  }
  if (root && opt.table) {
    std::fputs(format_bench_table(res).c_str(), stdout);
    std::fflush(stdout);
  }
  return res;
}

}  // namespace

json run_bench(const RunConfig& rc, const BenchOptions& opt) {
  if (rc.train.precision == "double") return bench_impl<double>(rc, opt);
  return bench_impl<float>(rc, opt);
}

std::string format_bench_table(const json& r) {
  std::string out;
  char buf[512];
  const auto& L = r["layout"];
  const double step = r["step_s"].get<double>();
  std::snprintf(buf, sizeof buf,
                "moetune bench: W=%d ep=%d (ZeRO %d, %s reduction), %d threads per rank, %s, GEMM %s, %s\n"
                "global batch %d micro-batches x %d rows x %d = %lld tokens per step; %d warm-up + %d timed steps "
                "(medians)\n\n",
                L["world_size"].get<int>(), L["ep"].get<int>(), L["zero_stage"].get<int>(),
                L["reduction"].get<std::string>().c_str(), r["threads"].get<int>(),
                r["precision"].get<std::string>().c_str(), r["isa"].get<std::string>().c_str(),
                r["cpu"].get<std::string>().c_str(), r["micro_batches"].get<int>(),
                r["micro_batch_size"].get<int>(), r["seq_len"].get<int>(),
                static_cast<long long>(r["tokens_per_step"].get<int64_t>()), r["warmup_steps"].get<int>(),
                r["timed_steps"].get<int>());
  out += buf;
  out += "| phase (rank 0) | forward ms | % | backward ms | % |\n|---|---:|---:|---:|---:|\n";
  const auto& ph = r["phases"];
  const auto pct = [&](double s) { return step > 0 ? 100 * s / step : 0.0; };
  const char* pairs[][3] = {{"embedding", "embedding", "embedding_bwd"},
                            {"attention", "attention", "attention_bwd"},
                            {"dense FFN (+ FFN norm)", "dense_ffn", "dense_ffn_bwd"},
                            {"router", "router", "router_bwd"},
                            {"dispatch (all-to-all)", "dispatch", "dispatch_bwd"},
                            {"experts", "experts", "experts_bwd"},
                            {"combine (all-to-all)", "combine", "combine_bwd"},
                            {"shared expert", "shared_expert", "shared_expert_bwd"},
                            {"LM head + loss", "lm_head_loss", "lm_head_loss_bwd"}};
  double fsum = 0, bsum = 0;
  for (const auto& p : pairs) {
    const double f = ph[p[1]]["s"].get<double>(), b = ph[p[2]]["s"].get<double>();
    fsum += f;
    bsum += b;
    std::snprintf(buf, sizeof buf, "| %s | %.2f | %.1f | %.2f | %.1f |\n", p[0], 1e3 * f, pct(f), 1e3 * b, pct(b));
    out += buf;
  }
  std::snprintf(buf, sizeof buf, "| **forward / backward** | %.2f | %.1f | %.2f | %.1f |\n", 1e3 * fsum, pct(fsum),
                1e3 * bsum, pct(bsum));
  out += buf;
  for (const auto& [label, key] : std::vector<std::pair<const char*, const char*>>{
           {"gradient accumulation (zero + fixed-point leaves)", "grad_accum"},
           {"wait for the slowest rank (imbalance)", "rank_wait"},
           {"gradient reduction", "grad_reduce"},
           {"optimizer (+ norm, clip, bias update)", "optimizer"}}) {
    const double s = ph[key]["s"].get<double>();
    std::snprintf(buf, sizeof buf, "| %s | %.2f | %.1f | | |\n", label, 1e3 * s, pct(s));
    out += buf;
  }
  const double other = r["other_s"].get<double>();
  std::snprintf(buf, sizeof buf, "| other (untimed) | %.2f | %.1f | | |\n| **step** | %.2f | 100.0 | | |\n\n",
                1e3 * other, pct(other), 1e3 * step);
  out += buf;
  std::string per;
  for (const auto& v : r["peak_flops_ranks_measured"]) {
    std::snprintf(buf, sizeof buf, "%s%.1f", per.empty() ? "" : " + ", v.get<double>() / 1e9);
    per += buf;
  }
  std::snprintf(buf, sizeof buf,
                "tokens/s %.0f (global) | MFU %.2f%% of %.1f GFLOP/s (FMA probe %s on every rank at once: %s) | %.3f "
                "MFLOP per token\n",
                r["tokens_per_s"].get<double>(), 100 * r["mfu"].get<double>(),
                r["peak_flops_measured"].get<double>() / 1e9, r["peak_probe"].get<std::string>().c_str(), per.c_str(),
                r["flops_per_token"].get<double>() / 1e6);
  out += buf;
  if (r.contains("mfu_vendor")) {
    std::snprintf(buf, sizeof buf, "MFU %.2f%% of the vendor peak %.1f GFLOP/s (--peak-gflops)\n",
                  100 * r["mfu_vendor"].get<double>(), r["peak_flops_vendor"].get<double>() / 1e9);
    out += buf;
  }
  const auto& a = r["all_to_all"];
  std::snprintf(buf, sizeof buf,
                "all-to-all per step: dispatch %.2f MiB %.2f ms, combine %.2f MiB %.2f ms, overlap %s (%.2f ms of work "
                "in flight) | gradient reduction %.2f MiB %.2f ms\n",
                mib(a["dispatch_bytes"].get<double>()), 1e3 * a["dispatch_s"].get<double>(),
                mib(a["combine_bytes"].get<double>()), 1e3 * a["combine_s"].get<double>(),
                a["overlap"].get<bool>() ? "on" : "off", 1e3 * a["overlap_s"].get<double>(),
                mib(r["grad_reduce"]["bytes"].get<double>()), 1e3 * r["grad_reduce"]["s"].get<double>());
  out += buf;
  const auto& m = r["memory_rank0"];
  std::snprintf(buf, sizeof buf,
                "memory rank 0: peak RSS %.1f MiB; parameters %.1f, gradients %.1f, optimizer %.1f, fixed-point "
                "accumulator %.1f, activations %.1f MiB",
                mib(m["peak_rss_bytes"].get<double>()), mib(m["param_bytes"].get<double>()),
                mib(m["grad_bytes"].get<double>()), mib(m["optimizer_bytes"].get<double>()),
                mib(m["grad_accumulator_bytes"].get<double>()), mib(m["activation_bytes"].get<double>()));
  out += buf;
  if (r["per_rank"].size() > 1) {
    out += "; peak RSS per rank";
    for (const auto& pr : r["per_rank"]) {
      std::snprintf(buf, sizeof buf, " %.1f", mib(pr["peak_rss_bytes"].get<double>()));
      out += buf;
    }
    out += " MiB";
  }
  out += "\n";
  if (r["skipped_steps"].get<int64_t>() > 0) out += "warning: some timed steps were non-finite and skipped\n";
  return out;
}

}  // namespace moetune
