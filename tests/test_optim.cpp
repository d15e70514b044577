// AdamW, gradient clipping and learning-rate schedules. The AdamW steps are checked
// against torch.optim.AdamW + clip_grad_norm_ values written by
// tests/reference/optim_fixture.py into tests/fixtures/optim_adamw.json.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <numbers>
#include <random>
#include <string>
#include <vector>

#include "moe/config.hpp"
#include "moe/error.hpp"
#include "moe/params.hpp"
#include "optim/adamw.hpp"
#include "optim/schedule.hpp"
#include "test_util.hpp"

using namespace moetune;
using namespace moetune::testing;
using nlohmann::json;

namespace {

const json& fixture() {
  static const json j = [] {
    const std::string path = std::string(MOETUNE_SOURCE_DIR) + "/tests/fixtures/optim_adamw.json";
    std::ifstream in(path);
    if (!in) throw std::runtime_error("cannot open " + path + " (run tests/reference/optim_fixture.py)");
    return json::parse(in);
  }();
  return j;
}

ModelConfig fixture_config() { return ModelConfig::from_json(fixture().at("model_config"), "optim_adamw.json"); }

AdamWConfig fixture_adamw() {
  const json& a = fixture().at("adamw");
  AdamWConfig c;
  c.beta1 = a.at("beta1").get<double>();
  c.beta2 = a.at("beta2").get<double>();
  c.eps = a.at("eps").get<double>();
  c.weight_decay = a.at("weight_decay").get<double>();
  return c;
}

const json& fixture_tensor(const std::string& name) {
  for (const json& t : fixture().at("tensors"))
    if (t.at("name") == name) return t;
  throw std::runtime_error("fixture has no tensor " + name);
}

// Copies a list of numbers into buf at the tensor's offset (shape (numel) flat, row-major).
template <class T>
void put(std::vector<T>& buf, const TensorInfo& ti, const json& values) {
  ASSERT_EQ(values.size(), ti.numel) << ti.name;
  for (size_t i = 0; i < ti.numel; ++i) buf[ti.offset + i] = static_cast<T>(values[i].get<double>());
}

// max |got - want| / max |want| over one tensor must be <= tol (error relative to the
// tensor's scale, so an element that happens to be near 0 is not judged on its own).
template <class T>
void expect_tensor_near(const std::vector<T>& buf, const TensorInfo& ti, const json& want, double tol,
                        const std::string& what) {
  ASSERT_EQ(want.size(), ti.numel) << what;
  double scale = 0.0, worst = 0.0;
  size_t worst_i = 0;
  for (size_t i = 0; i < ti.numel; ++i) scale = std::max(scale, std::abs(want[i].get<double>()));
  for (size_t i = 0; i < ti.numel; ++i) {
    const double err = std::abs(static_cast<double>(buf[ti.offset + i]) - want[i].get<double>());
    if (err > worst) worst = err, worst_i = i;
  }
  EXPECT_LE(worst, tol * scale) << what << " " << ti.name << "[" << worst_i << "]: got "
                                << static_cast<double>(buf[ti.offset + worst_i]) << ", torch "
                                << want[worst_i].get<double>() << " (scale " << scale << ")";
}

// Replays the fixture's 5 steps (clip, then AdamW) in precision T and compares the
// grad norm, every parameter after every step, and the final moments with torch's.
template <class T>
void replay_fixture(const std::string& dtype, double tol) {
  const json& f = fixture();
  const json& want = f.at("expected").at(dtype);
  const ParamLayout layout = ParamLayout::build(fixture_config());
  const double max_norm = f.at("max_grad_norm").get<double>();
  const std::vector<double> lrs = f.at("lr").get<std::vector<double>>();

  std::vector<T> params(layout.total(), T(0));
  for (const TensorInfo& ti : layout.tensors()) put(params, ti, fixture_tensor(ti.name).at("init"));
  AdamW<T> opt(layout, fixture_adamw());
  // The same steps with the clip applied inside the update (what the trainers run):
  // the same bits as scaling the gradients first.
  AdamW<T> fused(layout, fixture_adamw());
  std::vector<T> fused_params = params;
  int clipped = 0;
  for (size_t s = 0; s < lrs.size(); ++s) {
    std::vector<T> grads(layout.total(), T(0));
    for (const TensorInfo& ti : layout.tensors()) put(grads, ti, fixture_tensor(ti.name).at("grads")[s]);
    const double norm = global_grad_norm(grads);
    const double torch_norm = want.at("grad_norm")[s].get<double>();
    EXPECT_LE(std::abs(norm - torch_norm), tol * torch_norm) << dtype << " step " << s + 1;
    const double coef = clip_coefficient(norm, max_norm);
    clipped += coef < 1.0;
    fused.step(fused_params, grads, lrs[s], coef);
    scale_grads(grads, coef);
    opt.step(params, grads, lrs[s]);
    EXPECT_EQ(0, std::memcmp(params.data(), fused_params.data(), params.size() * sizeof(T))) << dtype << " step " << s + 1;
    EXPECT_EQ(opt.step_count(), static_cast<int64_t>(s + 1));
    for (const TensorInfo& ti : layout.tensors())
      expect_tensor_near(params, ti, want.at("params").at(ti.name)[s], tol,
                         dtype + " step " + std::to_string(s + 1) + " param");
  }
  EXPECT_EQ(clipped, 2) << "the fixture is built so that steps 2 and 4 are clipped";
  for (const TensorInfo& ti : layout.tensors()) {
    expect_tensor_near(opt.exp_avg(), ti, want.at("exp_avg").at(ti.name), tol, dtype + " exp_avg");
    expect_tensor_near(opt.exp_avg_sq(), ti, want.at("exp_avg_sq").at(ti.name), tol, dtype + " exp_avg_sq");
  }
}

ScheduleConfig sched(const std::string& kind, double lr, int64_t warmup, int64_t total, double r) {
  ScheduleConfig s;
  s.kind = kind;
  s.lr = lr;
  s.warmup_steps = warmup;
  s.total_steps = total;
  s.min_lr_ratio = r;
  return s;
}

}  // namespace

TEST(Optim, FixtureLayoutMatchesParamLayout) {
  // The script lists the tensors of the tiny config in ParamLayout's order; if the
  // layout code changes, regenerate the fixture.
  const ParamLayout layout = ParamLayout::build(fixture_config());
  const json& tensors = fixture().at("tensors");
  ASSERT_EQ(tensors.size(), layout.tensors().size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const TensorInfo& ti = layout.tensors()[i];
    EXPECT_EQ(tensors[i].at("name").get<std::string>(), ti.name);
    EXPECT_EQ(tensors[i].at("shape").get<std::vector<int64_t>>(), ti.shape) << ti.name;
    EXPECT_EQ(tensors[i].at("decay").get<bool>(), ti.decay) << ti.name;
  }
}

TEST(Optim, AdamWDoubleMatchesTorch) { replay_fixture<double>("float64", 1e-12); }

TEST(Optim, AdamWFloatMatchesTorch) { replay_fixture<float>("float32", 1e-6); }

TEST(Optim, ZeroGradientStillDecays) {
  // MODEL.md 8.7: with g = 0 and fresh moments the Adam update is 0 / (0 + eps) = 0,
  // so a decay tensor becomes exactly p * (1 - lr*wd) and a norm weight is unchanged.
  const ParamLayout layout = ParamLayout::build(fixture_config());
  AdamWConfig cfg;
  cfg.weight_decay = 0.1;
  AdamW<double> opt(layout, cfg);
  std::vector<double> params(layout.total(), 0.0), grads(layout.total(), 0.0);
  for (const TensorInfo& ti : layout.tensors())
    for (size_t i = 0; i < ti.numel; ++i) params[ti.offset + i] = 0.5 + 0.01 * static_cast<double>(i);
  const std::vector<double> before = params;
  const double lr = 0.02;
  opt.step(params, grads, lr);
  for (const TensorInfo& ti : layout.tensors())
    for (size_t i = 0; i < ti.numel; ++i) {
      const double p0 = before[ti.offset + i];
      EXPECT_EQ(params[ti.offset + i], ti.decay ? p0 * (1.0 - lr * 0.1) : p0) << ti.name << "[" << i << "]";
    }
}

TEST(Optim, PaddingBetweenTensorsIsNeverTouched) {
  const ParamLayout layout = ParamLayout::build(fixture_config());
  std::vector<bool> inside(layout.total(), false);
  for (const TensorInfo& ti : layout.tensors())
    for (size_t i = 0; i < ti.numel; ++i) inside[ti.offset + i] = true;
  const auto padding = std::count(inside.begin(), inside.end(), false);
  ASSERT_GT(padding, 0) << "the tiny layout should have alignment gaps";

  AdamWConfig cfg;
  cfg.weight_decay = 0.1;
  AdamW<float> opt(layout, cfg);
  std::vector<float> params(layout.total(), 0.0f), grads(layout.total(), 0.0f);
  for (size_t i = 0; i < grads.size(); ++i) {
    grads[i] = inside[i] ? 0.25f : 7.0f;  // garbage in the gradient's padding
    params[i] = inside[i] ? 1.0f : 0.0f;
  }
  for (int s = 0; s < 3; ++s) opt.step(params, grads, 1e-2);
  for (size_t i = 0; i < params.size(); ++i) {
    if (inside[i]) {
      EXPECT_NE(params[i], 1.0f) << i;
      continue;
    }
    EXPECT_EQ(params[i], 0.0f) << "padding element " << i;
    EXPECT_EQ(opt.exp_avg()[i], 0.0f) << "padding element " << i;
    EXPECT_EQ(opt.exp_avg_sq()[i], 0.0f) << "padding element " << i;
  }
}

TEST(Optim, StepRejectsWrongBufferSize) {
  const ParamLayout layout = ParamLayout::build(fixture_config());
  AdamW<double> opt(layout, AdamWConfig{});
  std::vector<double> params(layout.total()), grads(layout.total() - 1);
  EXPECT_THROW(opt.step(params, grads, 1e-3), Error);
  EXPECT_EQ(opt.step_count(), 0);
}

TEST(Optim, ConfigValidationNamesKey) {
  AdamWConfig c;
  c.beta1 = 1.0;
  EXPECT_NE(error_of([&] { validate(c); }).find("'optim.beta1'"), std::string::npos);
  c = AdamWConfig{};
  c.beta2 = -0.1;
  EXPECT_NE(error_of([&] { validate(c); }).find("'optim.beta2'"), std::string::npos);
  c = AdamWConfig{};
  c.eps = -1;
  EXPECT_NE(error_of([&] { validate(c); }).find("'optim.eps'"), std::string::npos);
  c = AdamWConfig{};
  c.weight_decay = std::numeric_limits<double>::quiet_NaN();
  EXPECT_NE(error_of([&] { validate(c); }).find("'optim.weight_decay'"), std::string::npos);
  EXPECT_EQ(error_of([&] { validate(AdamWConfig{}); }), kNoError);
}

TEST(Optim, GradNormIndependentOfThreadCount) {
  // Several chunks, a ragged tail, values of mixed magnitude.
  std::mt19937_64 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> g((1 << 17) * 3 + 13);
  for (size_t i = 0; i < g.size(); ++i) g[i] = normal(rng) * (i % 3 == 0 ? 1e3f : 1e-3f);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const double n1 = global_grad_norm(g);
  omp_set_num_threads(2);
  const double n2 = global_grad_norm(g);
  omp_set_num_threads(3);
  const double n3 = global_grad_norm(g);
  omp_set_num_threads(saved);
  EXPECT_EQ(std::memcmp(&n1, &n2, sizeof n1), 0) << n1 << " vs " << n2;
  EXPECT_EQ(std::memcmp(&n1, &n3, sizeof n1), 0) << n1 << " vs " << n3;
  long double ref = 0;  // plain sequential sum as a sanity check of the value
  for (float x : g) ref += static_cast<long double>(x) * x;
  EXPECT_NEAR(n1, std::sqrt(static_cast<double>(ref)), 1e-12 * n1);
}

TEST(Optim, GradNormSmallCase) {
  const std::vector<double> g = {3.0, 0.0, -4.0, 12.0};  // sqrt(9 + 16 + 144) = 13
  EXPECT_EQ(global_grad_norm(g), 13.0);
  EXPECT_EQ(global_grad_norm(std::vector<float>{}), 0.0);
}

TEST(Optim, ClipCoefficientCases) {
  EXPECT_EQ(clip_coefficient(0.5, 1.0), 1.0);                  // below the limit
  EXPECT_EQ(clip_coefficient(0.0, 1.0), 1.0);                  // zero gradient
  EXPECT_EQ(clip_coefficient(4.0, 1.0), 1.0 / (4.0 + 1e-6));   // clipped: max/(norm+1e-6)
  EXPECT_EQ(clip_coefficient(1.0, 1.0), 1.0 / (1.0 + 1e-6));   // at the limit, the 1e-6 still clips
  EXPECT_EQ(clip_coefficient(1e9, 0.0), 1.0);                  // max_norm 0: off
  EXPECT_EQ(clip_coefficient(1e9, -1.0), 1.0);                 // negative: off
  EXPECT_EQ(clip_coefficient(std::numeric_limits<double>::infinity(), 1.0), 0.0);
  EXPECT_TRUE(std::isnan(clip_coefficient(std::numeric_limits<double>::quiet_NaN(), 1.0)));
}

TEST(Optim, ScaleGrads) {
  std::vector<float> g = {1.0f, -2.0f, 0.5f};
  scale_grads(g, 0.25);
  EXPECT_EQ(g, (std::vector<float>{0.25f, -0.5f, 0.125f}));
  scale_grads(g, 1.0);
  EXPECT_EQ(g, (std::vector<float>{0.25f, -0.5f, 0.125f}));
  // After clipping, the norm is max_norm (up to the 1e-6 of clip_grad_norm_).
  std::vector<double> h = {30.0, -40.0};
  scale_grads(h, clip_coefficient(global_grad_norm(h), 5.0));
  EXPECT_NEAR(global_grad_norm(h), 5.0, 1e-6);
}

TEST(Schedule, WarmupStartAndEnd) {
  const auto s = sched("cosine", 1e-3, 10, 110, 0.1);
  EXPECT_DOUBLE_EQ(lr_at(s, 1), 1e-4);  // lr * 1/10: the first step is never 0
  EXPECT_DOUBLE_EQ(lr_at(s, 5), 5e-4);
  EXPECT_EQ(lr_at(s, 10), 1e-3);  // exactly lr at t = warmup
  EXPECT_LT(lr_at(s, 11), 1e-3);  // decay starts right after
  EXPECT_GT(lr_at(s, 11), 0.99e-3);
}

TEST(Schedule, CosineMidpointAndEnd) {
  const auto s = sched("cosine", 1e-3, 10, 110, 0.1);
  // t = 60: p = 50/100 = 0.5, cos(pi/2) = 0: lr * (0.1 + 0.9 * 0.5) = 0.55e-3.
  EXPECT_NEAR(lr_at(s, 60), 0.55e-3, 1e-18);
  // p = 0.25: lr * (0.1 + 0.9 * 0.5 * (1 + cos(pi/4))).
  EXPECT_NEAR(lr_at(s, 35), 1e-3 * (0.1 + 0.45 * (1 + std::sqrt(0.5))), 1e-18);
  EXPECT_EQ(lr_at(s, 110), 0.1 * 1e-3);  // ends exactly at min_lr_ratio * lr
  EXPECT_EQ(lr_at(s, 500), 0.1 * 1e-3);  // and stays there
  for (int64_t t = 11; t <= 110; ++t) EXPECT_LE(lr_at(s, t), lr_at(s, t - 1)) << t;
}

TEST(Schedule, LinearAndConstant) {
  const auto lin = sched("linear", 2e-3, 4, 104, 0.0);
  EXPECT_EQ(lr_at(lin, 4), 2e-3);
  EXPECT_NEAR(lr_at(lin, 54), 1e-3, 1e-18);  // halfway
  EXPECT_NEAR(lr_at(lin, 29), 1.5e-3, 1e-18);
  EXPECT_EQ(lr_at(lin, 104), 0.0);
  EXPECT_EQ(lr_at(lin, 1000), 0.0);
  const auto con = sched("constant", 3e-4, 3, 100, 0.5);
  EXPECT_DOUBLE_EQ(lr_at(con, 1), 1e-4);
  EXPECT_EQ(lr_at(con, 3), 3e-4);
  EXPECT_EQ(lr_at(con, 100), 3e-4);  // min_lr_ratio does not apply to constant
  EXPECT_EQ(lr_at(con, 1000), 3e-4);
}

TEST(Schedule, NoWarmup) {
  const auto s = sched("cosine", 1e-3, 0, 100, 0.0);
  EXPECT_NEAR(lr_at(s, 1), 1e-3 * 0.5 * (1 + std::cos(std::numbers::pi / 100)), 1e-18);
  EXPECT_EQ(lr_at(s, 100), 0.0);
  const auto all_warmup = sched("linear", 1e-3, 10, 10, 0.2);  // total == warmup: no decay phase
  EXPECT_EQ(lr_at(all_warmup, 10), 1e-3);
  EXPECT_EQ(lr_at(all_warmup, 11), 0.2 * 1e-3);
}

TEST(Schedule, ValidateNamesKey) {
  EXPECT_EQ(error_of([] { validate(sched("cosine", 1e-3, 10, 100, 0.1)); }), kNoError);
  EXPECT_NE(error_of([] { validate(sched("exp", 1e-3, 0, 100, 0.0)); }).find("'optim.schedule'"), std::string::npos);
  EXPECT_NE(error_of([] { validate(sched("cosine", -1.0, 0, 100, 0.0)); }).find("'optim.lr'"), std::string::npos);
  EXPECT_NE(error_of([] { validate(sched("cosine", 1e-3, -1, 100, 0.0)); }).find("'optim.warmup_steps'"),
            std::string::npos);
  EXPECT_NE(error_of([] { validate(sched("cosine", 1e-3, 200, 100, 0.0)); }).find("'optim.warmup_steps'"),
            std::string::npos);
  EXPECT_NE(error_of([] { validate(sched("cosine", 1e-3, 0, 0, 0.0)); }).find("'train.steps'"),
            std::string::npos);
  EXPECT_NE(error_of([] { validate(sched("linear", 1e-3, 0, 100, 1.5)); }).find("'optim.min_lr_ratio'"),
            std::string::npos);
}
