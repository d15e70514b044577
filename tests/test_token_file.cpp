// Token files (io/token_file.hpp): write/read round trip, every corruption named, failed
// writes leave the old file, the BatchLoader reads them exactly like in-memory
// documents, the "split" overlong policy trains every target exactly once, and a
// training run from a token file is bit-identical to one from the same tokens in JSONL.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>

#include <nlohmann/json.hpp>

#include "io/token_file.hpp"
#include "moe/error.hpp"
#include "tokenizer/tokenizer.hpp"
#include "train/data.hpp"
#include "train/run_config.hpp"
#include "train/trainer.hpp"

using namespace moetune;
namespace fs = std::filesystem;

namespace {

fs::path scratch(const std::string& name) {
  const fs::path d = fs::temp_directory_path() / ("moetune_tokfile_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

Sha256Bytes some_sha() {
  Sha256Bytes s{};
  for (size_t i = 0; i < s.size(); ++i) s[i] = uint8_t(i * 7 + 1);
  return s;
}

std::vector<Document> random_docs(int n, int vocab, int min_len, int max_len, uint32_t seed) {
  std::mt19937 g(seed);
  std::vector<Document> docs(static_cast<size_t>(n));
  for (auto& d : docs) {
    d.input_ids.resize(size_t(min_len + int(g() % uint32_t(max_len - min_len + 1))));
    for (auto& t : d.input_ids) t = int32_t(g() % uint32_t(vocab));
    d.labels = d.input_ids;
  }
  return docs;
}

void write_docs(const std::string& path, const std::vector<Document>& docs, uint64_t vocab) {
  TokenFileWriter w(path, vocab, some_sha());
  for (const auto& d : docs) w.add(d.input_ids);
  w.finish();
}

std::string bytes_of(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}
void put(const std::string& path, const std::string& b) { std::ofstream(path, std::ios::binary) << b; }

std::string open_error(const std::string& path) {
  try {
    TokenFile f(path);
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST(TokenFile, RoundTripWithTwoAndFourByteIds) {
  const fs::path d = scratch("roundtrip");
  for (uint64_t vocab : {uint64_t(300), uint64_t(65536), uint64_t(70000)}) {
    const auto docs = random_docs(37, int(vocab), 1, 50, uint32_t(vocab));
    const std::string p = (d / ("v" + std::to_string(vocab) + ".bin")).string();
    write_docs(p, docs, vocab);
    const TokenFile f(p);
    EXPECT_EQ(f.token_bytes(), vocab <= 65536 ? 2u : 4u);
    EXPECT_EQ(f.vocab_size(), vocab);
    EXPECT_EQ(f.tokenizer_sha256(), some_sha());
    ASSERT_EQ(f.num_docs(), docs.size());
    uint64_t total = 0;
    for (size_t i = 0; i < docs.size(); ++i) {
      ASSERT_EQ(f.doc_length(i), docs[i].input_ids.size());
      std::vector<int32_t> got(docs[i].input_ids.size());
      f.copy(i, 0, got.size(), got.data());
      EXPECT_EQ(got, docs[i].input_ids);
      total += got.size();
    }
    EXPECT_EQ(f.num_tokens(), total);
    EXPECT_EQ(fs::file_size(p), 128 + total * f.token_bytes() + (docs.size() + 1) * 8);
    EXPECT_TRUE(TokenFile::looks_like(p));
  }
  EXPECT_EQ(sha256_from_hex(sha256_to_hex(some_sha())), some_sha());
  EXPECT_THROW(sha256_from_hex("xyz"), Error);
  fs::remove_all(d);
}

TEST(TokenFile, EveryCorruptionIsNamed) {
  const fs::path d = scratch("corrupt");
  const std::string good = (d / "good.bin").string();
  write_docs(good, random_docs(5, 100, 3, 9, 1), 100);
  const std::string g = bytes_of(good);
  const uint64_t ntok = (g.size() - 128 - 6 * 8) / 2;
  const auto with = [&](auto f) {
    std::string b = g;
    f(b);
    return b;
  };
  const auto set64 = [](std::string& b, size_t at, uint64_t v) { std::memcpy(&b[at], &v, 8); };
  const auto set32 = [](std::string& b, size_t at, uint32_t v) { std::memcpy(&b[at], &v, 4); };
  const size_t offs = 128 + size_t(ntok) * 2;
  uint64_t first_of_doc1 = 0;
  std::memcpy(&first_of_doc1, &g[offs + 8], 8);
  const std::vector<std::pair<std::string, std::string>> cases = {
      {g.substr(0, g.size() - 1), "truncated or appended"},
      {g + "x", "truncated or appended"},
      {g.substr(0, 60), "shorter than the 128-byte header"},
      {with([](std::string& b) { b[0] = 'X'; }), "bad magic"},
      {"{\"input_ids\": [1, 2]}\n", "JSONL"},
      {with([&](std::string& b) { set32(b, 8, 2); }), "version 2 is not supported"},
      {with([&](std::string& b) { set32(b, 12, 3); }), "token_bytes is 3"},
      {with([&](std::string& b) { set64(b, 16, 0); }), "no documents"},
      {with([&](std::string& b) { set64(b, 16, uint64_t(1) << 62); }), "implies more"},
      {with([&](std::string& b) { set64(b, offs + 8, 0); }), "not strictly increasing at document 0"},
      {with([&](std::string& b) { set64(b, offs, 1); }), "doc_offsets[0] is not 0"},
      {with([&](std::string& b) { set64(b, offs + 5 * 8, ntok - 1); }), "not num_tokens"},
      {with([&](std::string& b) { uint16_t v = 100; std::memcpy(&b[128 + 2 * first_of_doc1], &v, 2); }),
       "id 100 in document 1 (token " + std::to_string(first_of_doc1) + ") is outside [0, 100)"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string p = (d / ("bad" + std::to_string(i) + ".bin")).string();
    put(p, cases[i].first);
    const std::string e = open_error(p);
    EXPECT_NE(e.find(p), std::string::npos) << e;
    EXPECT_NE(e.find(cases[i].second), std::string::npos) << "case " << i << ": want '" << cases[i].second
                                                          << "' in: " << e;
  }
  EXPECT_EQ(open_error(good), "(no error)");
  EXPECT_NE(open_error((d / "missing.bin").string()).find("cannot open"), std::string::npos);
  fs::remove_all(d);
}

TEST(TokenFile, AFailedWriteLeavesTheOldFile) {
  const fs::path d = scratch("failed");
  const std::string p = (d / "data.bin").string();
  write_docs(p, random_docs(3, 50, 2, 5, 2), 50);
  const std::string before = bytes_of(p);
  {
    TokenFileWriter w(p, 50, some_sha());
    w.add(std::vector<int32_t>{1, 2, 3});
    EXPECT_THROW(w.add(std::vector<int32_t>{4, 50}), Error);  // id outside the vocabulary
    EXPECT_THROW(w.add(std::vector<int32_t>{}), Error);       // empty document
  }  // destroyed without finish()
  {
    TokenFileWriter w(p, 50, some_sha());
    EXPECT_THROW(w.finish(), Error);  // no documents
  }
  EXPECT_EQ(bytes_of(p), before);
  EXPECT_EQ(std::distance(fs::directory_iterator(d), fs::directory_iterator()), 1);  // no temporary left
  EXPECT_THROW(TokenFileWriter((d / "no/such/dir/x.bin").string(), 50, some_sha()), Error);
  fs::remove_all(d);
}

TEST(TokenFile, BatchLoaderReadsItLikeInMemoryDocuments) {
  const fs::path d = scratch("loader");
  const auto docs = random_docs(60, 500, 1, 40, 9);
  const std::string p = (d / "data.bin").string();
  write_docs(p, docs, 500);
  auto src = std::make_shared<TokenFileDocuments>(p, 512);
  for (bool packing : {true, false})
    for (bool shuffle : {true, false})
      for (const std::string overlong : {"truncate", "split"}) {
        DataConfig cfg;
        cfg.seq_len = 16;
        cfg.packing = packing;
        cfg.shuffle = shuffle;
        cfg.overlong = overlong;
        BatchLoader mem(docs, cfg, 5), mapped(src, cfg, 5);
        ASSERT_EQ(mem.rows_per_epoch(), mapped.rows_per_epoch());
        for (int step = 0; step < 12; ++step) {
          const auto a = mem.next_global_batch(3, 2), b = mapped.next_global_batch(3, 2);
          for (size_t m = 0; m < a.size(); ++m) {
            ASSERT_EQ(a[m].input_ids, b[m].input_ids);
            ASSERT_EQ(a[m].labels, b[m].labels);
            ASSERT_EQ(a[m].doc_ids, b[m].doc_ids);
          }
          EXPECT_EQ(mem.state().epoch, mapped.state().epoch);
          EXPECT_EQ(mem.state().row, mapped.state().row);
        }
        // Resume: a fresh loader set to the state continues identically.
        BatchLoader resumed(src, cfg, 5);
        resumed.set_state(mapped.state());
        EXPECT_EQ(resumed.next_global_batch(2, 1)[0].input_ids, mapped.next_global_batch(2, 1)[0].input_ids);
      }
  try {
    TokenFileDocuments too_big(p, 400);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.vocab_size"), std::string::npos) << e.what();
  }
  fs::remove_all(d);
}

TEST(BatchLoaderSplit, EveryTargetOfALongDocumentIsTrainedExactlyOnce) {
  // Documents whose tokens are their positions (+ 1000 x document), lengths around S.
  const int S = 8;
  std::vector<Document> docs;
  for (int n : {3, 8, 9, 15, 16, 40, 1}) {
    Document d;
    for (int i = 0; i < n; ++i) d.input_ids.push_back(1000 * int(docs.size()) + i);
    d.labels = d.input_ids;
    docs.push_back(d);
  }
  DataConfig cfg;
  cfg.seq_len = S;
  cfg.overlong = "split";
  cfg.shuffle = true;
  BatchLoader loader(docs, cfg, 3);
  EXPECT_EQ(loader.split_documents(), 4);  // 9, 15, 16, 40
  EXPECT_EQ(loader.truncated_documents(), 0);
  // Units: 3 | 8 | 8+2 | 8+8 | 8+8+2 | 6 units of 40 (stride 7) | 1  -> 14 units
  EXPECT_EQ(loader.num_units(), 1 + 1 + 2 + 2 + 3 + 6 + 1);
  const int64_t rows = loader.rows_per_epoch();
  std::map<int32_t, int> trained;  // target token -> times it is a trained target
  for (int64_t r = 0; r < rows; ++r) {
    const MicroBatch mb = loader.next_global_batch(1, 1)[0];
    for (int t = 0; t + 1 < S; ++t) {
      const int32_t tgt = mb.target(t);
      if (tgt != kIgnoreIndex) ++trained[tgt];
    }
  }
  // Every token except each document's first is a target exactly once.
  size_t expect = 0;
  for (const auto& d : docs)
    for (size_t i = 1; i < d.input_ids.size(); ++i, ++expect) EXPECT_EQ(trained[d.input_ids[i]], 1) << d.input_ids[i];
  EXPECT_EQ(trained.size(), expect);
  EXPECT_EQ(loader.state().epoch, 1);  // exactly one epoch consumed

  // Without a long document, split is the plain stream.
  std::vector<Document> short_docs(docs.begin(), docs.begin() + 2);
  DataConfig plain = cfg;
  plain.overlong = "truncate";
  BatchLoader a(short_docs, cfg, 3), b(short_docs, plain, 3);
  EXPECT_EQ(a.next_global_batch(2, 1)[0].input_ids, b.next_global_batch(2, 1)[0].input_ids);
  cfg.seq_len = 1;
  EXPECT_THROW(BatchLoader(docs, cfg, 3), Error);
}

// data.format "bin" end to end: the same documents as a token file (byte tokenizer's
// SHA-256, as `moetune data prepare` would record) and as token-id JSONL train the same
// model bit for bit: identical per-step losses, gradient norms, validation losses and
// checkpoint tensors (model and optimizer). Some documents exceed seq_len (split).
TEST(TokenFile, TrainingFromItIsBitIdenticalToJsonl) {
  const fs::path d = scratch("train");
  const Tokenizer byte = Tokenizer::byte_level();
  const auto train_docs = random_docs(12, 256, 1, 40, 21), valid_docs = random_docs(6, 256, 2, 20, 22);
  ASSERT_TRUE(std::any_of(train_docs.begin(), train_docs.end(),
                          [](const Document& x) { return x.input_ids.size() > 16; }));
  const auto jsonl = [&](const std::string& name, const std::vector<Document>& docs) {
    std::ofstream out(d / name);
    for (const auto& doc : docs) out << nlohmann::json{{"input_ids", doc.input_ids}}.dump() << "\n";
    return (d / name).string();
  };
  const auto bin = [&](const std::string& name, const std::vector<Document>& docs) {
    TokenFileWriter w((d / name).string(), uint64_t(byte.vocab_size()), sha256_from_hex(byte.sha256_hex()));
    for (const auto& doc : docs) w.add(doc.input_ids);
    w.finish();
    return (d / name).string();
  };
  const auto run = [&](const std::string& format, const std::string& train, const std::string& valid,
                       const std::string& out) {
    RunConfig rc = RunConfig::from_json(
        {{"model",
          {{"vocab_size", byte.vocab_size() + 8}, {"hidden_size", 16}, {"num_hidden_layers", 2},
           {"num_attention_heads", 2}, {"n_routed_experts", 4}, {"num_experts_per_tok", 2},
           {"max_position_embeddings", 32}}},
         {"data", {{"train", train}, {"valid", valid}, {"format", format}, {"seq_len", 16}, {"overlong", "split"}}},
         {"train", {{"steps", 4}, {"micro_batch_size", 4}, {"seed", 7}, {"eval_every", 2}, {"threads", 1}}},
         {"optim", {{"warmup_steps", 1}}}},
        "test", "");
    TrainOptions opt;
    opt.out_dir = (d / out).string();
    opt.progress = false;
    opt.peak_gflops = 100;  // skip the FMA probe
    return run_training(rc, opt);
  };
  const auto a = run("tokens", jsonl("train.jsonl", train_docs), jsonl("valid.jsonl", valid_docs), "from_jsonl");
  const auto b = run("bin", bin("train.bin", train_docs), bin("valid.bin", valid_docs), "from_bin");
  ASSERT_EQ(a.steps, 4);
  ASSERT_EQ(b.steps, 4);
  EXPECT_EQ(a.first_loss, b.first_loss);
  EXPECT_EQ(a.last_loss, b.last_loss);

  // metrics.jsonl: the computed quantities per step are equal (timings are not compared).
  const auto metrics = [&](const std::string& out) {
    std::vector<nlohmann::json> lines;
    std::ifstream in(d / out / "metrics.jsonl");
    std::string line;
    while (std::getline(in, line)) lines.push_back(nlohmann::json::parse(line));
    return lines;
  };
  const auto ma = metrics("from_jsonl"), mb = metrics("from_bin");
  ASSERT_EQ(ma.size(), 4u);
  ASSERT_EQ(mb.size(), ma.size());
  int valid_seen = 0;
  for (size_t i = 0; i < ma.size(); ++i) {
    for (const char* k : {"step", "loss", "aux_loss", "z_loss", "lr", "grad_norm", "expert_load"})
      EXPECT_EQ(ma[i].at(k), mb[i].at(k)) << "step " << i + 1 << " key " << k;
    ASSERT_EQ(ma[i].contains("valid_loss"), mb[i].contains("valid_loss"));
    if (ma[i].contains("valid_loss")) {
      EXPECT_EQ(ma[i]["valid_loss"], mb[i]["valid_loss"]);
      ++valid_seen;
    }
  }
  EXPECT_EQ(valid_seen, 2);  // steps 2 and 4

  // The final checkpoints' tensors, byte for byte.
  const fs::path ca = a.final_checkpoint, cb = b.final_checkpoint;
  ASSERT_EQ(ca.filename(), cb.filename());
  int compared = 0;
  for (const auto& e : fs::directory_iterator(ca)) {
    if (e.path().extension() != ".safetensors") continue;
    const fs::path other = cb / e.path().filename();
    ASSERT_TRUE(fs::exists(other)) << other;
    EXPECT_EQ(bytes_of(e.path().string()), bytes_of(other.string())) << e.path().filename();
    ++compared;
  }
  EXPECT_GE(compared, 2);  // model and optimizer
  fs::remove_all(d);
}
