// Parity of the RL update (MODEL.md section 11) with the PyTorch reference
// (tests/reference/make_rl_fixture.py): tests/fixtures/rl_parity/batch.json holds cases of
// micro-batches of completion rows with their per-position lp_old, lp_ref, advantages,
// aggregation weights, completion ids and optionally a replayed routing selection; the
// reference's float64 results are in tests/fixtures/rl_parity/<case>.safetensors: the RL
// loss-head terms and balance losses of each step, every gradient at the initial
// weights, and the parameters and routing biases after 2 optimizer steps on the same
// completions (rl.mu = 2).
//
// Two paths are compared, in double (tight) and float (about 1e-5 relative):
//  - plain: Model::forward (with the replay) -> rl_loss_head -> Model::backward per
//    micro-batch, at the initial weights (loss terms, lp, every gradient);
//  - trainer: dist::ParallelTrainer<T>::step with a dist::LossHead on a one-rank grid,
//    the path of `moetune rl`'s updates (loss terms of both steps, gradient norms, expert
//    counts, gradients, final weights and biases).
// MOETUNE_FIXTURE_ROOT (default tests/fixtures) points at fixtures made afresh.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "dist/parallel_trainer.hpp"
#include "io/checkpoint.hpp"
#include "io/safetensors.hpp"
#include "moe/model.hpp"
#include "optim/adamw.hpp"
#include "train/rl_loss.hpp"
#include "train/step.hpp"

using namespace moetune;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

std::string fixture_root() {
  if (const char* env = std::getenv("MOETUNE_FIXTURE_ROOT")) return env;
  return std::string(MOETUNE_SOURCE_DIR) + "/tests/fixtures";
}

// Per micro-batch RL inputs, indexed by the position whose logits predict the token.
struct RlMicro {
  std::vector<double> lp_old, lp_ref, adv, weight;
  std::vector<int32_t> seq;
  bool has_replay = false;
  RoutingTrace replay;
};

struct RlFixture {
  std::string name, ckpt;
  ModelConfig cfg;
  RlLossConfig rl;
  json optim, initial_bias;
  int steps = 2;
  std::vector<MicroBatch> batch;
  std::vector<RlMicro> micro;
  std::unique_ptr<SafetensorsReader> expected;
};

json load_batch_file() {
  const fs::path path = fs::path(fixture_root()) / "rl_parity" / "batch.json";
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path.string() + ": missing");
  return json::parse(in);
}

RlFixture load_case(const std::string& name) {
  const json all = load_batch_file();
  const json* cp = nullptr;
  for (const auto& c : all.at("cases"))
    if (c.at("name") == name) cp = &c;
  if (!cp) throw std::runtime_error("rl_parity/batch.json: no case " + name);
  const json& c = *cp;
  RlFixture f;
  f.name = name;
  f.ckpt = (fs::path(fixture_root()) / c.at("ckpt").get<std::string>()).string();
  f.cfg = load_checkpoint_config(f.ckpt);
  const json& r = c.at("rl");
  f.rl.loss_type = r.at("loss_type");
  f.rl.importance_sampling_level = r.at("importance_sampling_level");
  f.rl.epsilon = r.at("epsilon");
  f.rl.epsilon_high = r.at("epsilon_high");
  f.rl.beta = r.at("beta");
  f.rl.temperature = r.at("temperature");
  f.rl.max_new_tokens = r.at("max_new_tokens");
  validate(f.rl);
  f.optim = c.at("optim");
  if (c.contains("initial_bias")) f.initial_bias = c.at("initial_bias");
  f.steps = c.at("steps");
  for (const auto& m : c.at("micro_batches")) {
    MicroBatch mb;
    mb.rows = m.at("rows");
    mb.seq_len = m.at("seq_len");
    mb.input_ids = m.at("input_ids").get<std::vector<int32_t>>();
    mb.labels = m.at("labels").get<std::vector<int32_t>>();
    mb.doc_ids = m.at("doc_ids").get<std::vector<int32_t>>();
    RlMicro x;
    x.lp_old = m.at("lp_old").get<std::vector<double>>();
    x.lp_ref = m.at("lp_ref").get<std::vector<double>>();
    x.adv = m.at("advantage").get<std::vector<double>>();
    x.weight = m.at("weight").get<std::vector<double>>();
    x.seq = m.at("seq").get<std::vector<int32_t>>();
    if (m.contains("replay")) {
      x.has_replay = true;
      x.replay.idx = m.at("replay").at("idx").get<std::vector<std::vector<int32_t>>>();
      x.replay.kept = m.at("replay").at("kept").get<std::vector<std::vector<uint8_t>>>();
    }
    f.batch.push_back(std::move(mb));
    f.micro.push_back(std::move(x));
  }
  f.expected = std::make_unique<SafetensorsReader>(
      (fs::path(fixture_root()) / "rl_parity" / (name + ".safetensors")).string());
  return f;
}

std::vector<double> expected(const RlFixture& f, const std::string& name) {
  const auto& t = f.expected->at(name);
  size_t n = 1;
  for (auto s : t.shape) n *= size_t(s);
  std::vector<double> v(n);
  f.expected->read(name, v.data(), n);
  return v;
}
double expected_scalar(const RlFixture& f, const std::string& name) { return expected(f, name).at(0); }

// max|a - b| / max(max|b|, floor): relative to the tensor's scale.
template <class T>
double tensor_err(const T* a, const std::vector<double>& b, double floor = 1e-30) {
  double diff = 0, scale = floor;
  for (size_t i = 0; i < b.size(); ++i) {
    diff = std::max(diff, std::fabs(double(a[i]) - b[i]));
    scale = std::max(scale, std::fabs(b[i]));
  }
  return diff / scale;
}

template <class T>
void load_weights(const RlFixture& f, Model<T>& model) {
  load_model_weights(f.ckpt, f.cfg, model.layout(), model.params(), model.expert_bias());
  for (int j = 0; j < f.cfg.num_moe_layers(); ++j) {
    const std::string name = ParamLayout::bias_name(f.cfg.first_k_dense_replace + j);
    if (f.initial_bias.is_object() && f.initial_bias.contains(name))
      model.expert_bias()[j] = f.initial_bias.at(name).get<std::vector<float>>();
  }
}

// The RL head terms of one step, summed over its micro-batches in order.
struct HeadSum {
  double loss = 0, pg_loss = 0, kl_sum = 0, entropy_sum = 0, ratio_sum = 0, lp_sum = 0;
  double ratio_min = INFINITY, ratio_max = -INFINITY;
  int64_t tokens = 0, clipped_low = 0, clipped_high = 0;
  void add(const RlHeadStats& s) {
    loss += s.loss;
    pg_loss += s.pg_loss;
    kl_sum += s.kl_sum;
    entropy_sum += s.entropy_sum;
    ratio_sum += s.ratio_sum;
    lp_sum += s.lp_sum;
    ratio_min = std::min(ratio_min, s.ratio_min);
    ratio_max = std::max(ratio_max, s.ratio_max);
    tokens += s.tokens;
    clipped_low += s.clipped_low;
    clipped_high += s.clipped_high;
  }
};

// rl_loss_head over micro-batch m of the fixture on the model's last forward.
template <class T>
RlHeadStats head_of(const RlFixture& f, int m, const Model<T>& model, T* dlogits, double* lp_out = nullptr) {
  const RlMicro& x = f.micro[size_t(m)];
  const MicroBatch& mb = f.batch[size_t(m)];
  // The fixture's per-position inputs must sit exactly on the model's loss positions.
  for (int64_t i = 0; i < mb.tokens(); ++i)
    if ((model.targets()[i] >= 0) != (x.seq[i] >= 0))
      throw std::runtime_error(f.name + ": micro-batch " + std::to_string(m) + " position " + std::to_string(i) +
                               ": seq does not match the targets");
  const RlTokens tk{model.targets().data(), x.lp_old.data(), f.rl.beta > 0 ? x.lp_ref.data() : nullptr,
                    x.adv.data(), x.weight.data(), x.seq.data()};
  return rl_loss_head(dlogits, model.logits().data(), mb.tokens(), int64_t(f.cfg.vocab_size), tk, f.rl, lp_out);
}

struct Worst {
  double loss = 0, grad = 0, weight = 0, lp = 0;
};

template <class T>
void check_case(const std::string& name, double tol_loss, double tol_tensor, double tol_weight) {
  SCOPED_TRACE(name + (sizeof(T) == 8 ? " (double)" : " (float)"));
  RlFixture f = load_case(name);
  ASSERT_GT(expected_scalar(f, "min_margin"), 1e-4) << "fixture routing is too close to a tie";
  ASSERT_GE(expected_scalar(f, "clip_margin"), 1e-3) << "fixture ratios are too close to a clip boundary";
  Worst worst;
  auto close = [&](double a, double b, const std::string& what) {
    const double err = std::fabs(a - b) / std::max(1.0, std::fabs(b));
    worst.loss = std::max(worst.loss, err);
    EXPECT_LE(err, tol_loss) << what << ": " << a << " vs " << b;
  };
  auto compare_step = [&](int k, const HeadSum& h, double aux, double seq_aux, double z, double total,
                          const std::string& path) {
    const std::string p = "step" + std::to_string(k) + ".";
    close(h.loss, expected_scalar(f, p + "loss"), path + p + "loss");
    close(h.pg_loss, expected_scalar(f, p + "pg_loss"), path + p + "pg_loss");
    close(h.kl_sum, expected_scalar(f, p + "kl_sum"), path + p + "kl_sum");
    close(h.entropy_sum, expected_scalar(f, p + "entropy_sum"), path + p + "entropy_sum");
    close(h.ratio_sum, expected_scalar(f, p + "ratio_sum"), path + p + "ratio_sum");
    close(h.ratio_min, expected_scalar(f, p + "ratio_min"), path + p + "ratio_min");
    close(h.ratio_max, expected_scalar(f, p + "ratio_max"), path + p + "ratio_max");
    close(h.lp_sum, expected_scalar(f, p + "lp_sum"), path + p + "lp_sum");
    close(aux, expected_scalar(f, p + "aux"), path + p + "aux");
    close(seq_aux, expected_scalar(f, p + "seq_aux"), path + p + "seq_aux");
    close(z, expected_scalar(f, p + "z"), path + p + "z");
    close(total, expected_scalar(f, p + "total"), path + p + "total");
    EXPECT_EQ(h.tokens, int64_t(expected_scalar(f, p + "tokens"))) << path << p << "tokens";
    EXPECT_EQ(h.clipped_low, int64_t(expected_scalar(f, p + "clipped_low"))) << path << p << "clipped_low";
    EXPECT_EQ(h.clipped_high, int64_t(expected_scalar(f, p + "clipped_high"))) << path << p << "clipped_high";
  };
  auto compare_grads = [&](const Model<T>& model, const std::string& path) {
    int checked = 0;
    for (const auto& t : model.layout().tensors()) {
      const double err = tensor_err(model.grads().data() + t.offset, expected(f, "grad." + t.name));
      worst.grad = std::max(worst.grad, err);
      EXPECT_LT(err, tol_tensor) << path << "grad." << t.name;
      ++checked;
    }
    EXPECT_EQ(checked, int(model.layout().tensors().size()));
  };
  const LossNorm norm = global_loss_norm(f.batch);

  // ---- plain path: forward (replay) -> rl_loss_head -> backward, at the initial weights
  {
    Model<T> model(f.cfg);
    load_weights(f, model);
    model.zero_grad();
    HeadSum h;
    double aux = 0, seq_aux = 0, z = 0;
    for (size_t m = 0; m < f.batch.size(); ++m) {
      ForwardOptions fo;
      if (f.micro[m].has_replay) fo.replay = &f.micro[m].replay;
      const MicroStats s = model.forward(f.batch[m], norm, fo);
      auto& dl = model.dlogits_buffer();
      dl.resize(model.logits().size());
      std::vector<double> lp(size_t(f.batch[m].tokens()));
      h.add(head_of(f, int(m), model, dl.data(), lp.data()));
      model.backward(dl.data());
      aux += s.aux_loss;
      seq_aux += s.seq_aux_loss;
      z += s.z_loss;
      for (auto& v : lp)
        if (std::isnan(v)) v = 0;  // the fixture holds 0 at positions without a target
      const double err = tensor_err(lp.data(), expected(f, "lp." + std::to_string(m)));
      worst.lp = std::max(worst.lp, err);
      EXPECT_LT(err, tol_tensor) << "plain lp of micro-batch " << m;
    }
    compare_step(1, h, aux, seq_aux, z, h.loss + aux + seq_aux + z, "plain ");
    close(global_grad_norm(model.grads()), expected_scalar(f, "step1.grad_norm"), "plain step1.grad_norm");
    compare_grads(model, "plain ");
  }

  // ---- trainer path: ParallelTrainer::step with a LossHead on a one-rank grid
  dist::Comm self = dist::Comm::self();
  dist::ProcessGrid grid = dist::ProcessGrid::create(self, 1, f.cfg);
  AdamWConfig ac;
  ac.beta1 = f.optim.at("beta1");
  ac.beta2 = f.optim.at("beta2");
  ac.eps = f.optim.at("eps");
  ac.weight_decay = f.optim.at("weight_decay");
  dist::ParallelTrainer<T> trainer(f.cfg, grid, ac, 0);
  Model<T>& model = trainer.model();
  load_weights(f, model);
  HeadSum h;
  dist::LossHead<T> head;
  head.loss = [&](int m, const MicroBatch&, const Model<T>& mdl, T* dlogits) {
    const RlHeadStats s = head_of(f, m, mdl, dlogits);
    h.add(s);
    return s.loss;
  };
  head.replay = [&](int m) -> const RoutingTrace* {
    return f.micro[size_t(m)].has_replay ? &f.micro[size_t(m)].replay : nullptr;
  };
  {  // gradients at the initial weights through the trainer's exact reduction
    h = HeadSum{};
    const StepResult r = trainer.accumulate(f.batch, &head);
    compare_step(1, h, r.aux_loss, r.seq_aux_loss, r.z_loss, r.total_loss, "trainer accumulate ");
    close(r.loss, h.loss, "trainer accumulate loss = head loss");
    close(r.grad_norm, expected_scalar(f, "step1.grad_norm"), "trainer accumulate step1.grad_norm");
    compare_grads(model, "trainer ");
  }
  const double lr = f.optim.at("lr"), max_norm = f.optim.at("max_grad_norm");
  for (int k = 1; k <= f.steps; ++k) {
    h = HeadSum{};
    const StepResult r = trainer.step(f.batch, lr, max_norm, &head);
    ASSERT_FALSE(r.skipped) << "step " << k;
    const std::string p = "step" + std::to_string(k) + ".";
    compare_step(k, h, r.aux_loss, r.seq_aux_loss, r.z_loss, r.total_loss, "trainer ");
    close(r.loss, h.loss, "trainer " + p + "loss (StepResult)");
    close(r.grad_norm, expected_scalar(f, p + "grad_norm"), "trainer " + p + "grad_norm");
    for (int j = 0; j < f.cfg.num_moe_layers(); ++j) {
      const auto want = expected(f, p + "expert_counts." + std::to_string(f.cfg.first_k_dense_replace + j));
      for (int e = 0; e < f.cfg.E(); ++e)
        EXPECT_EQ(r.expert_counts[j][e], int64_t(want[e])) << p << "expert_counts layer " << j << " expert " << e;
    }
  }
  for (const auto& t : model.layout().tensors()) {
    const double err = tensor_err(model.params().data() + t.offset, expected(f, "final." + t.name));
    worst.weight = std::max(worst.weight, err);
    EXPECT_LT(err, tol_weight) << "final." << t.name;
  }
  for (int j = 0; j < f.cfg.num_moe_layers(); ++j) {
    const auto want = expected(f, "final." + ParamLayout::bias_name(f.cfg.first_k_dense_replace + j));
    for (int e = 0; e < f.cfg.E(); ++e)
      EXPECT_NEAR(model.expert_bias()[j][e], want[e], 1e-9) << "bias layer " << j << " expert " << e;
  }
  std::printf("[ rl parity ] %s (%s): worst relative error: losses %.2e, lp %.2e, gradients %.2e, weights after %d "
              "steps %.2e\n",
              name.c_str(), sizeof(T) == 8 ? "double" : "float", worst.loss, worst.lp, worst.grad, f.steps,
              worst.weight);
}

// Float weights after 2 AdamW steps: an element whose gradient is far below its tensor's
// scale gets float's gradient error (~1e-6 of that scale) amplified by AdamW's
// normalisation m / (sqrt(v) + eps) (by up to scale / (|g| + eps)); the worst element of
// these cases reaches ~2e-5 of the tensor's scale, so the bound is looser than for the
// gradients themselves.
constexpr double kFloatWeightTol = 5e-5;

const char* kTokenMean = "token_mean.token.beta0.04";
const char* kSeqMean = "seq_mean_token_mean.sequence.beta0";
const char* kReplaySigmoid = "token_mean.sequence.beta0.04.replay";
const char* kReplaySoftmax = "seq_mean_token_sum_norm.token.beta0.04.replay";

}  // namespace

TEST(RlParity, TokenMeanTokenKlDouble) { check_case<double>(kTokenMean, 1e-10, 1e-9, 1e-9); }
TEST(RlParity, TokenMeanTokenKlFloat) { check_case<float>(kTokenMean, 2e-5, 2e-5, kFloatWeightTol); }
TEST(RlParity, SeqMeanSequenceDouble) { check_case<double>(kSeqMean, 1e-10, 1e-9, 1e-9); }
TEST(RlParity, SeqMeanSequenceFloat) { check_case<float>(kSeqMean, 2e-5, 2e-5, kFloatWeightTol); }
TEST(RlParity, ReplaySigmoidSequenceKlDouble) { check_case<double>(kReplaySigmoid, 1e-10, 1e-9, 1e-9); }
TEST(RlParity, ReplaySigmoidSequenceKlFloat) { check_case<float>(kReplaySigmoid, 2e-5, 2e-5, kFloatWeightTol); }
TEST(RlParity, ReplaySoftmaxSumNormKlDouble) { check_case<double>(kReplaySoftmax, 1e-10, 1e-9, 1e-9); }
TEST(RlParity, ReplaySoftmaxSumNormKlFloat) { check_case<float>(kReplaySoftmax, 2e-5, 2e-5, kFloatWeightTol); }
// Every case of batch.json has a test above.
TEST(RlParity, EveryCaseIsTested) {
  const json all = load_batch_file();
  std::vector<std::string> names;
  for (const auto& c : all.at("cases")) names.push_back(c.at("name").get<std::string>());
  EXPECT_EQ(names, (std::vector<std::string>{kTokenMean, kSeqMean, kReplaySigmoid, kReplaySoftmax}));
}
