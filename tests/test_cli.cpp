// End-to-end tests of the moetune binary: every bad input gives a clear message that
// names the file/line/key, a non-zero exit, and leaves existing files untouched.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

namespace fs = std::filesystem;

namespace {

struct Result {
  int code;
  std::string out;
};

Result run(const std::string& args) {
  const std::string cmd = std::string(MOETUNE_BINARY) + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  const int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    dir = fs::temp_directory_path() / ("moetune_cli_" + std::to_string(::getpid()) + "_" +
                                       ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  void TearDown() override { fs::remove_all(dir); }
  std::string write(const std::string& name, const std::string& text) {
    std::ofstream(dir / name) << text;
    return (dir / name).string();
  }
  std::string run_config(const std::string& data, const std::string& extra_model = "") {
    return write("run.json", R"({"model": {"vocab_size": 16, "hidden_size": 16, "num_hidden_layers": 2,
      "num_attention_heads": 2, "n_routed_experts": 4, "num_experts_per_tok": 2,
      "max_position_embeddings": 32)" + extra_model + R"(},
      "data": {"train": ")" + data + R"(", "seq_len": 16},
      "train": {"steps": 3, "micro_batch_size": 2}, "optim": {"warmup_steps": 1}})");
  }
  fs::path dir;
};

}  // namespace

TEST_F(Cli, HelpForEveryCommand) {
  for (const char* cmd : {"", "init", "train", "sft", "gen-data", "config-keys", "tokenizer train", "tokenizer encode",
                          "tokenizer decode", "tokenizer info", "data prepare", "data inspect", "bench", "convert"}) {
    auto r = run(std::string(cmd) + " --help");
    EXPECT_EQ(r.code, 0) << cmd << r.out;
    EXPECT_NE(r.out.find("Usage"), std::string::npos) << cmd;
  }
}

TEST_F(Cli, InitTrainAndResumeFromInit) {
  auto data = write("d.jsonl", "{\"input_ids\": [1,2,3,4,5,6,7,8,9]}\n{\"input_ids\": [3,4,5,6]}\n");
  auto cfg = run_config(data);
  auto r = run("init --config " + cfg + " --out " + (dir / "init").string());
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(fs::exists(dir / "init" / "model.safetensors"));
  EXPECT_TRUE(fs::exists(dir / "init" / "config.json"));
  r = run("train --config " + cfg + " --out " + (dir / "run").string() + " --init-from " + (dir / "init").string() +
          " --peak-gflops 10 --set train.steps=2");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("step     2/2"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("tok/s"), std::string::npos);
  EXPECT_NE(r.out.find("MFU"), std::string::npos);
  EXPECT_TRUE(fs::exists(dir / "run" / "metrics.jsonl"));
  EXPECT_TRUE(fs::exists(dir / "run" / "step-00000002" / "optimizer.safetensors.index.json"));
  EXPECT_TRUE(fs::exists(dir / "run" / "step-00000002" / "model-00001-of-00005.safetensors"));
}

TEST_F(Cli, ConvertATrainedCheckpointToHuggingFaceAndBack) {
  auto data = write("d.jsonl", "{\"input_ids\": [1,2,3,4,5,6,7,8,9]}\n{\"input_ids\": [3,4,5,6]}\n");
  auto cfg = run_config(data);
  auto r = run("train --config " + cfg + " --out " + (dir / "run").string() + " --peak-gflops 10 --set train.steps=2");
  ASSERT_EQ(r.code, 0) << r.out;
  const std::string ck = (dir / "run" / "step-00000002").string(), hf = (dir / "hf").string(),
                    back = (dir / "back").string();
  r = run("convert --to hf " + ck + " " + hf);  // the trainer's sharded (E + 1 files) layout in
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("model_type deepseek_v3"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("note: attention is moetune's grouped-query attention"), std::string::npos) << r.out;
  EXPECT_TRUE(fs::exists(dir / "hf" / "model.safetensors"));
  r = run("convert --from hf " + hf + " " + back);
  ASSERT_EQ(r.code, 0) << r.out;
  r = run("train --config " + cfg + " --out " + (dir / "run2").string() + " --init-from " + back +
          " --peak-gflops 10 --set train.steps=1");
  ASSERT_EQ(r.code, 0) << r.out;
  // Bad arguments name what is wrong and write nothing.
  r = run("convert " + ck + " " + (dir / "x").string());
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("exactly one of --to hf and --from hf"), std::string::npos) << r.out;
  r = run("convert --to gguf " + ck + " " + (dir / "x").string());
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("unknown format 'gguf'"), std::string::npos) << r.out;
  r = run("convert --from hf " + (dir / "nowhere").string() + " " + (dir / "x").string());
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("nowhere/config.json: missing"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(dir / "x"));
}

TEST_F(Cli, MalformedJsonlNamesFileAndLine) {
  auto data = write("bad.jsonl", "{\"input_ids\": [1,2,3]}\n{\"input_ids\": [1,2,\n");
  auto r = run("train --config " + run_config(data) + " --out " + (dir / "o").string() + " --peak-gflops 1");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("bad.jsonl:2"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("error:"), std::string::npos);
}

TEST_F(Cli, TokenOutsideVocabularyNamesTheToken) {
  auto data = write("oov.jsonl", "{\"input_ids\": [1,2,3]}\n{\"input_ids\": [1,99,3]}\n");
  auto r = run("train --config " + run_config(data) + " --out " + (dir / "o").string() + " --peak-gflops 1");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("oov.jsonl:2"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("99"), std::string::npos) << r.out;
}

TEST_F(Cli, InvalidConfigNamesTheKey) {
  auto data = write("d.jsonl", "{\"input_ids\": [1,2,3]}\n");
  auto r = run("train --config " + run_config(data, ", \"n_group\": 3") + " --out " + (dir / "o").string());
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("n_group"), std::string::npos) << r.out;
  r = run("train --config " + run_config(data) + " --out " + (dir / "o").string() + " --set train.stepz=3");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("train.stepz"), std::string::npos) << r.out;
  r = run("init --config " + write("m.json", "{\"num_experts_per_tok\": 9}") + " --out " + (dir / "x").string());
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("num_experts_per_tok"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(dir / "x"));
}

TEST_F(Cli, CorruptCheckpointIsRejectedAndLeftAlone) {
  auto data = write("d.jsonl", "{\"input_ids\": [1,2,3,4]}\n");
  auto cfg = run_config(data);
  ASSERT_EQ(run("init --config " + cfg + " --out " + (dir / "ck").string()).code, 0);
  const auto file = dir / "ck" / "model.safetensors";
  const auto size = fs::file_size(file);
  fs::resize_file(file, size / 2);  // truncate
  auto r = run("train --config " + cfg + " --out " + (dir / "o").string() + " --init-from " + (dir / "ck").string() +
               " --peak-gflops 1");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("model.safetensors"), std::string::npos) << r.out;
  EXPECT_EQ(fs::file_size(file), size / 2);  // nothing rewritten
  // Garbage header length.
  {
    std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
    const unsigned char junk[8] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0};
    f.write(reinterpret_cast<const char*>(junk), 8);
  }
  r = run("train --config " + cfg + " --out " + (dir / "o").string() + " --init-from " + (dir / "ck").string() +
          " --peak-gflops 1");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("model.safetensors"), std::string::npos) << r.out;
}

TEST_F(Cli, MissingFilesAndBadArguments) {
  auto r = run("train --config " + (dir / "nope.json").string() + " --out " + (dir / "o").string());
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("nope.json"), std::string::npos) << r.out;
  r = run("frobnicate");
  EXPECT_NE(r.code, 0);
  r = run("train --out x");  // --config missing
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.out.find("--config"), std::string::npos) << r.out;
}

TEST_F(Cli, SftFromABaseCheckpointOnChatData) {
  std::string chat;
  for (int i = 0; i < 40; ++i) {
    const std::string a = std::to_string(i % 7), b = std::to_string(i % 5), c = std::to_string(i % 7 + i % 5);
    chat += i % 2 ? R"({"messages": [{"role": "user", "content": ")" + a + "+" + b +
                        R"(="}, {"role": "assistant", "content": ")" + c + "\"}]}\n"
                  : R"({"prompt": ")" + a + "+" + b + R"(=", "completion": ")" + c + "\"}\n";
  }
  const auto data = write("chat.jsonl", chat);
  const auto model = write("model.json", R"({"vocab_size": 264, "hidden_size": 16, "num_hidden_layers": 2,
      "num_attention_heads": 2, "n_routed_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 32})");
  ASSERT_EQ(run("init --config " + model + " --out " + (dir / "base").string()).code, 0);
  auto r = run("sft --init-from " + (dir / "base").string() + " --data " + data + " --valid " + data + " --out " +
               (dir / "sft").string() + " --peak-gflops 10 --set data.seq_len=32 --set train.steps=20 " +
               "--set train.micro_batch_size=4 --set optim.warmup_steps=2");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("sft data"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("40 samples"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("valid loss"), std::string::npos) << r.out;
  EXPECT_TRUE(fs::exists(dir / "sft" / "step-00000020" / "manifest.json"));
  // A bad line names the file and line; nothing is written.
  const auto bad = write("bad.jsonl", chat + R"({"messages": [{"role": "robot", "content": "x"}]})" + "\n");
  r = run("sft --init-from " + (dir / "base").string() + " --data " + bad + " --out " + (dir / "sft2").string() +
          " --peak-gflops 10 --set data.seq_len=32");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("bad.jsonl:41"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("robot"), std::string::npos) << r.out;
  // The base model's vocabulary must hold the byte tokenizer.
  const auto small = write("small.json", R"({"vocab_size": 100, "hidden_size": 16, "num_hidden_layers": 1,
      "num_attention_heads": 2, "first_k_dense_replace": 0, "n_routed_experts": 4, "num_experts_per_tok": 2})");
  ASSERT_EQ(run("init --config " + small + " --out " + (dir / "base2").string()).code, 0);
  r = run("sft --init-from " + (dir / "base2").string() + " --data " + data + " --out " + (dir / "sft3").string() +
          " --peak-gflops 10 --set data.seq_len=32");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("model.vocab_size"), std::string::npos) << r.out;
}

// Continued pre-training end to end: train a BPE on text, tokenize text and JSONL into a
// token file, train from it (the tokenizer lands in every checkpoint), post-train (SFT)
// from that checkpoint with the inherited tokenizer; mismatches are refused.
TEST_F(Cli, TokenizerDataPrepareTrainAndSftCarryTheTokenizer) {
  std::string text, jsonl;
  for (int i = 0; i < 300; ++i) {
    const std::string line = "the cat " + std::to_string(i % 13) + " sat on the mat, and the dog didn't.";
    text += line + (i % 10 == 9 ? "\n\n" : "\n");
    if (i % 3 == 0) jsonl += "{\"text\": \"" + line + "\", \"id\": " + std::to_string(i) + "}\n";
  }
  const auto txt = write("corpus.txt", text), js = write("more.jsonl", jsonl);
  const std::string tok = (dir / "tokenizer.json").string(), bin = (dir / "train.bin").string();
  auto r = run("tokenizer train --input " + txt + " " + js + " --vocab-size 290 --out " + tok + " --quiet");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("290 tokens (256 bytes, 27 merges, 7 special)"), std::string::npos) << r.out;
  r = run("tokenizer encode --tokenizer " + tok + " --text 'the cat'");
  ASSERT_EQ(r.code, 0) << r.out;
  std::string ids = r.out.substr(0, r.out.find('\n'));
  EXPECT_LT(std::count(ids.begin(), ids.end(), ' '), 3) << ids;  // merged: at most 3 tokens for 7 bytes
  r = run("tokenizer decode --tokenizer " + tok + " --ids '" + ids + "'");
  EXPECT_EQ(r.out, "the cat\n");

  r = run("data prepare --input " + txt + " " + js + " --text-split paragraph --tokenizer " + tok + " --out " + bin +
          " --quiet");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("130 documents"), std::string::npos) << r.out;  // 30 paragraphs + 100 JSONL lines
  r = run("data inspect " + bin + " --tokenizer " + tok + " --show 1");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("130 documents"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("the cat 0 sat on the mat, and the dog didn't.\nthe cat 1"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("<|eos|>"), std::string::npos) << r.out;

  const auto cfg = write("cpt.json", R"({"model": {"vocab_size": 320, "hidden_size": 16, "num_hidden_layers": 2,
      "num_attention_heads": 2, "n_routed_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 32},
      "data": {"train": "train.bin", "format": "bin", "tokenizer": "tokenizer.json", "seq_len": 32,
               "overlong": "split"},
      "train": {"steps": 4, "micro_batch_size": 2, "save_every": 2}, "optim": {"warmup_steps": 1}})");
  r = run("train --config " + cfg + " --out " + (dir / "cpt").string() + " --peak-gflops 10");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("tokenizer: byte-level BPE: 290 tokens"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("data.overlong split"), std::string::npos) << r.out;
  const auto read = [](const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  for (const char* step : {"step-00000002", "step-00000004"}) {
    EXPECT_EQ(read(dir / "cpt" / step / "tokenizer.json"), read(tok)) << step;
    EXPECT_NE(read(dir / "cpt" / step / "manifest.json").find("tokenizer.json"), std::string::npos);
  }
  // Resuming checks the carried tokenizer too (and keeps it).
  r = run("train --config " + cfg + " --out " + (dir / "cpt").string() + " --auto-resume --set train.steps=6 " +
          "--peak-gflops 10");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(read(dir / "cpt" / "step-00000006" / "tokenizer.json"), read(tok));

  // SFT from that checkpoint: chat text rendered with the inherited tokenizer.
  const auto chat = write("chat.jsonl", R"({"messages": [{"role": "user", "content": "the cat?"}, )"
                                        R"({"role": "assistant", "content": "sat on the mat"}]})"
                                        "\n");
  r = run("sft --init-from " + (dir / "cpt" / "step-00000004").string() + " --data " + chat + " --out " +
          (dir / "sft").string() + " --peak-gflops 10 --set data.seq_len=32 --set train.steps=2 "
          "--set train.micro_batch_size=1 --set optim.warmup_steps=1");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("tokenizer: byte-level BPE: 290 tokens"), std::string::npos) << r.out;
  EXPECT_EQ(read(dir / "sft" / "step-00000002" / "tokenizer.json"), read(tok));

  // Refused: another tokenizer than the checkpoint's; a token file of another tokenizer;
  // a token file read as JSONL; a tokenizer larger than the model.
  r = run("sft --init-from " + (dir / "cpt" / "step-00000004").string() + " --data " + chat + " --out " +
          (dir / "sft2").string() + " --set data.tokenizer=byte --set data.seq_len=32");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("is not the tokenizer of the checkpoint"), std::string::npos) << r.out;
  r = run("train --config " + cfg + " --out " + (dir / "x").string() + " --set data.tokenizer=byte");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("this token file was prepared with the tokenizer of sha256"), std::string::npos) << r.out;
  r = run("train --config " + cfg + " --out " + (dir / "x").string() + " --set data.format=tokens " +
          "--set data.overlong=truncate");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("set data.format = \"bin\""), std::string::npos) << r.out;
  r = run("train --config " + cfg + " --out " + (dir / "x").string() + " --set model.vocab_size=289");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("model.vocab_size"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(dir / "x" / "step-00000004"));
  // Bad corpus input names file:line, and the old token file is untouched.
  const std::string before = read(bin);
  const auto bad = write("bad.jsonl", "{\"text\": \"ok\"}\n{\"text\": 3}\n");
  r = run("data prepare --input " + bad + " --tokenizer " + tok + " --out " + bin);
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("bad.jsonl:2"), std::string::npos) << r.out;
  EXPECT_EQ(read(bin), before);
  r = run("data prepare --input " + txt + " --tokenizer " + tok + " --out " + bin + " --eos '<|tool|>'");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("<|tool|>"), std::string::npos) << r.out;
  EXPECT_EQ(read(bin), before);
}

// `moetune bench` on a tiny config: every phase in the JSON, phases within the step
// time, tokens/s > 0 (speed itself is never asserted); bad arguments name the flag.
TEST_F(Cli, BenchReportsEveryPhaseWithinTheStep) {
  const std::string cfg = run_config("unused.jsonl", R"(, "n_shared_experts": 1, "first_k_dense_replace": 1)");
  const std::string js = (dir / "bench.json").string();
  const Result r = run("bench --config " + cfg + " --steps 2 --warmup 1 --threads 1 --json " + js);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("tokens/s"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("| **step** |"), std::string::npos) << r.out;
  std::ifstream in(js);
  const nlohmann::json j = nlohmann::json::parse(in);
  const char* phases[] = {"embedding", "attention", "dense_ffn", "router", "dispatch", "experts", "combine",
                          "shared_expert", "lm_head_loss", "embedding_bwd", "attention_bwd", "dense_ffn_bwd",
                          "router_bwd", "dispatch_bwd", "experts_bwd", "combine_bwd", "shared_expert_bwd",
                          "lm_head_loss_bwd", "grad_accum", "rank_wait", "grad_reduce", "optimizer"};
  double sum = 0;
  for (const char* p : phases) {
    ASSERT_TRUE(j["phases"].contains(p)) << p;
    const double s = j["phases"][p]["s"].get<double>();
    EXPECT_GE(s, 0.0) << p;
    sum += s;
  }
  EXPECT_EQ(j["phases"].size(), std::size(phases));
  const double step = j["step_s"].get<double>();
  EXPECT_GT(step, 0.0);
  // The phases are disjoint intervals inside each step: per step, their sum is at most
  // the step, up to the rounding of the seconds (a sum of per-phase medians need not
  // be: a phase slow in one step and another in the next, as under the sanitizers).
  const auto steps = j["step_s_all"].get<std::vector<double>>();
  const auto sums = j["phases_sum_s_all"].get<std::vector<double>>();
  ASSERT_EQ(steps.size(), 2u);
  ASSERT_EQ(sums.size(), steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    EXPECT_GT(sums[i], 0.0) << i;
    EXPECT_LE(sums[i], steps[i] + 1e-9) << "step " << i << "\n" << j.dump(1);
  }
  EXPECT_NEAR(j["phases_sum_s"].get<double>(), sum, 1e-9);
  EXPECT_GT(j["phases"]["experts"]["s"].get<double>(), 0.0);
  EXPECT_GT(j["phases"]["attention_bwd"]["s"].get<double>(), 0.0);
  EXPECT_GT(j["tokens_per_s"].get<double>(), 0.0);
  EXPECT_GT(j["mfu"].get<double>(), 0.0);
  EXPECT_EQ(j["timed_steps"].get<int>(), 2);
  EXPECT_EQ(j["step_s_all"].size(), 2u);
  EXPECT_EQ(j["threads"].get<int>(), 1);
  EXPECT_EQ(j["layout"]["world_size"].get<int>(), 1);
  EXPECT_FALSE(j["isa"].get<std::string>().empty());
  EXPECT_GT(j["memory_rank0"]["peak_rss_bytes"].get<int64_t>(), 0);
  EXPECT_GT(j["memory_rank0"]["optimizer_bytes"].get<int64_t>(), 0);
  EXPECT_GT(j["memory_rank0"]["activation_bytes"].get<int64_t>(), 0);
  EXPECT_TRUE(j.contains("all_to_all") && j["all_to_all"].contains("dispatch_bytes"));
  EXPECT_TRUE(j["config"].contains("model"));
}

// `moetune bench --init-from`: the checkpoint's weights are the ones timed. A step-0
// checkpoint of the run config's own seed gives the fresh init's first loss bit for bit,
// one of another seed does not; a missing checkpoint is named.
TEST_F(Cli, BenchInitFromLoadsTheCheckpoint) {
  const std::string cfg = run_config("unused.jsonl");
  ASSERT_EQ(run("init --config " + cfg + " --out " + (dir / "same").string()).code, 0);
  ASSERT_EQ(run("init --config " + cfg + " --seed 99 --out " + (dir / "other").string()).code, 0);
  const auto bench = [&](const std::string& extra, const std::string& name) {
    const std::string js = (dir / name).string();
    const Result r = run("bench --config " + cfg + " --steps 1 --warmup 0 --threads 1 --quiet --json " + js + extra);
    EXPECT_EQ(r.code, 0) << r.out;
    std::ifstream in(js);
    return nlohmann::json::parse(in);
  };
  const nlohmann::json fresh = bench("", "fresh.json");
  const nlohmann::json same = bench(" --init-from " + (dir / "same").string(), "same.json");
  const nlohmann::json other = bench(" --init-from " + (dir / "other").string(), "other.json");
  EXPECT_EQ(fresh["init_from"].get<std::string>(), "");
  EXPECT_EQ(same["init_from"].get<std::string>(), (dir / "same").string());
  EXPECT_EQ(same["first_loss"].get<double>(), fresh["first_loss"].get<double>());
  EXPECT_NE(other["first_loss"].get<double>(), fresh["first_loss"].get<double>());
  const Result r = run("bench --config " + cfg + " --init-from " + (dir / "nope").string());
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("nope"), std::string::npos) << r.out;
}

TEST_F(Cli, BenchBadArgumentsNameTheFlag) {
  const std::string cfg = run_config("unused.jsonl");
  for (const char* bad : {"--steps 0", "--steps -3", "--warmup -1", "--ep 0", "--threads 0"}) {
    const Result r = run("bench --config " + cfg + " " + bad);
    EXPECT_EQ(r.code, 1) << bad << "\n" << r.out;
    const std::string flag = std::string(bad).substr(0, std::string(bad).find(' '));
    EXPECT_NE(r.out.find("error: bench: " + flag), std::string::npos) << bad << "\n" << r.out;
  }
  Result r = run("bench --config " + cfg + " --set parallel.ep=3");
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("parallel.ep"), std::string::npos) << r.out;
  r = run("bench --config " + (dir / "missing.json").string());
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("missing.json"), std::string::npos) << r.out;
}
