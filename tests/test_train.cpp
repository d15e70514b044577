// Training-level tests: gradient accumulation gives the same update, the bias update
// follows MODEL.md section 4, a non-finite step is skipped, and a tiny model learns
// the synthetic task.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "moe/error.hpp"
#include "moe/model.hpp"
#include "optim/adamw.hpp"
#include "test_util.hpp"
#include "train/run_config.hpp"
#include "train/step.hpp"
#include "train/synthetic.hpp"
#include "train/trainer.hpp"

using namespace moetune;
using namespace moetune::testing;
namespace fs = std::filesystem;

namespace {
ModelConfig tiny_cfg(nlohmann::json extra = nlohmann::json::object()) {
  nlohmann::json j = {{"vocab_size", 32},          {"hidden_size", 16},       {"num_hidden_layers", 2},
                      {"num_attention_heads", 2},  {"n_routed_experts", 4},   {"num_experts_per_tok", 2},
                      {"max_position_embeddings", 32}, {"initializer_range", 0.1}};
  for (auto it = extra.begin(); it != extra.end(); ++it) j[it.key()] = it.value();
  return ModelConfig::from_json(j);
}
std::vector<MicroBatch> split(const MicroBatch& big, int parts) {
  std::vector<MicroBatch> out;
  const int rows = big.rows / parts;
  const int64_t n = int64_t(rows) * big.seq_len;
  for (int p = 0; p < parts; ++p) {
    MicroBatch mb;
    mb.rows = rows;
    mb.seq_len = big.seq_len;
    mb.input_ids.assign(big.input_ids.begin() + p * n, big.input_ids.begin() + (p + 1) * n);
    mb.labels.assign(big.labels.begin() + p * n, big.labels.begin() + (p + 1) * n);
    mb.doc_ids.assign(big.doc_ids.begin() + p * n, big.doc_ids.begin() + (p + 1) * n);
    out.push_back(std::move(mb));
  }
  return out;
}
}  // namespace

// One micro-batch of 8 rows and 4 micro-batches of 2 rows give the same AdamW update.
TEST(TrainStep, GradientAccumulationGivesTheSameUpdate) {
  auto cfg = tiny_cfg({{"seq_aux_loss_coeff", 0.01}});
  auto big = make_batch(8, 8, cfg.vocab_size, 21);
  for (int i = 0; i < 25; ++i) big.labels[i] = kIgnoreIndex;  // uneven targets per micro-batch
  Model<float> a(cfg), b(cfg);
  a.init(5);
  b.init(5);
  AdamWConfig ac;
  ac.weight_decay = 0.1;
  AdamW<float> oa(a.layout(), ac), ob(b.layout(), ac);
  for (int step = 0; step < 3; ++step) {
    auto ra = train_step(a, oa, {big}, 1e-2, 1.0);
    auto rb = train_step(b, ob, split(big, 4), 1e-2, 1.0);
    EXPECT_NEAR(ra.loss, rb.loss, 1e-5 * std::fabs(ra.loss));
    EXPECT_NEAR(ra.grad_norm, rb.grad_norm, 1e-5 * ra.grad_norm);
  }
  double worst = 0, scale = 0;
  for (size_t i = 0; i < a.params().size(); ++i) {
    worst = std::max(worst, double(std::fabs(a.params()[i] - b.params()[i])));
    scale = std::max(scale, double(std::fabs(a.params()[i])));
  }
  EXPECT_LT(worst / scale, 1e-5);
  EXPECT_EQ(a.expert_bias(), b.expert_bias());
}

TEST(TrainStep, BiasUpdateFollowsSignOfLoadDeficit) {
  std::vector<std::vector<float>> bias = {{0.f, 0.f, 0.f, 0.f}};
  update_expert_bias(bias, {{4, 2, 3, 3}}, 0.5);  // mean 3
  EXPECT_EQ(bias[0], (std::vector<float>{-0.5f, 0.5f, 0.f, 0.f}));
  update_expert_bias(bias, {{4, 2, 3, 3}}, 0.5);
  EXPECT_EQ(bias[0], (std::vector<float>{-1.f, 1.f, 0.f, 0.f}));
}

TEST(TrainStep, NoauxBiasMovesOnlyUnderNoauxTc) {
  for (const char* method : {"noaux_tc", "greedy"}) {
    auto cfg = tiny_cfg({{"topk_method", method}, {"bias_update_rate", 0.01}});
    Model<float> m(cfg);
    m.init(2);
    AdamW<float> opt(m.layout(), AdamWConfig{});
    auto mb = make_batch(4, 8, cfg.vocab_size, 3);
    auto r = train_step(m, opt, {mb}, 1e-3, 1.0);
    double moved = 0;
    for (auto& b : m.expert_bias())
      for (float v : b) moved += std::fabs(v);
    int64_t routed = 0;
    for (auto c : r.expert_counts[0]) routed += c;
    EXPECT_EQ(routed, mb.tokens() * cfg.K());
    if (std::string(method) == "noaux_tc") {
      EXPECT_GT(moved, 0.0);
    } else {
      EXPECT_EQ(moved, 0.0);
    }
  }
}

TEST(TrainStep, NonFiniteStepIsSkippedAndChangesNothing) {
  auto cfg = tiny_cfg();
  Model<float> m(cfg);
  m.init(2);
  m.params()[m.layout().offset("model.norm.weight")] = std::nanf("");
  AdamW<float> opt(m.layout(), AdamWConfig{});
  const auto before = m.params();
  const auto bias_before = m.expert_bias();
  auto r = train_step(m, opt, {make_batch(2, 8, cfg.vocab_size, 4)}, 1e-3, 1.0);
  EXPECT_TRUE(r.skipped);
  EXPECT_EQ(opt.step_count(), 0);
  EXPECT_EQ(m.expert_bias(), bias_before);
  for (size_t i = 0; i < before.size(); ++i)
    if (!std::isnan(before[i])) {
      ASSERT_EQ(before[i], m.params()[i]);
    }
}

// A tiny model learns the synthetic progression task within a few seconds.
TEST(TrainLoop, TinyModelLearns) {
  const fs::path dir = fs::temp_directory_path() / ("moetune_trainloop_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  write_synthetic_jsonl((dir / "data.jsonl").string(), 400, 32, 12, 32, 3);
  write_synthetic_jsonl((dir / "valid.jsonl").string(), 30, 32, 12, 32, 99);
  RunConfig rc = RunConfig::from_json(
      {{"model",
        {{"vocab_size", 32}, {"hidden_size", 32}, {"num_hidden_layers", 2}, {"num_attention_heads", 4},
         {"n_routed_experts", 4}, {"num_experts_per_tok", 2}, {"max_position_embeddings", 64}}},
       {"data", {{"train", (dir / "data.jsonl").string()}, {"valid", (dir / "valid.jsonl").string()}, {"seq_len", 32}}},
       {"train", {{"steps", 60}, {"micro_batch_size", 8}, {"seed", 1}, {"eval_every", 25}}},
       {"optim", {{"lr", 1e-2}, {"warmup_steps", 5}, {"schedule", "cosine"}}}},
      "test", "");
  TrainOptions opt;
  opt.out_dir = (dir / "out").string();
  opt.progress = false;
  opt.peak_gflops = 100;  // skip the FMA probe
  auto sum = run_training(rc, opt);
  EXPECT_EQ(sum.steps, 60);
  EXPECT_EQ(sum.skipped_steps, 0);
  EXPECT_GT(sum.first_loss, 3.0);                   // about log(32) = 3.47 at the start
  EXPECT_LT(sum.last_loss, 0.6 * sum.first_loss);   // and well below it after 60 steps
  // metrics.jsonl has one line per step with the documented fields.
  std::ifstream in(fs::path(opt.out_dir) / "metrics.jsonl");
  std::string line;
  int lines = 0;
  std::vector<double> valid;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (j.contains("valid_loss")) {
      EXPECT_TRUE(j["step"] == 25 || j["step"] == 50 || j["step"] == 60) << j["step"];
      valid.push_back(j["valid_loss"].get<double>());
    }
    for (const char* k : {"step", "loss", "aux_loss", "seq_aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s",
                          "mfu", "expert_load"})
      ASSERT_TRUE(j.contains(k)) << k;
    ++lines;
  }
  EXPECT_EQ(lines, 60);
  ASSERT_EQ(valid.size(), 3u);            // steps 25, 50 and the last
  EXPECT_LT(valid.back(), valid.front());  // the held-out loss falls too
  EXPECT_TRUE(fs::exists(fs::path(sum.final_checkpoint) / "model.safetensors.index.json"));
  fs::remove_all(dir);
}

// What a resumed run reads from trainer_state.json is checked field by field; a bad
// field is an Error naming the file and the dotted key (found by fuzz_trainer_state).
TEST(TrainLoop, ResumeStateFieldsAreChecked) {
  const fs::path dir = fs::temp_directory_path() / ("moetune_resume_state_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const auto error_with = [&](const std::string& state, bool rl) {
    std::ofstream(dir / "trainer_state.json") << state;
    try {
      if (rl)
        (void)read_rl_resume_state(dir.string());
      else
        (void)read_train_resume_state(dir.string());
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  std::ofstream(dir / "trainer_state.json") << R"({"step": 7, "data": {"epoch": 1, "row": 3}})";
  const TrainResumeState t = read_train_resume_state(dir.string());
  EXPECT_EQ(t.step, 7);
  EXPECT_EQ(t.epoch, 1);
  EXPECT_EQ(t.row, 3);
  std::ofstream(dir / "trainer_state.json") << R"({"step": 2, "rl": {"epoch": 0, "pos": 8, "reference": "sft"}})";
  const RlResumeState r = read_rl_resume_state(dir.string());
  EXPECT_EQ(r.step, 2);
  EXPECT_EQ(r.pos, 8);
  EXPECT_EQ(r.reference, "sft");
  const std::string file = (dir / "trainer_state.json").string();
  for (const auto& [state, key] : std::vector<std::pair<std::string, std::string>>{
           {R"({"step": "7", "data": {"epoch": 0, "row": 0}})", "key 'step'"},
           {R"({"step": 9223372036854775807, "data": {"epoch": 0, "row": 0}})", "key 'step'"},
           {R"({"step": 1, "data": {"epoch": -1, "row": 0}})", "key 'data.epoch'"},
           {R"({"step": 1, "data": [0, 0]})", "key 'data'"},
           {R"({"step": 1, "data": {"epoch": 0}})", "key 'data.row'"}}) {
    const std::string e = error_with(state, false);
    EXPECT_NE(e.find(file), std::string::npos) << e;
    EXPECT_NE(e.find(key), std::string::npos) << e;
  }
  EXPECT_NE(error_with(R"({"step": 1, "rl": {"epoch": 0, "pos": -5, "reference": ""}})", true).find("key 'rl.pos'"),
            std::string::npos);
  EXPECT_NE(error_with(R"({"step": 1, "rl": {"epoch": 0, "pos": 0, "reference": 3}})", true).find("key 'rl.reference'"),
            std::string::npos);
  EXPECT_NE(error_with(R"({"step": 1, "data": {"epoch": 0, "row": 0}})", true).find("not an RL checkpoint"),
            std::string::npos);
  fs::remove_all(dir);
}
