// Expert parallelism under mpirun: dispatch/combine round trip, the all-to-all MoE
// layer equals the local one, and whole training runs are bit-identical to one rank
// for every valid (W, ep) layout, with and without ZeRO-1. Runs at several -np; the
// verdict is combined over ranks by mpi_main.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>

#include "dist/checkpoint_parallel.hpp"
#include "dist/parallel_trainer.hpp"
#include "io/checkpoint.hpp"
#include "io/safetensors.hpp"
#include "moe/error.hpp"
#include "moe/model.hpp"
#include "moe/moe_layer.hpp"
#include "../test_util.hpp"

using namespace moetune;
using namespace moetune::dist;
namespace fs = std::filesystem;

namespace {

ModelConfig tiny_config(nlohmann::json extra = nlohmann::json::object()) {
  nlohmann::json j = {{"vocab_size", 48},
                      {"hidden_size", 16},
                      {"num_hidden_layers", 3},
                      {"num_attention_heads", 2},
                      {"num_key_value_heads", 1},
                      {"n_routed_experts", 4},
                      {"num_experts_per_tok", 2},
                      {"moe_intermediate_size", 8},
                      {"intermediate_size", 32},
                      {"max_position_embeddings", 32},
                      {"initializer_range", 0.2},
                      {"aux_loss_coeff", 0.01},
                      {"z_loss_coeff", 0.001}};
  for (auto it = extra.begin(); it != extra.end(); ++it) j[it.key()] = it.value();
  return ModelConfig::from_json(j);
}

std::vector<MicroBatch> global_batch(int M, uint64_t step, int V) {
  std::vector<MicroBatch> b;
  for (int m = 0; m < M; ++m) b.push_back(moetune::testing::make_batch(2, 8, V, 1000 * step + m));
  return b;
}

std::vector<int> valid_eps(int W, int E) {
  std::vector<int> v;
  for (int ep = 1; ep <= W; ++ep)
    if (W % ep == 0 && E % ep == 0) v.push_back(ep);
  return v;
}

struct RunResult {
  std::vector<double> losses, norms;
  std::vector<float> params;  // this rank's layout
  std::vector<std::vector<float>> bias;
  std::unique_ptr<ParamLayout> layout;
};

// The optimizer of the Muon runs: Muon for the matrices, AdamW for the rest.
OptimizerConfig muon_config() {
  OptimizerConfig oc;
  oc.name = "muon";
  oc.adamw.weight_decay = 0.1;
  oc.muon.momentum = 0.9;
  oc.muon.weight_decay = 0.05;
  oc.muon.lr_ratio = 4.0;
  return oc;
}

// `steps` training steps at (grid's W, ep) with ZeRO stage z; AdamW (weight decay 0.1)
// unless `optimizer` is given.
RunResult train(const ModelConfig& cfg, ProcessGrid& grid, int steps, int M, int zero, const std::string& resume = "",
                int first = 1, const std::string& save = "", const OptimizerConfig* optimizer = nullptr,
                Reduction reduction = Reduction::exact, bool force_fixed = false, bool overlap = true) {
  OptimizerConfig oc;
  oc.adamw.weight_decay = 0.1;
  if (optimizer) oc = *optimizer;
  ParallelTrainer<float> t(cfg, grid, oc, zero, reduction);
  t.force_fixed_leaf_sum(force_fixed);
  t.set_overlap_a2a(overlap);
  t.model().init(7);
  if (!resume.empty()) {  // weights, routing bias and AdamW state of another layout's checkpoint
    load_model_weights(resume, cfg, t.model().layout(), t.model().params(), t.model().expert_bias(),
                       &t.model().tid2eid());
    std::vector<float> m, v;
    int64_t step = 0;
    EXPECT_TRUE(load_optimizer_state(resume, t.model().layout(), m, v, step, oc.name));
    t.set_optimizer_state(m, v, step);
  }
  RunResult r;
  for (int s = first; s < first + steps; ++s) {
    auto st = t.step(global_batch(M, s, cfg.vocab_size), 3e-3, 0.5);
    EXPECT_FALSE(st.skipped);
    r.losses.push_back(st.loss + st.aux_loss + st.z_loss);
    r.norms.push_back(st.grad_norm);
  }
  if (!save.empty()) {
    std::vector<float> m, v;
    t.gather_optimizer_state(m, v);
    save_checkpoint_parallel(save, grid, cfg, t.model().layout(), t.model().params(), t.model().expert_bias(), &m, &v,
                             t.optimizer().step_count(), {{"step", first + steps - 1}}, "", &t.model().tid2eid(),
                             oc.name);
  }
  r.params = t.model().params();
  r.bias = t.model().expert_bias();
  r.layout = std::make_unique<ParamLayout>(t.model().layout());
  return r;
}

// A run at some layout against the one-rank run `ref`, bit for bit: every step's loss
// and gradient norm, every tensor (by name: the layouts differ), the routing biases.
void expect_same_run(const RunResult& got, const RunResult& ref, const std::string& label) {
  ASSERT_EQ(got.losses.size(), ref.losses.size()) << label;
  for (size_t s = 0; s < ref.losses.size(); ++s) {
    ASSERT_EQ(std::memcmp(&got.losses[s], &ref.losses[s], sizeof(double)), 0)
        << label << " step " << s + 1 << ": " << got.losses[s] << " vs " << ref.losses[s];
    ASSERT_EQ(std::memcmp(&got.norms[s], &ref.norms[s], sizeof(double)), 0) << label << " grad norm, step " << s + 1;
  }
  int64_t compared = 0;
  for (const auto& t : got.layout->tensors()) {
    const auto& rt = ref.layout->at(t.name);
    ASSERT_EQ(std::memcmp(got.params.data() + t.offset, ref.params.data() + rt.offset, t.numel * sizeof(float)), 0)
        << t.name << " differs at " << label;
    compared += int64_t(t.numel);
  }
  EXPECT_GT(compared, 0);
  EXPECT_EQ(got.bias, ref.bias) << label;
}

}  // namespace

// An all-to-all stage whose "experts" are the identity, and which checks on the
// owner that every received row was meant for one of its experts and came from the
// rank it says: rows carry (source rank, expert, token) in their first values.
class IdentityStage : public AllToAllExpertStage<double> {
 public:
  using AllToAllExpertStage<double>::AllToAllExpertStage;
  int64_t d = 0, received = 0;
  bool wrong = false;

 protected:
  void local_forward(int, int q, const std::vector<int64_t>& offs, const double* x, double* y) override {
    for (size_t j = 0; j + 1 < offs.size(); ++j)
      for (int64_t r = offs[j]; r < offs[j + 1]; ++r) {
        wrong |= int(x[r * d]) != q || int(x[r * d + 1]) != rank() * experts_per_rank() + int(j);
        ++received;
      }
    std::copy_n(x, offs.back() * d, y);
  }
  void local_backward(int, int, const std::vector<int64_t>& offs, const double*, const double* dy,
                      double* dx) override {
    std::copy_n(dy, offs.back() * d, dx);
  }
};

// Dispatch -> exchange -> (identity experts) -> exchange -> combine with weight 1/K
// returns the input, and the backward returns the gradient, at every valid ep;
// including a rank that routes every token to one expert and experts with no tokens.
TEST(ExpertParallel, DispatchCombineRoundTrip) {
  Comm world = Comm::world();
  const auto cfg = tiny_config({{"n_routed_experts", 4}, {"num_experts_per_tok", 2}});
  for (int ep : valid_eps(world.size(), cfg.E())) {
    ProcessGrid grid = ProcessGrid::create(world, ep, cfg);
    const int64_t d = cfg.d(), N = 5 + 3 * world.rank();  // ranks hold different token counts
    std::mt19937_64 g(world.rank() + 11);
    std::vector<double> logits(N * cfg.E());
    for (auto& v : logits) v = double(g() % 1000) / 100.0;
    if (world.rank() == 0)  // all of rank 0's tokens pick experts 3 and 2
      for (int64_t t = 0; t < N; ++t) logits[t * cfg.E() + 3] = logits[t * cfg.E() + 2] = 100;
    std::vector<float> bias(cfg.E(), 0.f);
    Routing<double> r;
    route_select(r, logits.data(), bias.data(), cfg, N);
    for (auto& w : r.weight) w = 1.0 / cfg.K();
    Permutation p = make_permutation(r);
    std::vector<double> x(N * d);
    for (auto& v : x) v = double(g() % 1000) / 1000.0;
    std::vector<double> xp(p.pairs() * d), yp(p.pairs() * d);
    dispatch_forward(xp.data(), x.data(), p, d);
    for (int64_t i = 0; i < p.pairs(); ++i) {  // tag rows: source rank, expert
      xp[i * d] = grid.ep_rank;
      xp[i * d + 1] = r.idx[p.pair_token[i] * cfg.K() + p.pair_slot[i]];
    }
    for (bool overlap : {true, false}) {
      SCOPED_TRACE(overlap ? "overlap on" : "overlap off");
      IdentityStage stage(grid.ep_comm, cfg.E(), d, cfg.F(), [](int) -> const ExpertViews<double>& {
        static const ExpertViews<double> none;
        return none;
      });
      stage.d = d;
      stage.overlap = overlap;
      int work = 0;  // the in-flight work runs once per exchange that has some
      auto count = [&] { ++work; };
      stage.forward(0, p, xp.data(), yp.data(), Work(count), Work(count));
      EXPECT_EQ(work, 2);
      EXPECT_FALSE(stage.wrong) << "a row reached the wrong owner at ep " << ep;
      int64_t got = stage.received, sent = p.pairs();
      grid.ep_comm.allreduce_sum(std::span<int64_t>(&got, 1));
      grid.ep_comm.allreduce_sum(std::span<int64_t>(&sent, 1));
      EXPECT_EQ(got, sent);
      EXPECT_EQ(yp, xp);
      std::vector<double> xu(p.pairs() * d), y(N * d, 0.0);
      dispatch_forward(xu.data(), x.data(), p, d);  // untagged rows for the combine
      combine_forward(y.data(), xu.data(), r.weight.data(), p, d);
      for (int64_t i = 0; i < N * d; ++i) ASSERT_NEAR(y[i], x[i], 1e-12);
      // Gradient: combine^T, exchange back and forth, dispatch^T returns dy.
      std::vector<double> dy(N * d), dyp(p.pairs() * d), dxp(p.pairs() * d), dw(N * cfg.K()), dx(N * d, 0.0);
      for (auto& v : dy) v = double(g() % 1000) / 1000.0;
      combine_backward(dyp.data(), dw.data(), dy.data(), xu.data(), r.weight.data(), p, d);
      stage.backward(0, p, dyp.data(), dxp.data(), Work(count), Work(count));
      EXPECT_EQ(work, 4);
      EXPECT_EQ(dxp, dyp);
      dispatch_backward(dx.data(), dxp.data(), p, d);
      for (int64_t i = 0; i < N * d; ++i) ASSERT_NEAR(dx[i], dy[i], 1e-12);
      if (ep > 1) {
        EXPECT_GT(stage.stats.dispatch_bytes + stage.stats.combine_bytes, 0);
        if (!overlap) {
          EXPECT_EQ(stage.stats.overlap_s, 0.0);  // nothing ran in flight
        }
      }
    }
  }
}

// The all-to-all MoE layer equals the local one: forward output and every gradient.
TEST(ExpertParallel, AllToAllLayerEqualsLocal) {
  Comm world = Comm::world();
  const auto cfg = tiny_config({{"first_k_dense_replace", 0}, {"num_hidden_layers", 2}});
  for (int ep : valid_eps(world.size(), cfg.E())) {
    ProcessGrid grid = ProcessGrid::create(world, ep, cfg);
    Model<double> local(cfg);  // all experts, local stage
    local.init(3);
    Model<double> part(cfg, grid.expert_begin, grid.expert_end);
    part.init(3);
    AllToAllExpertStage<double> stage(grid.ep_comm, cfg.E(), cfg.d(), cfg.F(),
                                      [&](int l) -> const ExpertViews<double>& { return part.expert_views(l); });
    part.set_expert_stage(&stage);
    // Each rank its own micro-batch: the experts see tokens of every rank of the group.
    const MicroBatch mb = moetune::testing::make_batch(2, 8, cfg.vocab_size, 77 + world.rank());
    const LossNorm norm{double(mb.count_targets()), 1, 2};
    local.zero_grad();
    part.zero_grad();
    const auto sl = local.forward_backward(mb, norm, true);
    const auto sp = part.forward_backward(mb, norm, true);
    EXPECT_NEAR(sl.total(), sp.total(), 1e-12) << "ep " << ep;
    for (size_t i = 0; i < local.logits().size(); ++i) ASSERT_NEAR(local.logits()[i], part.logits()[i], 1e-12);
    // Dense gradients are this rank's own; expert gradients sum over the group's ranks.
    std::vector<double> expert_sum(local.grads().size());
    for (const auto& t : part.layout().tensors()) {
      const auto& lt = local.layout().at(t.name);
      if (!ParamLayout::is_expert_tensor(t.name)) {
        for (size_t i = 0; i < t.numel; ++i)
          ASSERT_NEAR(part.grads()[t.offset + i], local.grads()[lt.offset + i], 1e-12) << t.name;
      }
    }
    std::vector<double> summed = local.grads();
    grid.ep_comm.allreduce_sum(std::span<double>(summed));
    for (const auto& t : part.layout().tensors()) {
      if (!ParamLayout::is_expert_tensor(t.name)) continue;
      const auto& lt = local.layout().at(t.name);
      for (size_t i = 0; i < t.numel; ++i)
        ASSERT_NEAR(part.grads()[t.offset + i], summed[lt.offset + i], 1e-11) << t.name << " ep " << ep;
    }
  }
}

// 20 steps at every valid (W, ep), with and without ZeRO-1, are bit-identical to the
// same run on one rank (computed here on MPI_COMM_SELF).
TEST(ExpertParallel, TrainingIsBitIdenticalToOneRank) {
  Comm world = Comm::world();
  if (world.size() == 1) GTEST_SKIP() << "at -np 1 both sides are the same single-rank path; run at -np 2+";
  const auto cfg = tiny_config();
  const int W = world.size(), M = 12, steps = 20;  // 12 micro-batches: shared by 1, 2, 3 or 4 ranks
  Comm self = Comm::self();
  ProcessGrid one = ProcessGrid::create(self, 1, cfg);
  const RunResult ref = train(cfg, one, steps, M, 0);
  for (int ep : valid_eps(W, cfg.E()))
    for (int zero : {0, 1}) {
      ProcessGrid grid = ProcessGrid::create(world, ep, cfg);
      const RunResult got = train(cfg, grid, steps, M, zero);
      ASSERT_NO_FATAL_FAILURE(expect_same_run(
          got, ref, "W=" + std::to_string(W) + " ep=" + std::to_string(ep) + " zero=" + std::to_string(zero)));
    }
}

// One micro-batch per rank (M = W): each rank holds one leaf of every dense element
// (and of every expert element at ep = 1), summed by Comm::allreduce_sum_fixed with no
// int128 accumulator; still the same bits as one rank summing the W micro-batches in it.
TEST(ExpertParallel, OneMicroBatchPerRankIsBitIdenticalToOneRank) {
  Comm world = Comm::world();
  if (world.size() == 1) GTEST_SKIP() << "needs 2+ ranks (FixedPoint.RoundTripIsTheAccumulatorOfOneLeaf covers one)";
  const auto cfg = tiny_config();
  const int W = world.size(), steps = 6;
  Comm self = Comm::self();
  ProcessGrid one = ProcessGrid::create(self, 1, cfg);
  const RunResult ref = train(cfg, one, steps, W, 0);
  for (int ep : valid_eps(W, cfg.E()))
    for (int zero : {0, 1}) {
      ProcessGrid grid = ProcessGrid::create(world, ep, cfg);
      const RunResult got = train(cfg, grid, steps, W, zero);
      ASSERT_NO_FATAL_FAILURE(expect_same_run(
          got, ref, "W=" + std::to_string(W) + " ep=" + std::to_string(ep) + " zero=" + std::to_string(zero)));
    }
}

// ZeRO-1 reduces by a reduce-scatter, so each rank holds the global gradient of its
// shards only, and computes the gradient norm's sums of squares for the 4096-element
// chunks its shards hold. With a tied 2000 x 16 embedding (32,000 elements, eight
// chunks) making up most of the dense segment, the shard boundaries of 2, 3 and 4 ranks
// fall inside it (moved to chunk boundaries): the run still equals one rank bit for bit
// (losses, gradient norms, so the clipping, and every weight), with one micro-batch per
// rank (the float reduce-scatter) and with two (the int128 one).
TEST(ExpertParallel, ZeroShardsInsideATensorAreBitIdenticalToOneRank) {
  Comm world = Comm::world();
  if (world.size() == 1) GTEST_SKIP() << "needs 2+ ranks to shard";
  const auto cfg = tiny_config({{"vocab_size", 2000}, {"tie_word_embeddings", true}});
  const int W = world.size(), steps = 3;
  Comm self = Comm::self();
  ProcessGrid one = ProcessGrid::create(self, 1, cfg);
  for (int A : {1, 2}) {
    const RunResult ref = train(cfg, one, steps, A * W, 0);
    for (int ep : valid_eps(W, cfg.E())) {
      ProcessGrid grid = ProcessGrid::create(world, ep, cfg);
      const RunResult got = train(cfg, grid, steps, A * W, 1);
      ASSERT_NO_FATAL_FAILURE(expect_same_run(got, ref, "W=" + std::to_string(W) + " ep=" + std::to_string(ep) +
                                                            " micro-batches per rank " + std::to_string(A)));
    }
  }
}

// Running the shared expert and the router backward while the tokens are in flight
// (parallel.overlap_a2a, on in every other test here) changes no bit: the same training
// run with the overlap off, at every layout and with 1 and 2 micro-batches per rank.
TEST(ExpertParallel, OverlapOfTheAllToAllChangesNoBit) {
  Comm world = Comm::world();
  const auto cfg = tiny_config();
  const int W = world.size(), steps = 3;
  for (int ep : valid_eps(W, cfg.E()))
    for (int A : {1, 2}) {
      ProcessGrid grid = ProcessGrid::create(world, ep, cfg);
      const RunResult on = train(cfg, grid, steps, A * W, 0);
      const RunResult off = train(cfg, grid, steps, A * W, 0, "", 1, "", nullptr, Reduction::exact, false, false);
      ASSERT_EQ(on.params.size(), off.params.size());
      ASSERT_EQ(std::memcmp(on.params.data(), off.params.data(), on.params.size() * sizeof(float)), 0)
          << "W=" << W << " ep=" << ep << " micro-batches per rank " << A;
      EXPECT_EQ(on.bias, off.bias);
    }
}

// The ways of summing the leaves (one leaf left in place, 2-4 leaves kept as floats, the
// int128 accumulator) are one function: at every layout and 1-5 micro-batches per rank
// the default run equals the run that sums every leaf in int128, bit for bit.
TEST(ExpertParallel, LeafSumsEqualTheInt128Accumulator) {
  Comm world = Comm::world();
  const auto cfg = tiny_config();
  const int W = world.size(), steps = 3;
  for (int ep : valid_eps(W, cfg.E()))
    for (int A : {1, 2, 3, 4, 5}) {
      ProcessGrid grid = ProcessGrid::create(world, ep, cfg);
      const RunResult fixed = train(cfg, grid, steps, A * W, 0, "", 1, "", nullptr, Reduction::exact, true);
      const RunResult fast = train(cfg, grid, steps, A * W, 0);
      ASSERT_EQ(fast.params.size(), fixed.params.size());
      ASSERT_EQ(std::memcmp(fast.params.data(), fixed.params.data(), fast.params.size() * sizeof(float)), 0)
          << "W=" << W << " ep=" << ep << " micro-batches per rank " << A;
      for (int s = 0; s < steps; ++s)
        ASSERT_EQ(std::memcmp(&fast.norms[s], &fixed.norms[s], sizeof(double)), 0) << "grad norm, step " << s + 1;
    }
}

// parallel.reduction = "fp32": the same run twice gives the same bits at every layout
// (deterministic for a given layout), and stays close to the exact reduction, whose
// bits it does not promise.
TEST(ExpertParallel, Fp32ReductionIsDeterministicAndCloseToExact) {
  Comm world = Comm::world();
  const auto cfg = tiny_config();
  const int W = world.size(), M = 12, steps = 6;
  Comm self = Comm::self();
  ProcessGrid one = ProcessGrid::create(self, 1, cfg);
  const RunResult exact = train(cfg, one, steps, M, 0);
  for (int ep : valid_eps(W, cfg.E()))
    for (int zero : {0, 1}) {
      ProcessGrid grid = ProcessGrid::create(world, ep, cfg);
      const RunResult a = train(cfg, grid, steps, M, zero, "", 1, "", nullptr, Reduction::fp32);
      const RunResult b = train(cfg, grid, steps, M, zero, "", 1, "", nullptr, Reduction::fp32);
      ASSERT_EQ(a.params, b.params) << "W=" << W << " ep=" << ep << " zero=" << zero;
      ASSERT_EQ(a.losses, b.losses);
      // The fp32 path is the one taken: its roundings are not the exact sum's.
      EXPECT_NE(a.params, exact.params);
      double worst = 0;
      for (int s = 0; s < steps; ++s) {
        worst = std::max(worst, std::fabs(a.losses[s] - exact.losses[s]) / std::fabs(exact.losses[s]));
        EXPECT_NEAR(a.norms[s], exact.norms[s], 1e-4 * exact.norms[s]) << "step " << s + 1;
      }
      EXPECT_LT(worst, 1e-5) << "W=" << W << " ep=" << ep << " zero=" << zero;
      double pmax = 0;
      for (const auto& t : a.layout->tensors()) {
        const auto& rt = exact.layout->at(t.name);
        for (size_t i = 0; i < t.numel; ++i)
          pmax = std::max(pmax, double(std::fabs(a.params[t.offset + i] - exact.params[rt.offset + i])));
      }
      EXPECT_LT(pmax, 1e-4) << "W=" << W << " ep=" << ep << " zero=" << zero;
    }
}

// The same for optim.name = "muon": each Muon matrix is orthogonalised on the ranks that
// hold it (under ZeRO-1 on the one whose shard holds it whole), and every layout gives
// the bits of one rank.
TEST(ExpertParallel, MuonTrainingIsBitIdenticalToOneRank) {
  Comm world = Comm::world();
  if (world.size() == 1) GTEST_SKIP() << "at -np 1 both sides are the same single-rank path; run at -np 2+";
  const auto cfg = tiny_config();
  const OptimizerConfig oc = muon_config();
  const int W = world.size(), M = 12, steps = 8;
  Comm self = Comm::self();
  ProcessGrid one = ProcessGrid::create(self, 1, cfg);
  const RunResult ref = train(cfg, one, steps, M, 0, "", 1, "", &oc);
  const RunResult adamw = train(cfg, one, 2, M, 0);
  EXPECT_NE(adamw.params, train(cfg, one, 2, M, 0, "", 1, "", &oc).params) << "Muon must change the update";
  for (int ep : valid_eps(W, cfg.E()))
    for (int zero : {0, 1}) {
      ProcessGrid grid = ProcessGrid::create(world, ep, cfg);
      const RunResult got = train(cfg, grid, steps, M, zero, "", 1, "", &oc);
      for (int s = 0; s < steps; ++s)
        ASSERT_EQ(std::memcmp(&got.losses[s], &ref.losses[s], sizeof(double)), 0)
            << "W=" << W << " ep=" << ep << " zero=" << zero << " step " << s + 1;
      for (const auto& t : got.layout->tensors())
        ASSERT_EQ(std::memcmp(got.params.data() + t.offset, ref.params.data() + ref.layout->at(t.name).offset,
                              t.numel * sizeof(float)),
                  0)
            << t.name << " differs at W=" << W << " ep=" << ep << " zero=" << zero;
      EXPECT_EQ(got.bias, ref.bias);
    }
}

// Muon: save at one layout with ZeRO-1 (sharded momentum), resume at another without:
// the continued run equals the uninterrupted one on a single rank, bit for bit; a
// resume with AdamW is refused naming optim.name.
TEST(ExpertParallel, MuonResumeAtAnotherLayoutEqualsUninterruptedRun) {
  Comm world = Comm::world();
  const auto cfg = tiny_config();
  const OptimizerConfig oc = muon_config();
  const int W = world.size(), M = 12;
  Comm self = Comm::self();
  ProcessGrid one = ProcessGrid::create(self, 1, cfg);
  const RunResult ref = train(cfg, one, 6, M, 0, "", 1, "", &oc);
  int64_t pid = ::getpid();
  world.broadcast(std::span<int64_t>(&pid, 1), 0);
  const fs::path root = fs::temp_directory_path() / ("moetune_muon_resume_" + std::to_string(pid));
  const auto eps = valid_eps(W, cfg.E());
  const std::string dir = (root / "ckpt").string();
  {
    ProcessGrid a = ProcessGrid::create(world, eps.back(), cfg);
    train(cfg, a, 3, M, 1, "", 1, dir, &oc);
  }
  ProcessGrid b = ProcessGrid::create(world, eps.front(), cfg);
  const RunResult got = train(cfg, b, 3, M, 0, dir, 4, "", &oc);
  for (int s = 0; s < 3; ++s)
    ASSERT_EQ(std::memcmp(&got.losses[s], &ref.losses[3 + s], sizeof(double)), 0) << "step " << 4 + s;
  for (const auto& t : got.layout->tensors())
    ASSERT_EQ(std::memcmp(got.params.data() + t.offset, ref.params.data() + ref.layout->at(t.name).offset,
                          t.numel * sizeof(float)),
              0)
        << t.name << " after resuming ep " << eps.back() << " -> " << eps.front();
  std::vector<float> m, v;
  int64_t step = 0;
  Model<float> back(cfg, b.expert_begin, b.expert_end);
  const std::string msg = moetune::testing::error_of([&] { load_optimizer_state(dir, back.layout(), m, v, step); });
  EXPECT_NE(msg.find("optim.name"), std::string::npos) << msg;
  world.barrier();
  if (world.rank() == 0) fs::remove_all(root);
}

// The loss and every gradient of one global batch at every valid (W, ep) equal one
// rank's, bit for bit.
TEST(ExpertParallel, LossAndGradientsAreBitIdenticalToOneRank) {
  Comm world = Comm::world();
  if (world.size() == 1) GTEST_SKIP() << "at -np 1 both sides are the same single-rank path; run at -np 2+";
  // The V4 routing config: every layer MoE, the first hash-routed, sqrtsoftplus, clamped experts;
  // and mHC (2 streams) with an MTP block, whose MoE experts are sharded like any layer's.
  for (const auto& cfg : {tiny_config({{"seq_aux_loss_coeff", 0.01}}),
                          tiny_config({{"seq_aux_loss_coeff", 0.01}, {"scoring_func", "sqrtsoftplus"},
                                       {"num_hash_layers", 1}, {"first_k_dense_replace", 0}, {"swiglu_limit", 0.3}}),
                          tiny_config({{"seq_aux_loss_coeff", 0.01}, {"hc_mult", 2}, {"hc_sinkhorn_iters", 4},
                                       {"num_nextn_predict_layers", 1}})}) {
    const auto batch = global_batch(12, 3, cfg.vocab_size);
    Comm self = Comm::self();
    ProcessGrid one = ProcessGrid::create(self, 1, cfg);
    AdamWConfig ac;
    ParallelTrainer<double> ref(cfg, one, ac, 0);
    ref.model().init(9);
    const StepResult rr = ref.accumulate(batch);
    for (int ep : valid_eps(world.size(), cfg.E())) {
      ProcessGrid grid = ProcessGrid::create(world, ep, cfg);
      ParallelTrainer<double> t(cfg, grid, ac, 0);
      t.model().init(9);
      const StepResult r = t.accumulate(batch);
      EXPECT_EQ(std::memcmp(&r.total_loss, &rr.total_loss, sizeof(double)), 0) << "ep " << ep;
      EXPECT_EQ(std::memcmp(&r.mtp_loss, &rr.mtp_loss, sizeof(double)), 0) << "ep " << ep;
      if (cfg.mtp()) {
        EXPECT_GT(r.mtp_loss, 0.0);
      }
      EXPECT_EQ(std::memcmp(&r.grad_norm, &rr.grad_norm, sizeof(double)), 0) << "ep " << ep;
      EXPECT_EQ(r.expert_counts, rr.expert_counts);
      for (const auto& tn : t.model().layout().tensors())
        ASSERT_EQ(std::memcmp(t.model().grads().data() + tn.offset,
                              ref.model().grads().data() + ref.model().layout().at(tn.name).offset,
                              tn.numel * sizeof(double)),
                  0)
            << "gradient of " << tn.name << " at W=" << world.size() << " ep=" << ep;
    }
  }
}

// Save at one layout, resume at another: the continued run equals the uninterrupted
// one on a single rank, bit for bit.
TEST(ExpertParallel, ResumeAtAnotherLayoutEqualsUninterruptedRun) {
  Comm world = Comm::world();
  const auto cfg = tiny_config();
  const int W = world.size(), M = 12;
  Comm self = Comm::self();
  ProcessGrid one = ProcessGrid::create(self, 1, cfg);
  const RunResult ref = train(cfg, one, 10, M, 0);
  int64_t pid = ::getpid();
  world.broadcast(std::span<int64_t>(&pid, 1), 0);
  const fs::path root = fs::temp_directory_path() / ("moetune_resume_" + std::to_string(pid));
  const auto eps = valid_eps(W, cfg.E());
  // (first half layout, second half layout): most expert-parallel -> pure data parallel, and back.
  // At -np 1 both pairs are (1, 1): run it once (resumed vs uninterrupted is still a real check).
  std::vector<std::pair<int, int>> pairs{{eps.back(), eps.front()}};
  if (W > 1) pairs.emplace_back(eps.front(), eps.back());
  for (auto [ep_a, ep_b] : pairs) {
    const std::string dir = (root / ("ep" + std::to_string(ep_a))).string();
    {
      ProcessGrid a = ProcessGrid::create(world, ep_a, cfg);
      train(cfg, a, 5, M, 1, "", 1, dir);
    }
    ProcessGrid b = ProcessGrid::create(world, ep_b, cfg);
    const RunResult got = train(cfg, b, 5, M, 0, dir, 6);
    for (int s = 0; s < 5; ++s)
      ASSERT_EQ(std::memcmp(&got.losses[s], &ref.losses[5 + s], sizeof(double)), 0)
          << "step " << 6 + s << " after resuming ep " << ep_a << " -> " << ep_b;
    for (const auto& t : got.layout->tensors())
      ASSERT_EQ(std::memcmp(got.params.data() + t.offset, ref.params.data() + ref.layout->at(t.name).offset,
                            t.numel * sizeof(float)),
                0)
          << t.name << " after resuming ep " << ep_a << " -> " << ep_b;
    EXPECT_EQ(got.bias, ref.bias);
  }
  world.barrier();
  if (world.rank() == 0) fs::remove_all(root);
}

// The checkpoint files are byte-identical for every layout, and load at any layout.
TEST(ExpertParallel, CheckpointBytesDoNotDependOnTheLayout) {
  Comm world = Comm::world();
  if (world.size() == 1) GTEST_SKIP() << "at -np 1 both sides are the same single-rank path; run at -np 2+";
  const int W = world.size();
  int64_t pid = ::getpid();
  world.broadcast(std::span<int64_t>(&pid, 1), 0);
  // The second config has a hash-routed layer: its tid2eid table is in the checkpoint; the
  // third mHC and an MTP block (its experts sharded, its bias the last MoE layer's).
  for (const auto& cfg : {tiny_config(), tiny_config({{"num_hash_layers", 1}, {"scoring_func", "sqrtsoftplus"}}),
                          tiny_config({{"hc_mult", 2}, {"num_nextn_predict_layers", 1}})}) {
    const fs::path root = fs::temp_directory_path() /
                          ("moetune_ckpt_layout_" + std::to_string(pid) + "_" + std::to_string(cfg.num_hash_layers) +
                           (cfg.mtp() ? "_mtp" : ""));
    // Reference: one rank writes with W=1.
    Comm self = Comm::self();
    if (world.rank() == 0) {
      ProcessGrid one = ProcessGrid::create(self, 1, cfg);
      RunResult r;
      AdamWConfig ac;
      ParallelTrainer<float> t(cfg, one, ac, 0);
      t.model().init(7);
      t.step(global_batch(12, 1, cfg.vocab_size), 1e-3, 1.0);
      std::vector<float> m, v;
      t.gather_optimizer_state(m, v);
      save_checkpoint_parallel((root / "w1").string(), one, cfg, t.model().layout(), t.model().params(),
                               t.model().expert_bias(), &m, &v, t.optimizer().step_count(), {{"step", 1}}, "",
                               &t.model().tid2eid());
    }
    world.barrier();
    for (int ep : valid_eps(W, cfg.E())) {
      ProcessGrid grid = ProcessGrid::create(world, ep, cfg);
      AdamWConfig ac;
      ParallelTrainer<float> t(cfg, grid, ac, 1);
      t.model().init(7);
      t.step(global_batch(12, 1, cfg.vocab_size), 1e-3, 1.0);
      std::vector<float> m, v;
      t.gather_optimizer_state(m, v);
      const fs::path dir = root / ("ep" + std::to_string(ep));
      save_checkpoint_parallel(dir.string(), grid, cfg, t.model().layout(), t.model().params(), t.model().expert_bias(),
                               &m, &v, t.optimizer().step_count(), {{"step", 1}}, "", &t.model().tid2eid());
      if (world.rank() == 0)
        for (const auto& f : fs::directory_iterator(root / "w1")) {
          const std::string name = f.path().filename().string();
          if (name == "trainer_state.json") continue;
          std::ifstream a(f.path(), std::ios::binary), b(dir / name, std::ios::binary);
          ASSERT_TRUE(b.good()) << name << " missing at ep " << ep;
          std::string sa((std::istreambuf_iterator<char>(a)), {}), sb((std::istreambuf_iterator<char>(b)), {});
          EXPECT_TRUE(sa == sb) << name << " differs at W=" << W << " ep=" << ep;
        }
      // Load it back at this layout: the same weights.
      Model<float> back(cfg, grid.expert_begin, grid.expert_end);
      load_model_weights(dir.string(), cfg, back.layout(), back.params(), back.expert_bias(), &back.tid2eid());
      EXPECT_EQ(back.params(), t.model().params());
      EXPECT_EQ(back.expert_bias(), t.model().expert_bias());
      EXPECT_EQ(back.tid2eid(), t.model().tid2eid());
      if (cfg.num_hash_layers > 0) {
        EXPECT_EQ(back.tid2eid().size(), 1u);
        EXPECT_TRUE(SafetensorsReader((dir / "model-00001-of-00005.safetensors").string())
                        .contains(ParamLayout::tid2eid_name(cfg.first_k_dense_replace)));
      }
      std::vector<float> lm, lv;
      int64_t step = 0;
      ASSERT_TRUE(load_optimizer_state(dir.string(), back.layout(), lm, lv, step));
      EXPECT_EQ(lm, m);
      EXPECT_EQ(step, 1);
    }
    world.barrier();
    if (world.rank() == 0) fs::remove_all(root);
  }
}

// Impossible layouts fail with one message on every rank (no hang).
TEST(ExpertParallel, BadLayoutsAreRejectedOnEveryRank) {
  Comm world = Comm::world();
  const auto cfg = tiny_config({{"n_routed_experts", 6}, {"num_experts_per_tok", 2}});
  for (int ep : {0, 4, 5, world.size() + 1}) {
    if (ep > 0 && world.size() % ep == 0 && cfg.E() % ep == 0) continue;
    try {
      ProcessGrid::create(world, ep, cfg);
      ADD_FAILURE() << "ep=" << ep << " was accepted at W=" << world.size();
    } catch (const moetune::Error& e) {
      EXPECT_NE(std::string(e.what()).find("parallel.ep"), std::string::npos) << e.what();
    }
  }
  world.barrier();  // every rank got here: nobody hung
}

// A non-finite gradient on one rank skips the step on every rank: weights, AdamW
// state and routing bias stay as they were.
TEST(ExpertParallel, NonFiniteStepIsSkippedEverywhere) {
  Comm world = Comm::world();
  const auto cfg = tiny_config();
  ProcessGrid grid = ProcessGrid::create(world, valid_eps(world.size(), cfg.E()).back(), cfg);
  AdamWConfig ac;
  ParallelTrainer<float> t(cfg, grid, ac, 0);
  t.model().init(7);
  // Poison one input embedding row used only by the last rank's first micro-batch.
  auto batch = global_batch(world.size(), 1, cfg.vocab_size);
  const int32_t poisoned = batch.back().input_ids[0];
  for (auto& mb : batch)
    for (auto& id : mb.input_ids)
      if (id == poisoned && &mb != &batch.back()) id = (poisoned + 1) % cfg.vocab_size;
  auto& p = t.model().params();
  p[t.model().layout().offset("model.embed_tokens.weight") + size_t(poisoned) * cfg.d()] =
      std::numeric_limits<float>::infinity();
  const auto before = p;
  const auto bias = t.model().expert_bias();
  const auto r = t.step(batch, 1e-3, 1.0);
  EXPECT_TRUE(r.skipped);
  EXPECT_EQ(t.optimizer().step_count(), 0);
  EXPECT_EQ(t.model().expert_bias(), bias);
  int64_t changed = 0;
  for (size_t i = 0; i < p.size(); ++i) changed += !(p[i] == before[i]) && !std::isinf(before[i]);
  EXPECT_EQ(changed, 0);
}
