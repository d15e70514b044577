// The RL loop (rl_trainer.hpp). Layout invariance, as for training: every rank builds
// the same rollouts (generation is chunked in request order, the draws are counter-
// based), the same rewards (scored once, on rank 0) and the same global batch of
// completion rows; rank r takes its contiguous share of each minibatch's
// micro-batches for pi_old, the reference and the update, and the gradient goes
// through ParallelTrainer's exact fixed-point reduction.
#include "train/rl_trainer.hpp"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <optional>
#include <sstream>

#include "dist/checkpoint_parallel.hpp"
#include "dist/collective.hpp"
#include "dist/fault.hpp"
#include "dist/parallel_trainer.hpp"
#include "io/checkpoint.hpp"
#include "io/manifest.hpp"
#include "moe/error.hpp"
#include "optim/schedule.hpp"
#include "train/flops.hpp"
#include "train/rl_loss.hpp"
#include "train/rollout.hpp"
#include "train/trainer.hpp"

namespace moetune {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

using clock_type = std::chrono::steady_clock;
double since(clock_type::time_point t0) { return std::chrono::duration<double>(clock_type::now() - t0).count(); }

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  std::istringstream in(s);
  while (std::getline(in, cur, ',')) {
    const auto b = cur.find_first_not_of(" \t"), e = cur.find_last_not_of(" \t");
    if (b != std::string::npos) out.push_back(cur.substr(b, e - b + 1));
  }
  return out;
}

RlLossConfig loss_config(const RlConfig& rl) {
  RlLossConfig c;
  c.loss_type = rl.loss_type;
  c.importance_sampling_level = rl.importance_sampling_level;
  c.epsilon = rl.epsilon;
  c.epsilon_high = rl.epsilon_hi();
  c.beta = rl.beta;
  c.temperature = rl.temperature;
  c.max_new_tokens = rl.max_new_tokens;
  return c;
}

// One completion as a training row: prompt + completion, padded to S; labels are the
// completion's tokens (the loss tokens), -100 on the prompt and the padding.
void put_row(MicroBatch& mb, int r, const std::vector<int32_t>& prompt, const Completion& c, bool loss, int32_t pad) {
  const int S = mb.seq_len;
  const int64_t o = int64_t(r) * S;
  const int Lp = int(prompt.size()), n = int(c.tokens.size());
  for (int t = 0; t < S; ++t) {
    int32_t id = pad, label = kIgnoreIndex, doc = 1;
    if (t < Lp) {
      id = prompt[t];
      doc = 0;
    } else if (t < Lp + n) {
      id = c.tokens[t - Lp];
      label = loss ? id : kIgnoreIndex;
      doc = 0;
    }
    mb.input_ids[o + t] = id;
    mb.labels[o + t] = label;
    mb.doc_ids[o + t] = doc;
    mb.padding[o + t] = uint8_t(doc);
  }
}

MicroBatch empty_micro(int rows, int S, int32_t pad) {
  MicroBatch mb;
  mb.rows = rows;
  mb.seq_len = S;
  mb.input_ids.assign(int64_t(rows) * S, pad);
  mb.labels.assign(int64_t(rows) * S, kIgnoreIndex);
  mb.doc_ids.assign(int64_t(rows) * S, 1);
  mb.padding.assign(int64_t(rows) * S, 1);  // padding counts in no routing statistic
  return mb;
}

// What this rank keeps of one of its micro-batches between pi_old and the updates.
struct LocalMicro {
  std::vector<double> lp_old, lp_ref, adv, weight;
  std::vector<int32_t> seq;
  RoutingTrace old_routing;  // the pi_old forward's selection (R2)
  RoutingTrace replay;       // the selection to replay in the update (R3: rollout's where recorded)
};

// Statistics of one RL step, kept per micro-batch of the global batch so that their
// sums are taken in global micro-batch order on every layout: each micro-batch's row
// is filled by the one rank that ran it, the rows are all-reduced (a value plus zeros
// is exact), then added in order.
struct StepStats {
  enum { kKl, kEntropy, kRatio, kTokens, kLow, kHigh, kRouteTokens, kRouteDiff, kLpDiff, kLpTokens, kN };
  std::vector<double> rows;  // (M, kN)
  double ratio_min = std::numeric_limits<double>::infinity(), ratio_max = -std::numeric_limits<double>::infinity();
  double lp_diff_max = 0;
  explicit StepStats(int M) : rows(size_t(M) * kN, 0.0) {}
  double* at(int m) { return rows.data() + size_t(m) * kN; }
  void add_head(int m, const RlHeadStats& s) {
    double* r = at(m);
    r[kKl] += s.kl_sum;
    r[kEntropy] += s.entropy_sum;
    r[kRatio] += s.ratio_sum;
    r[kTokens] += double(s.tokens);
    r[kLow] += double(s.clipped_low);
    r[kHigh] += double(s.clipped_high);
    if (s.tokens > 0) {
      ratio_min = std::min(ratio_min, s.ratio_min);
      ratio_max = std::max(ratio_max, s.ratio_max);
    }
  }
  // Collective: the totals over the global batch, in micro-batch order.
  std::vector<double> reduce(const dist::Comm& world) {
    world.allreduce_sum(std::span<double>(rows));
    std::vector<double> maxs = {lp_diff_max, ratio_max, -ratio_min};
    world.allreduce_max(std::span<double>(maxs));
    lp_diff_max = maxs[0];
    ratio_max = maxs[1];
    ratio_min = -maxs[2];
    std::vector<double> t(kN, 0.0);
    for (size_t m = 0; m < rows.size() / kN; ++m)
      for (int k = 0; k < kN; ++k) t[k] += rows[m * kN + k];
    return t;
  }
};

// The top-K sets of token t in two traces differ (order ignored)?
bool selection_differs(const std::vector<int32_t>& a, int64_t ta, const std::vector<int32_t>& b, int64_t tb, int K) {
  int32_t x[16], y[16];
  for (int k = 0; k < K; ++k) {
    x[k] = a[ta * K + k];
    y[k] = b[tb * K + k];
  }
  std::sort(x, x + K);
  std::sort(y, y + K);
  return !std::equal(x, x + K, y);
}

template <class T>
RlSummary rl_impl(const RunConfig& rc, const RlOptions& opt) {
  const ModelConfig& cfg = rc.model;
  const RlConfig& rl = rc.rl;
  const int threads = apply_threads(rc);
  const RlLossConfig lc = loss_config(rl);
  const int B = rl.prompts_per_step, G = rl.num_generations, C = B * G;
  dist::Comm world = dist::Comm::world();
  // Checks of the options, on every rank: one message, every rank exits.
  dist::run_collectively(world, [&] {
    if (opt.out_dir.empty()) throw Error("rl: --out is required");
    if (opt.prompts.empty()) throw Error("rl: --prompts is required");
    if (opt.init_from.empty() && opt.resume_from.empty() && !opt.auto_resume)
      throw Error("rl: --init-from (the SFT checkpoint to post-train) is required");
    validate(lc);
    validate(SamplingConfig{rl.temperature, rl.top_k, rl.top_p});
    if (rl.scale_rewards == "group" && rl.num_generations < 2)
      throw Error("key 'rl.num_generations': rl.scale_rewards = \"group\" needs groups of at least 2 completions, got " +
                  std::to_string(rl.num_generations));
    if (C % rl.minibatches != 0)
      throw Error("key 'rl.minibatches': " + std::to_string(C) + " completions per step (rl.prompts_per_step x "
                  "rl.num_generations) cannot be cut into " + std::to_string(rl.minibatches) + " equal minibatches");
    if (rl.router_replay != "none" && cfg.num_moe_layers() == 0)
      throw Error("key 'rl.router_replay': the model has no MoE layer to replay");
    if (cfg.K() > 16) throw Error("key 'model.num_experts_per_tok': rl supports K <= 16");
  });
  std::optional<dist::ProcessGrid> grid_holder;
  std::unique_ptr<dist::ParallelTrainer<T>> trainer_holder;
  std::unique_ptr<Model<T>> ref_holder;
  std::unique_ptr<dist::AllToAllExpertStage<T>> ref_stage;
  std::unique_ptr<RewardModel> rewards;
  std::optional<Tokenizer> tokenizer;
  PromptSet prompts, valid;
  std::string resume_dir, reference_dir = opt.init_from;
  int64_t start_step = 1, epoch = 0, pos = 0;
  const ScheduleConfig sched = rc.schedule_config();
  dist::run_collectively(world, [&] { grid_holder.emplace(dist::ProcessGrid::create(world, rc.parallel.ep, cfg)); });
  dist::ProcessGrid& grid = *grid_holder;
  const int W = grid.world_size;
  dist::run_collectively(world, [&] {
    validate(sched);
    if (grid.world_rank == 0) {
      fs::create_directories(opt.out_dir);
      remove_incomplete_checkpoints(opt.out_dir);
    }
    trainer_holder =
        make_trainer<T>(cfg, grid, rc);
    Model<T>& m = trainer_holder->model();
    if (opt.auto_resume && opt.resume_from.empty())
      resume_dir = find_latest_valid_checkpoint(opt.out_dir, [&](const std::string& w) {
        if (grid.world_rank == 0) std::fprintf(stderr, "warning: %s\n", w.c_str());
      });
    else if (!opt.resume_from.empty()) {
      resume_dir = opt.resume_from;
      verify_manifest(resume_dir);
    }
    if (!resume_dir.empty()) {
      load_model_weights(resume_dir, cfg, m.layout(), m.params(), m.expert_bias(), &m.tid2eid());
      std::vector<T> mo, vo;
      int64_t ostep = 0;
      if (!load_optimizer_state(resume_dir, m.layout(), mo, vo, ostep, rc.optim.name))
        throw Error(resume_dir + ": no optimizer state; cannot resume an RL run from it");
      trainer_holder->set_optimizer_state(mo, vo, ostep);
      const RlResumeState rs = read_rl_resume_state(resume_dir);
      start_step = rs.step + 1;
      epoch = rs.epoch;
      pos = rs.pos;
      if (reference_dir.empty()) reference_dir = rs.reference;
    } else {
      if (opt.init_from.empty()) throw Error("rl: --auto-resume found no checkpoint in " + opt.out_dir +
                                             "; give --init-from to start");
      load_model_weights(opt.init_from, cfg, m.layout(), m.params(), m.expert_bias(), &m.tid2eid());
    }
    tokenizer = resolve_tokenizer(rc, !resume_dir.empty() ? resume_dir : opt.init_from);
    if (!tokenizer) tokenizer = Tokenizer::byte_level();
    if (!tokenizer->has_special("<|assistant|>"))
      throw Error("rl: the tokenizer (" + tokenizer->describe() + ") has no chat special tokens");
    // Rewards run on rank 0 only (one reward program per job); the spec is checked everywhere.
    RewardSpec spec = reward_spec_of(rl);
    bool need_answer = false;
    for (const auto& n : spec.names) need_answer = need_answer || reward_needs_answer(n);
    if (grid.world_rank == 0) rewards = std::make_unique<RewardModel>(spec);
    prompts = load_prompts(opt.prompts, *tokenizer, need_answer, rl.max_new_tokens, cfg.max_position_embeddings);
    if (pos > int64_t(prompts.ids.size()))
      throw Error(resume_dir + "/trainer_state.json: key 'rl.pos': " + std::to_string(pos) + " is past the " +
                  std::to_string(prompts.ids.size()) + " prompts of " + opt.prompts +
                  " (was the prompt file changed?)");
    if (!opt.valid_prompts.empty())
      valid = load_prompts(opt.valid_prompts, *tokenizer, need_answer, rl.max_new_tokens,
                           cfg.max_position_embeddings);
    if (rl.beta > 0) {
      if (reference_dir.empty()) throw Error("key 'rl.beta': a KL penalty needs the reference checkpoint (--init-from)");
      ref_holder = std::make_unique<Model<T>>(cfg, grid.expert_begin, grid.expert_end);
      ref_stage = dist::install_expert_stage(grid, *ref_holder);
      load_model_weights(reference_dir, cfg, ref_holder->layout(), ref_holder->params(), ref_holder->expert_bias(),
                         &ref_holder->tid2eid());
    }
  });
  dist::ParallelTrainer<T>& trainer = *trainer_holder;
  Model<T>& model = trainer.model();
  const bool root = grid.world_rank == 0;
  const bool talk = root && opt.progress;
  const int S = prompts.longest + rl.max_new_tokens;  // rows of the update
  const int mbs = rc.train.micro_batch_size;
  const int per_mini = C / rl.minibatches;
  // Micro-batches per minibatch: enough rows for per_mini completions, a multiple of W.
  int Mmb = (per_mini + mbs - 1) / mbs;
  Mmb = (Mmb + W - 1) / W * W;
  const int A = Mmb / W;
  const int32_t pad = tokenizer->has_special("<|pad|>") ? tokenizer->special_id("<|pad|>") : 0;
  // MoE layers that route in RL: the main model's (an MTP block runs in no RL forward, its
  // trace entry stays empty; MODEL.md section 12).
  const int K = cfg.K(), nm = cfg.num_main_moe_layers();
  GenerationConfig gc;
  gc.sampling = SamplingConfig{rl.temperature, rl.top_k, rl.top_p};
  gc.max_new_tokens = rl.max_new_tokens;
  gc.batch_size = rl.generation_batch_size;
  gc.stop_ids = stop_ids(*tokenizer);
  gc.seed = rc.train.seed;
  gc.record_routing = nm > 0;
  const double flops_tok = flops_per_token(cfg, S);
  double peak_rank = opt.peak_gflops > 0 ? opt.peak_gflops * 1e9 : (root ? measure_peak_flops(threads) : 0.0);
  grid.world.broadcast(std::span<double>(&peak_rank, 1), 0);
  const double peak = peak_rank * W;

  if (talk) {
    std::printf("moetune rl: %zu prompts from %s (longest %d tokens)%s\n", prompts.ids.size(), opt.prompts.c_str(),
                prompts.longest,
                valid.ids.empty() ? "" : (", " + std::to_string(valid.ids.size()) + " valid prompts").c_str());
    std::printf("policy: %s (%s); reference: %s\n", resume_dir.empty() ? opt.init_from.c_str() : resume_dir.c_str(),
                tokenizer->describe().c_str(), rl.beta > 0 ? reference_dir.c_str() : "none (rl.beta = 0)");
    std::printf("model: %d layers (%d MoE), d=%d, E=%d, K=%d, %zu parameters, %s precision\n", cfg.num_hidden_layers,
                nm, cfg.d(), cfg.E(), K, ParamLayout::build(cfg).total(), rc.train.precision.c_str());
    std::printf("grid: %s, %d threads per rank; ZeRO stage %d\n", grid.describe().c_str(), threads,
                trainer.zero_stage());
    std::printf("step: %d prompts x %d completions (max %d new tokens, temperature %g, top_k %d, top_p %g); "
                "%d x %d optimizer steps of %d micro-batches x %d rows of %d tokens\n",
                B, G, rl.max_new_tokens, rl.temperature, rl.top_k, rl.top_p, rl.mu, rl.minibatches, Mmb, mbs, S);
    std::printf("objective: loss_type %s, importance sampling %s, clip [1-%g, 1+%g], beta %g, scale_rewards %s, "
                "router_replay %s, reward %s\n",
                rl.loss_type.c_str(), rl.importance_sampling_level.c_str(), rl.epsilon, rl.epsilon_hi(), rl.beta,
                rl.scale_rewards.c_str(), rl.router_replay.c_str(), rl.reward.c_str());
    std::fflush(stdout);
  }
  std::ofstream metrics;
  if (root) metrics = open_metrics(opt.out_dir, start_step);
  if (talk && start_step > 1) std::printf("resuming from %s at step %lld\n", resume_dir.c_str(), (long long)start_step);

  auto run_eval = [&](int64_t step) -> std::optional<EvalResult> {
    if (valid.ids.empty()) return std::nullopt;
    GenerationConfig eg = gc;
    eg.step = step;
    EvalResult e = evaluate_prompts(model, grid, valid, *tokenizer, rewards.get(), eg, rl.eval_samples);
    if (talk) {
      std::printf("step %5lld | valid pass@1 %.1f%%", (long long)step, 100 * e.pass1_greedy);
      if (e.samples > 0) std::printf(" | pass@%d %.1f%%", e.samples, 100 * e.pass_k);
      std::printf(" | mean reward %.3f | mean length %.1f | %.1f s\n", e.mean_reward_greedy, e.mean_length_greedy,
                  e.seconds);
      std::fflush(stdout);
    }
    return e;
  };

  RlSummary sum;
  sum.final_checkpoint = resume_dir;
  // The starting point of the held-out curve (step 0 = the --init-from checkpoint).
  if (start_step == 1)
    if (const auto e0 = run_eval(0); e0 && root) {
      json m = {{"step", 0}, {"valid/pass@1", e0->pass1_greedy}, {"valid/mean_reward", e0->mean_reward_greedy}};
      if (e0->samples > 0) m["valid/pass@" + std::to_string(e0->samples)] = e0->pass_k;
      metrics << m.dump() << "\n";
      metrics.flush();
    }
  std::vector<int64_t> order = epoch_order(int64_t(prompts.ids.size()), rc.train.seed, epoch, true);
  const int64_t P = int64_t(prompts.ids.size());
  for (int64_t step = start_step; step <= rc.train.steps; ++step) {
    const auto t_step = clock_type::now();
    // ---- 1. prompts and rollouts
    std::vector<int64_t> batch_prompts(B);
    for (int b = 0; b < B; ++b) {
      if (pos >= P) {
        ++epoch;
        pos = 0;
        order = epoch_order(P, rc.train.seed, epoch, true);
      }
      batch_prompts[b] = order[pos++];
    }
    std::vector<GenRequest> reqs(C);
    std::vector<int64_t> prompt_of(C);
    for (int i = 0; i < C; ++i) {
      prompt_of[i] = batch_prompts[i / G];
      reqs[i] = {prompts.ids[prompt_of[i]], prompt_of[i], i % G};
    }
    gc.step = step;
    GenerationStats gs;
    const std::vector<Completion> comps = generate(model, grid, reqs, gc, &gs);
    // ---- 2. rewards and advantages
    auto t0 = clock_type::now();
    const RewardScores sc = score_completions(grid.world, rewards.get(), prompts, prompt_of, comps, *tokenizer);
    const double reward_s = since(t0);
    const std::vector<double> adv = compute_advantages(sc.total, G, rl.scale_rewards);
    // Groups whose rewards are all equal carry no signal.
    std::vector<uint8_t> group_keep(B, 1);
    int zero_std = 0;
    for (int b = 0; b < B; ++b) {
      bool same = true;
      for (int g = 1; g < G; ++g) same = same && sc.total[b * G + g] == sc.total[b * G];
      zero_std += same;
      if (same && rl.dynamic_sampling) group_keep[b] = 0;
    }
    std::vector<int> kept;  // completions that enter the update, in global order
    for (int i = 0; i < C; ++i)
      if (group_keep[i / G]) kept.push_back(i);
    // ---- 3. the global batch of completion rows: minibatch k holds kept completions
    // [k*per, (k+1)*per) (per = ceil(kept / minibatches)), padded with empty rows.
    const int nk = int(kept.size());
    const int per = (nk + rl.minibatches - 1) / rl.minibatches;
    const int M = Mmb * rl.minibatches;
    std::vector<MicroBatch> mbs_all(M, empty_micro(mbs, S, pad));
    std::vector<int> row_comp(size_t(M) * mbs, -1);  // completion of each row (-1 = padding)
    std::vector<int64_t> loss_tokens(C, 0);
    for (int k = 0; k < rl.minibatches; ++k)
      for (int j = 0; j < per && k * per + j < nk; ++j) {
        const int i = kept[k * per + j];
        const bool loss = !(rl.mask_truncated && comps[i].truncated);
        loss_tokens[i] = loss ? int64_t(comps[i].tokens.size()) : 0;
        const int row = k * Mmb * mbs + j;
        row_comp[row] = i;
        put_row(mbs_all[row / mbs], row % mbs, reqs[i].prompt, comps[i], loss, pad);
      }
    // Aggregation weights per minibatch (over its completions only).
    std::vector<double> weight_of(C, 0.0);
    for (int k = 0; k < rl.minibatches; ++k) {
      std::vector<int64_t> n;
      std::vector<int> ids;
      for (int j = 0; j < per && k * per + j < nk; ++j) {
        ids.push_back(kept[k * per + j]);
        n.push_back(loss_tokens[kept[k * per + j]]);
      }
      const auto w = completion_token_weights(n, rl.loss_type, rl.max_new_tokens);
      for (size_t q = 0; q < ids.size(); ++q) weight_of[ids[q]] = w[q];
    }
    // ---- 4. pi_old (and the reference) on this rank's micro-batches
    t0 = clock_type::now();
    std::vector<LocalMicro> local(M);
    StepStats ss(M);
    std::vector<int> mine;
    for (int k = 0; k < rl.minibatches; ++k)
      for (int a = 0; a < A; ++a) mine.push_back(k * Mmb + grid.world_rank * A + a);
    for (int m : mine) {
      double* st = ss.at(m);
      const MicroBatch& mb = mbs_all[m];
      const int64_t N = mb.tokens();
      LocalMicro& L = local[m];
      model.forward(mb, LossNorm{}, ForwardOptions{false, nullptr, &L.old_routing});
      L.lp_old.assign(N, 0.0);
      token_logprobs(L.lp_old.data(), nullptr, model.logits().data(), model.targets().data(), N, cfg.vocab_size,
                     rl.temperature);
      if (ref_holder) {
        ref_holder->forward(mb, LossNorm{}, ForwardOptions{false});
        L.lp_ref.assign(N, 0.0);
        token_logprobs(L.lp_ref.data(), nullptr, ref_holder->logits().data(), ref_holder->targets().data(), N,
                       cfg.vocab_size, rl.temperature);
      }
      L.adv.assign(N, 0.0);
      L.weight.assign(N, 0.0);
      L.seq.assign(N, -1);
      if (rl.router_replay == "rollout") L.replay = L.old_routing;  // overwritten below where recorded
      for (int r = 0; r < mb.rows; ++r) {
        const int i = row_comp[size_t(m) * mbs + r];
        if (i < 0) continue;
        const int Lp = int(reqs[i].prompt.size()), n = int(comps[i].tokens.size());
        const int64_t o = int64_t(r) * S;
        for (int j = 0; j < n; ++j) {  // position Lp-1+j predicts completion token j
          const int64_t t = o + Lp - 1 + j;
          L.adv[t] = adv[i];
          L.weight[t] = weight_of[i];
          L.seq[t] = r;
          // At the rollout's stored precision (float): 0 when the decode reproduced the
          // forward's logits, which batch-invariant kernels make exact.
          const double d = std::fabs(double(comps[i].logprobs[j]) - double(float(L.lp_old[t])));
          st[StepStats::kLpDiff] += d;
          st[StepStats::kLpTokens] += 1;
          ss.lp_diff_max = std::max(ss.lp_diff_max, d);
        }
        // Routing: the rollout fed tokens [0, Lp + n - 1) of the row.
        const int64_t fed = int64_t(Lp) + n - 1;
        for (int j = 0; j < nm; ++j) {
          const auto& ro = comps[i].routing.idx[j];
          for (int64_t t = 0; t < fed; ++t) {
            st[StepStats::kRouteTokens] += 1;
            st[StepStats::kRouteDiff] += selection_differs(L.old_routing.idx[j], o + t, ro, t, K);
          }
          if (rl.router_replay == "rollout") {
            std::copy(ro.begin(), ro.begin() + fed * K, L.replay.idx[j].begin() + o * K);
            const auto& rk = comps[i].routing.kept[j];
            std::copy(rk.begin(), rk.begin() + fed * K, L.replay.kept[j].begin() + o * K);
          }
        }
      }
    }
    const double reference_s = since(t0);
    // ---- 5. updates
    t0 = clock_type::now();
    dist::LossHead<T> head;
    int mini = 0;  // minibatch of the current optimizer step
    head.loss = [&](int m, const MicroBatch& mb, const Model<T>& mdl, T* dlogits) {
      LocalMicro& L = local[size_t(mini) * Mmb + m];
      RlTokens tk{mdl.targets().data(), L.lp_old.data(), L.lp_ref.empty() ? nullptr : L.lp_ref.data(),
                  L.adv.data(), L.weight.data(), L.seq.data()};
      const RlHeadStats hs = rl_loss_head(dlogits, mdl.logits().data(), mb.tokens(), int64_t(cfg.vocab_size), tk, lc);
      ss.add_head(mini * Mmb + m, hs);
      return hs.loss;
    };
    if (rl.router_replay == "rollout")
      head.replay = [&](int m) { return &local[size_t(mini) * Mmb + m].replay; };
    else if (rl.router_replay == "old")
      head.replay = [&](int m) { return &local[size_t(mini) * Mmb + m].old_routing; };
    const double lr = lr_at(sched, step);
    double loss_sum = 0, gnorm = 0;
    int updates = 0, skipped = 0;
    int64_t update_tokens = 0;
    if (nk > 0) {
      for (int it = 0; it < rl.mu; ++it)
        for (mini = 0; mini < rl.minibatches; ++mini) {
          std::vector<MicroBatch> slice(mbs_all.begin() + size_t(mini) * Mmb,
                                        mbs_all.begin() + size_t(mini + 1) * Mmb);
          const StepResult r = trainer.step(slice, lr, rc.optim.max_grad_norm, &head);
          loss_sum += r.loss;
          gnorm = r.grad_norm;
          update_tokens += r.tokens;
          skipped += r.skipped;
          ++updates;
        }
    }
    const double update_s = since(t0);
    // ---- 6. metrics (sums over ranks)
    const std::vector<double> sums = ss.reduce(grid.world);
    const std::vector<double> maxs = {ss.lp_diff_max, ss.ratio_max, -ss.ratio_min};
    double r_mean = 0, r_sq = 0, acc = 0, len_sum = 0, trunc = 0;
    int len_min = std::numeric_limits<int>::max(), len_max = 0;
    for (int i = 0; i < C; ++i) {
      r_mean += sc.total[i];
      acc += is_correct(sc, i) ? 1 : 0;
      const int n = int(comps[i].tokens.size());
      len_sum += n;
      len_min = std::min(len_min, n);
      len_max = std::max(len_max, n);
      trunc += comps[i].truncated;
    }
    r_mean /= C;
    for (int i = 0; i < C; ++i) r_sq += (sc.total[i] - r_mean) * (sc.total[i] - r_mean);
    const double r_std = C > 1 ? std::sqrt(r_sq / (C - 1)) : 0.0;
    const double tok = std::max(1.0, sums[3]);
    const double step_s = since(t_step);
    std::optional<EvalResult> ev;
    if (rl.eval_every > 0 && step % rl.eval_every == 0 && step != rc.train.steps) ev = run_eval(step);
    if (step == rc.train.steps) ev = run_eval(step);
    if (step == start_step) sum.first_reward = r_mean;
    sum.last_reward = r_mean;
    sum.steps = step;
    if (ev) sum.final_valid_pass1 = ev->pass1_greedy;
    if (root) {
      json m = {{"step", step},
                {"reward", r_mean},
                {"reward_std", r_std},
                {"accuracy", acc / C},
                {"frac_reward_zero_std", double(zero_std) / B},
                {"groups_dropped", rl.dynamic_sampling ? B - int(std::count(group_keep.begin(), group_keep.end(), 1)) : 0},
                {"completions/mean_length", len_sum / C},
                {"completions/min_length", len_min},
                {"completions/max_length", len_max},
                {"completions/clipped_ratio", trunc / C},
                {"loss", updates > 0 ? loss_sum / updates : 0.0},
                {"grad_norm", gnorm},
                {"lr", lr},
                {"optimizer_steps", updates},
                {"skipped", skipped},
                {"kl", sums[0] / tok},
                {"entropy", sums[1] / tok},
                {"ratio_mean", sums[2] / tok},
                {"ratio_min", sums[3] > 0 ? -maxs[2] : 1.0},
                {"ratio_max", sums[3] > 0 ? maxs[1] : 1.0},
                {"clip_ratio/low_mean", sums[4] / tok},
                {"clip_ratio/high_mean", sums[5] / tok},
                {"clip_ratio/region_mean", (sums[4] + sums[5]) / tok},
                {"routing_mismatch", sums[6] > 0 ? sums[7] / sums[6] : 0.0},
                {"logprob_mismatch_mean", sums[9] > 0 ? sums[8] / sums[9] : 0.0},
                {"logprob_mismatch_max", maxs[0]},
                {"gen_tokens", gs.new_tokens},
                {"gen_tokens_per_s", gs.seconds > 0 ? double(gs.new_tokens) / gs.seconds : 0.0},
                {"train_tokens_per_s", update_s > 0 ? double(update_tokens) / update_s : 0.0},
                {"mfu_update", update_s > 0 ? flops_tok * double(update_tokens) / update_s / peak : 0.0},
                {"time/generation_s", gs.seconds},
                {"time/reward_s", reward_s},
                {"time/reference_s", reference_s},
                {"time/update_s", update_s},
                {"time/step_s", step_s}};
      for (size_t f = 0; f < sc.names.size(); ++f) {
        double mean = 0;
        for (int i = 0; i < C; ++i) mean += sc.per_function[f][i];
        m["rewards/" + sc.names[f] + "/mean"] = mean / C;
      }
      if (ev) {
        m["valid/pass@1"] = ev->pass1_greedy;
        m["valid/mean_reward"] = ev->mean_reward_greedy;
        if (ev->samples > 0) m["valid/pass@" + std::to_string(ev->samples)] = ev->pass_k;
      }
      metrics << m.dump() << "\n";
      metrics.flush();
    }
    if (talk && (step % rc.train.log_every == 0 || step == start_step || step == rc.train.steps)) {
      std::printf("step %4lld/%lld | reward %.3f ± %.3f | acc %5.1f%% | zero-std %3.0f%% | loss %+.4f | kl %.4f | "
                  "clip %.3f | ent %.3f | len %.1f (trunc %.0f%%) | route-mm %.3f lp-mm %.1e | gen %.0f tok/s | "
                  "upd %.0f tok/s | %.1f s (gen %.1f, rew %.2f, old+ref %.1f, upd %.1f)%s\n",
                  (long long)step, (long long)rc.train.steps, r_mean, r_std, 100 * acc / C, 100.0 * zero_std / B,
                  updates > 0 ? loss_sum / updates : 0.0, sums[0] / tok, (sums[4] + sums[5]) / tok, sums[1] / tok,
                  len_sum / C, 100 * trunc / C, sums[6] > 0 ? sums[7] / sums[6] : 0.0, maxs[0],
                  gs.seconds > 0 ? gs.new_tokens / gs.seconds : 0.0, update_s > 0 ? update_tokens / update_s : 0.0,
                  step_s, gs.seconds, reward_s, reference_s, update_s,
                  skipped ? " | SKIPPED (non-finite)" : (nk == 0 ? " | no update (every group dropped)" : ""));
      std::fflush(stdout);
    }
    dist::maybe_inject_fault("after-step", step, grid.world_rank);
    if ((rc.train.save_every > 0 && step % rc.train.save_every == 0) || step == rc.train.steps) {
      const std::string dir = step_dir(opt.out_dir, step);
      json state = {{"step", step},
                    {"lr", lr},
                    {"reward", r_mean},
                    {"rl", {{"epoch", epoch}, {"pos", pos}, {"reference", reference_dir}}},
                    {"seed", rc.train.seed},
                    {"layout", {{"world_size", W}, {"ep", grid.ep}}},
                    {"run_config", rc.to_json()}};
      std::vector<T> mo, vo;
      trainer.gather_optimizer_state(mo, vo);
      dist::save_checkpoint_parallel(dir, grid, cfg, model.layout(), model.params(), model.expert_bias(), &mo, &vo,
                                     trainer.optimizer().step_count(), state, tokenizer->json(), &model.tid2eid(),
                                     rc.optim.name);
      sum.final_checkpoint = dir;
      if (talk) std::printf("saved checkpoint %s\n", dir.c_str());
      if (root && rc.train.keep_checkpoints > 0) prune_checkpoints(opt.out_dir, rc.train.keep_checkpoints);
    }
  }
  if (talk) {
    std::printf("done: %lld RL steps, reward %.3f -> %.3f", (long long)sum.steps, sum.first_reward, sum.last_reward);
    if (sum.final_valid_pass1 >= 0) std::printf(", valid pass@1 %.1f%%", 100 * sum.final_valid_pass1);
    std::printf("\n");
  }
  return sum;
}

}  // namespace

RewardSpec reward_spec_of(const RlConfig& rl) {
  RewardSpec s;
  s.names = split_list(rl.reward);
  for (const auto& w : split_list(rl.reward_weights)) {
    size_t used = 0;
    double v = 0;
    try {
      v = std::stod(w, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != w.size()) throw Error("key 'rl.reward_weights': '" + w + "' is not a number");
    s.weights.push_back(v);
  }
  s.command = rl.reward_command;
  s.timeout_s = rl.reward_timeout;
  return s;
}

RlSummary run_rl(const RunConfig& rc, const RlOptions& opt) {
  if (rc.train.precision == "double") return rl_impl<double>(rc, opt);
  return rl_impl<float>(rc, opt);
}

}  // namespace moetune
