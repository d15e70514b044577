// Muon (MODEL.md section 12; optim/muon.hpp, optim/optimizer.hpp). Newton-Schulz and
// 3 optimizer steps over a tiny model's tensors are checked against the numpy/torch
// values of tests/reference/muon_fixture.py (tests/fixtures/optim_muon.json); the
// Muon/AdamW split, the keys, the checkpoint names and exact resume through
// run_training are checked here.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "io/checkpoint.hpp"
#include "io/safetensors.hpp"
#include "moe/config.hpp"
#include "moe/error.hpp"
#include "moe/model.hpp"
#include "moe/params.hpp"
#include "optim/adamw.hpp"
#include "optim/muon.hpp"
#include "optim/optimizer.hpp"
#include "test_util.hpp"
#include "train/run_config.hpp"
#include "train/step.hpp"
#include "train/synthetic.hpp"
#include "train/trainer.hpp"

using namespace moetune;
using namespace moetune::testing;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

const json& fixture() {
  static const json j = [] {
    const std::string path = std::string(MOETUNE_SOURCE_DIR) + "/tests/fixtures/optim_muon.json";
    std::ifstream in(path);
    if (!in) throw std::runtime_error("cannot open " + path + " (run tests/reference/muon_fixture.py)");
    return json::parse(in);
  }();
  return j;
}

ModelConfig fixture_config() { return ModelConfig::from_json(fixture().at("model_config"), "optim_muon.json"); }

OptimizerConfig fixture_optimizer() {
  const json& a = fixture().at("adamw");
  const json& m = fixture().at("muon");
  OptimizerConfig c;
  c.name = "muon";
  c.adamw.beta1 = a.at("beta1").get<double>();
  c.adamw.beta2 = a.at("beta2").get<double>();
  c.adamw.eps = a.at("eps").get<double>();
  c.adamw.weight_decay = a.at("weight_decay").get<double>();
  c.muon.momentum = m.at("momentum").get<double>();
  c.muon.weight_decay = m.at("weight_decay").get<double>();
  c.muon.lr_ratio = m.at("lr_ratio").get<double>();
  return c;
}

const json& fixture_tensor(const std::string& name) {
  for (const json& t : fixture().at("tensors"))
    if (t.at("name") == name) return t;
  throw std::runtime_error("fixture has no tensor " + name);
}

template <class T>
void put(std::vector<T>& buf, const TensorInfo& ti, const json& values) {
  ASSERT_EQ(values.size(), ti.numel) << ti.name;
  for (size_t i = 0; i < ti.numel; ++i) buf[ti.offset + i] = static_cast<T>(values[i].get<double>());
}

// max |got - want| / max |want| over n values (error relative to the tensor's scale);
// returns it and checks it against tol.
template <class T>
double expect_near(const T* got, const json& want, size_t n, double tol, const std::string& what) {
  EXPECT_EQ(want.size(), n) << what;
  double scale = 0, worst = 0;
  size_t at = 0;
  for (size_t i = 0; i < n; ++i) scale = std::max(scale, std::abs(want[i].get<double>()));
  for (size_t i = 0; i < n; ++i) {
    const double e = std::abs(double(got[i]) - want[i].get<double>());
    if (e > worst) worst = e, at = i;
  }
  EXPECT_LE(worst, tol * scale) << what << "[" << at << "]: got " << double(got[at]) << ", reference "
                                << want[at].get<double>() << " (scale " << scale << ")";
  return scale > 0 ? worst / scale : worst;
}

template <class T>
void ns_matches(const std::string& dtype, double tol) {
  double worst = 0;
  for (const json& c : fixture().at("ns")) {
    const int64_t r = c.at("rows").get<int64_t>(), k = c.at("cols").get<int64_t>();
    std::vector<T> x;
    for (const json& v : c.at("input")) x.push_back(static_cast<T>(v.get<double>()));
    std::vector<T> work;
    newton_schulz(x.data(), r, k, work);
    worst = std::max(worst, expect_near(x.data(), c.at(dtype), x.size(), tol,
                                        dtype + " NS " + std::to_string(r) + "x" + std::to_string(k)));
  }
  std::printf("[ NS %s ] worst relative error vs numpy: %.3g\n", dtype.c_str(), worst);
}

// The fixture's 3 steps (clip, then Muon + AdamW) in precision T: every parameter after
// every step, the final state (momentum of Muon matrices, AdamW moments of the rest).
template <class T>
void replay(const std::string& dtype, double tol) {
  const json& f = fixture();
  const json& want = f.at("expected").at(dtype);
  const ParamLayout layout = ParamLayout::build(fixture_config());
  const std::vector<double> lrs = f.at("lr").get<std::vector<double>>();
  const double max_norm = f.at("max_grad_norm").get<double>();
  std::vector<T> params(layout.total(), T(0));
  for (const TensorInfo& ti : layout.tensors()) put(params, ti, fixture_tensor(ti.name).at("init"));
  Optimizer<T> opt(layout, fixture_optimizer());
  Optimizer<T> fused(layout, fixture_optimizer());  // the clip inside the update: the same bits
  std::vector<T> fused_params = params;
  double worst = 0;
  for (size_t s = 0; s < lrs.size(); ++s) {
    std::vector<T> grads(layout.total(), T(0));
    for (const TensorInfo& ti : layout.tensors()) put(grads, ti, fixture_tensor(ti.name).at("grads")[s]);
    const double norm = global_grad_norm(grads);
    EXPECT_NEAR(norm, want.at("grad_norm")[s].get<double>(), 1e-6 * norm);
    fused.step(fused_params, grads, lrs[s], clip_coefficient(norm, max_norm));
    scale_grads(grads, clip_coefficient(norm, max_norm));
    opt.step(params, grads, lrs[s]);
    EXPECT_EQ(0, std::memcmp(params.data(), fused_params.data(), params.size() * sizeof(T))) << dtype << " step " << s + 1;
    for (const TensorInfo& ti : layout.tensors())
      worst = std::max(worst, expect_near(params.data() + ti.offset, want.at("params").at(ti.name)[s], ti.numel, tol,
                                          dtype + " step " + std::to_string(s + 1) + " " + ti.name));
  }
  const std::vector<T> v = opt.exp_avg_sq();  // unpacked: zero over the Muon matrices
  for (const TensorInfo& ti : layout.tensors()) {
    expect_near(opt.exp_avg().data() + ti.offset, want.at("exp_avg").at(ti.name), ti.numel, tol,
                dtype + " state " + ti.name);
    if (want.at("exp_avg_sq").contains(ti.name))
      expect_near(v.data() + ti.offset, want.at("exp_avg_sq").at(ti.name), ti.numel, tol,
                  dtype + " exp_avg_sq " + ti.name);
    else
      for (size_t i = 0; i < ti.numel; ++i) ASSERT_EQ(v[ti.offset + i], T(0)) << ti.name;
  }
  // Only the AdamW tensors hold a second moment.
  size_t adamw = 0;
  for (const TensorInfo& ti : layout.tensors()) adamw += is_muon_tensor(ti) ? 0 : ti.numel;
  EXPECT_EQ(opt.state_elements(), layout.total() + adamw);
  std::printf("[ Muon %s ] worst relative parameter error vs reference over 3 steps: %.3g\n", dtype.c_str(), worst);
}

ModelConfig tiny_model() {
  return ModelConfig::from_json({{"vocab_size", 32},
                                 {"hidden_size", 16},
                                 {"num_hidden_layers", 2},
                                 {"num_attention_heads", 2},
                                 {"n_routed_experts", 4},
                                 {"num_experts_per_tok", 2},
                                 {"n_shared_experts", 1},
                                 {"max_position_embeddings", 32},
                                 {"initializer_range", 0.1}});
}

}  // namespace

TEST(Muon, NewtonSchulzDoubleMatchesNumpy) { ns_matches<double>("float64", 1e-12); }
TEST(Muon, NewtonSchulzFloatMatchesNumpy) { ns_matches<float>("float32", 1e-5); }

TEST(Muon, NewtonSchulzOrthogonalisesAndKeepsZero) {
  // A 12 x 40 matrix (and its transpose) comes out with singular values near 1: X X^T
  // close to the identity (the quintic's fixed band, then two cubic steps).
  std::mt19937_64 g(3);
  std::normal_distribution<double> nd;
  for (bool tall : {false, true}) {
    const int64_t r = tall ? 40 : 12, c = tall ? 12 : 40, s = 12;
    std::vector<double> x(size_t(r * c)), work;
    for (auto& v : x) v = nd(g);
    newton_schulz(x.data(), r, c, work);
    for (int64_t i = 0; i < s; ++i)
      for (int64_t j = 0; j < s; ++j) {
        double dot = 0;
        for (int64_t k = 0; k < (tall ? r : c); ++k)
          dot += tall ? x[size_t(k * c + i)] * x[size_t(k * c + j)] : x[size_t(i * c + k)] * x[size_t(j * c + k)];
        EXPECT_NEAR(dot, i == j ? 1.0 : 0.0, 0.1) << (tall ? "tall" : "wide") << " (" << i << ", " << j << ")";
      }
  }
  std::vector<float> zero(15, 0.0f), work;
  newton_schulz(zero.data(), 3, 5, work);
  for (float v : zero) EXPECT_EQ(v, 0.0f);  // NS(0) = 0, not NaN
}

TEST(Muon, NewtonSchulzDoesNotDependOnTheThreadCount) {
  std::mt19937_64 g(5);
  std::normal_distribution<float> nd;
  std::vector<float> x(64 * 96);
  for (auto& v : x) v = nd(g);
  std::vector<float> a = x, b = x, work;
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  newton_schulz(a.data(), 64, 96, work);
  omp_set_num_threads(std::max(2, threads));
  newton_schulz(b.data(), 64, 96, work);
  omp_set_num_threads(threads);
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0);
}

TEST(Muon, DoubleStepsMatchReference) { replay<double>("float64", 1e-9); }
TEST(Muon, FloatStepsMatchReference) { replay<float>("float32", 1e-5); }

// Rank-2 matrices except the embedding and the LM head get Muon: attention, dense FFN,
// router, every routed expert's matrices, the shared expert. Norms, embedding and head
// get AdamW. The fixture's own list agrees.
TEST(Muon, MatricesGetMuonTheRestAdamW) {
  const ParamLayout layout = ParamLayout::build(tiny_model());
  int muon = 0, adamw = 0;
  for (const TensorInfo& t : layout.tensors()) {
    const bool want = t.shape.size() == 2 && t.name != "model.embed_tokens.weight" && t.name != "lm_head.weight";
    EXPECT_EQ(is_muon_tensor(t), want) << t.name;
    (want ? muon : adamw) += 1;
  }
  EXPECT_TRUE(is_muon_tensor(layout.at("model.layers.1.mlp.gate.weight")));  // the router
  EXPECT_TRUE(is_muon_tensor(layout.at("model.layers.1.mlp.experts.3.down_proj.weight")));
  EXPECT_TRUE(is_muon_tensor(layout.at("model.layers.1.mlp.shared_experts.up_proj.weight")));
  EXPECT_FALSE(is_muon_tensor(layout.at("model.embed_tokens.weight")));
  EXPECT_FALSE(is_muon_tensor(layout.at("lm_head.weight")));
  EXPECT_FALSE(is_muon_tensor(layout.at("model.norm.weight")));
  EXPECT_GT(muon, 0);
  EXPECT_GT(adamw, 0);
  OptimizerConfig adam;
  for (const TensorInfo& t : layout.tensors()) EXPECT_FALSE(uses_muon(adam, t)) << t.name;
  for (const json& t : fixture().at("tensors"))
    EXPECT_EQ(is_muon_tensor(ParamLayout::build(fixture_config()).at(t.at("name").get<std::string>())),
              t.at("muon").get<bool>())
        << t.at("name");
}

// Optimizer with optim.name "adamw" is AdamW, bit for bit (one implementation).
TEST(Muon, AdamWNameIsTheAdamWOptimizer) {
  const ParamLayout layout = ParamLayout::build(tiny_model());
  std::mt19937_64 g(1);
  std::normal_distribution<float> nd;
  std::vector<float> p(layout.total(), 0.0f), q;
  for (auto& v : p) v = nd(g);
  q = p;
  OptimizerConfig oc;
  oc.adamw.weight_decay = 0.1;
  AdamW<float> a(layout, oc.adamw);
  Optimizer<float> b(layout, oc);
  for (int s = 0; s < 3; ++s) {
    std::vector<float> grad(layout.total());
    for (auto& v : grad) v = 0.1f * nd(g);
    a.step(p, grad, 1e-2);
    b.step(q, grad, 1e-2);
  }
  EXPECT_EQ(p, q);
  EXPECT_EQ(a.exp_avg(), b.exp_avg());
  EXPECT_EQ(a.exp_avg_sq(), b.exp_avg_sq());
}

// A whole train_step with Muon on a tiny model: finite, lowers the loss of its batch,
// and has no exp_avg_sq on the Muon matrices (zero when unpacked).
TEST(Muon, TrainStepLowersTheLoss) {
  const ModelConfig cfg = tiny_model();
  Model<float> m(cfg);
  m.init(4);
  OptimizerConfig oc;
  oc.name = "muon";
  Optimizer<float> opt(m.layout(), oc);
  const auto batch = std::vector<MicroBatch>{make_batch(4, 8, cfg.vocab_size, 11)};
  const StepResult first = train_step(m, opt, batch, 2e-2, 1.0);
  StepResult last = first;
  for (int s = 0; s < 4; ++s) last = train_step(m, opt, batch, 2e-2, 1.0);
  EXPECT_FALSE(last.skipped);
  EXPECT_LT(last.loss, first.loss);
  const std::vector<float> v = opt.exp_avg_sq();
  for (const TensorInfo& t : m.layout().tensors()) {
    if (!is_muon_tensor(t)) continue;
    for (size_t i = 0; i < t.numel; ++i) ASSERT_EQ(v[t.offset + i], 0.0f) << t.name;
  }
}

TEST(Muon, BadConfigNamesTheKey) {
  MuonConfig c;
  c.momentum = 1.0;
  EXPECT_CONTAINS(error_of([&] { validate(c); }), "optim.muon_momentum");
  c = MuonConfig{};
  c.momentum = -0.1;
  EXPECT_CONTAINS(error_of([&] { validate(c); }), "optim.muon_momentum");
  c = MuonConfig{};
  c.weight_decay = -1;
  EXPECT_CONTAINS(error_of([&] { validate(c); }), "optim.muon_weight_decay");
  c = MuonConfig{};
  c.lr_ratio = 0;
  EXPECT_CONTAINS(error_of([&] { validate(c); }), "optim.muon_lr");
  OptimizerConfig o;
  o.name = "sgd";
  EXPECT_CONTAINS(error_of([&] { validate(o); }), "optim.name");
  EXPECT_EQ(error_of([&] { validate(OptimizerConfig{}); }), kNoError);
  // Through the run configuration.
  for (const auto& set_key : std::vector<std::pair<std::string, std::string>>{
           {"optim.name=\"lion\"", "optim.name"},
           {"optim.muon_momentum=1", "optim.muon_momentum"},
           {"optim.muon_momentum=-0.5", "optim.muon_momentum"},
           {"optim.muon_weight_decay=-0.1", "optim.muon_weight_decay"},
           {"optim.muon_lr=-1", "optim.muon_lr"}}) {
    const std::string& set = set_key.first;  // (clang 14 cannot capture a structured binding)
    RunConfig rc;
    EXPECT_CONTAINS(error_of([&] { rc.set(set); }), "key '" + set_key.second + "'");
  }
  RunConfig rc;
  rc.set("optim.name=muon");
  rc.set("optim.lr=0.002");
  rc.set("optim.muon_lr=0.02");
  rc.set("optim.muon_momentum=0.9");
  const OptimizerConfig oc = rc.optimizer_config();
  EXPECT_EQ(oc.name, "muon");
  EXPECT_DOUBLE_EQ(oc.muon.lr_ratio, 10.0);
  EXPECT_DOUBLE_EQ(oc.muon.momentum, 0.9);
  EXPECT_EQ(RunConfig{}.optimizer_config().name, "adamw");
  EXPECT_EQ(RunConfig{}.optimizer_config().muon.lr_ratio, 1.0);  // muon_lr 0 = optim.lr
}

// Checkpoint names: "<param>.momentum_buffer" for a Muon matrix, ".exp_avg"/".exp_avg_sq"
// for the rest; metadata "optimizer". Loading with the other optimizer names optim.name.
TEST(Muon, CheckpointNamesAndOptimizerMismatch) {
  const ModelConfig cfg = tiny_model();
  const ParamLayout layout = ParamLayout::build(cfg);
  std::vector<float> p(layout.total(), 0.0f), m(layout.total(), 0.0f), v(layout.total(), 0.0f);
  for (const TensorInfo& t : layout.tensors())
    for (size_t i = 0; i < t.numel; ++i) {
      p[t.offset + i] = 0.01f * float(i % 7);
      m[t.offset + i] = 0.001f * float(i % 5);
      v[t.offset + i] = is_muon_tensor(t) ? 0.0f : 0.002f * float(i % 3);
    }
  const std::vector<std::vector<float>> bias(cfg.num_moe_layers(), std::vector<float>(cfg.E(), 0.0f));
  const std::string dir = test_path("muon_ckpt");
  CheckpointWriteOptions wo;
  wo.optimizer = "muon";
  save_checkpoint<float>(dir, cfg, layout, p, bias, &m, &v, 4, json::object(), wo);
  SafetensorsReader r((fs::path(dir) / "optimizer.safetensors").string());
  EXPECT_EQ(r.metadata().at("optimizer"), "muon");
  EXPECT_TRUE(r.contains("model.layers.0.self_attn.q_proj.weight.momentum_buffer"));
  EXPECT_TRUE(r.contains("model.layers.1.mlp.experts.2.gate_proj.weight.momentum_buffer"));
  EXPECT_TRUE(r.contains("model.layers.1.mlp.gate.weight.momentum_buffer"));
  EXPECT_FALSE(r.contains("model.layers.0.self_attn.q_proj.weight.exp_avg"));
  EXPECT_FALSE(r.contains("model.layers.0.self_attn.q_proj.weight.exp_avg_sq"));
  EXPECT_TRUE(r.contains("model.embed_tokens.weight.exp_avg"));
  EXPECT_TRUE(r.contains("lm_head.weight.exp_avg_sq"));
  EXPECT_TRUE(r.contains("model.norm.weight.exp_avg_sq"));
  std::vector<float> m2, v2;
  int64_t step = 0;
  ASSERT_TRUE(load_optimizer_state<float>(dir, layout, m2, v2, step, "muon"));
  EXPECT_EQ(m2, m);
  EXPECT_EQ(v2, v);
  EXPECT_EQ(step, 4);
  const std::string e1 = error_of([&] { load_optimizer_state<float>(dir, layout, m2, v2, step); });
  EXPECT_CONTAINS(e1, "key 'optim.name' = \"adamw\"");
  EXPECT_CONTAINS(e1, "written by optim.name = \"muon\"");
  const std::string adam_dir = test_path("adamw_ckpt");
  save_checkpoint<float>(adam_dir, cfg, layout, p, bias, &m, &v, 4, json::object());
  const std::string e2 = error_of([&] { load_optimizer_state<float>(adam_dir, layout, m2, v2, step, "muon"); });
  EXPECT_CONTAINS(e2, "key 'optim.name' = \"muon\"");
}

// run_training with optim.name = "muon": resuming from the step-3 checkpoint gives the
// uninterrupted run's final weights and optimizer state bit for bit; resuming it with
// AdamW is refused naming optim.name.
TEST(Muon, ResumeIsExact) {
  const fs::path dir = test_dir();
  write_synthetic_jsonl((dir / "data.jsonl").string(), 200, 32, 12, 32, 3);
  auto config = [&](const std::string& name) {
    return RunConfig::from_json(
        {{"model",
          {{"vocab_size", 32}, {"hidden_size", 16}, {"num_hidden_layers", 2}, {"num_attention_heads", 2},
           {"n_routed_experts", 4}, {"num_experts_per_tok", 2}, {"max_position_embeddings", 32}}},
         {"data", {{"train", (dir / "data.jsonl").string()}, {"seq_len", 16}}},
         {"train", {{"steps", 6}, {"micro_batch_size", 4}, {"seed", 2}, {"save_every", 3}, {"threads", 1}}},
         {"optim", {{"lr", 1e-2}, {"name", name}, {"muon_lr", 2e-2}, {"warmup_steps", 2}}}},
        "test", "");
  };
  TrainOptions a;
  a.out_dir = (dir / "a").string();
  a.progress = false;
  a.peak_gflops = 100;
  const TrainSummary sa = run_training(config("muon"), a);
  EXPECT_EQ(sa.steps, 6);
  const std::string mid = (dir / "a" / "step-00000003").string();
  ASSERT_TRUE(fs::exists(mid)) << mid;
  TrainOptions b = a;
  b.out_dir = (dir / "b").string();
  b.resume_from = mid;
  const TrainSummary sb = run_training(config("muon"), b);
  // Every model and optimizer file (shards and indexes) of the two final checkpoints.
  int compared = 0;
  for (const auto& e : fs::directory_iterator(sa.final_checkpoint)) {
    const std::string name = e.path().filename().string();
    if (name.find(".safetensors") == std::string::npos) continue;
    EXPECT_EQ(read_text(e.path()), read_text(fs::path(sb.final_checkpoint) / name)) << name;
    ++compared;
  }
  EXPECT_GE(compared, 2);
  TrainOptions c = a;
  c.out_dir = (dir / "c").string();
  c.resume_from = mid;
  EXPECT_CONTAINS(error_of([&] { run_training(config("adamw"), c); }), "optim.name");
}
