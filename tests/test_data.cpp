// Data pipeline: JSONL reading and its errors, packing / padding, shuffling, batch
// shapes, exact resume (suites Data*), and the synthetic generator (Synthetic*).
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "moe/error.hpp"
#include "train/data.hpp"
#include "train/synthetic.hpp"
#include "test_util.hpp"

using namespace moetune;
using namespace moetune::testing;
namespace fs = std::filesystem;

namespace {

std::string read_error(const std::string& path, int vocab) {
  try {
    read_jsonl_documents(path, vocab);
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

// Document k has tokens k*kStride + 1 + j (j = 0 .. len-1): every token of every
// document is distinct and never equals pad id 0, so a row can be decoded back.
constexpr int32_t kStride = 64;
Document tagged_doc(int k, int len) {
  Document d;
  for (int j = 0; j < len; ++j) d.input_ids.push_back(k * kStride + 1 + j);
  d.labels = d.input_ids;
  return d;
}
int doc_of(int32_t tok) { return (tok - 1) / kStride; }
int pos_of(int32_t tok) { return (tok - 1) % kStride; }

std::vector<Document> tagged_docs(int n, int min_len, int max_len, uint64_t seed) {
  uint64_t st = seed;
  std::vector<Document> docs;
  for (int k = 0; k < n; ++k) docs.push_back(tagged_doc(k, min_len + int(splitmix64(st) % (max_len - min_len + 1))));
  return docs;
}

// All rows of one micro-batch list as (ids, labels, doc_ids) triples of one row each.
struct Row {
  std::vector<int32_t> ids, labels, doc_ids;
};
std::vector<Row> rows_of(const std::vector<MicroBatch>& mbs) {
  std::vector<Row> out;
  for (const auto& mb : mbs)
    for (int r = 0; r < mb.rows; ++r) {
      auto b = size_t(r) * mb.seq_len, e = b + mb.seq_len;
      out.push_back({{mb.input_ids.begin() + b, mb.input_ids.begin() + e},
                     {mb.labels.begin() + b, mb.labels.begin() + e},
                     {mb.doc_ids.begin() + b, mb.doc_ids.begin() + e}});
    }
  return out;
}

// Checks the invariants of one row built from tagged documents and returns the
// tokens it holds per document (doc -> count). Fails the test on a violation.
void check_row(const Row& row, int seq_len, std::map<int, int>& tokens_of_doc, int* docs_in_row = nullptr) {
  int t = 0, local = 0;
  while (t < seq_len && row.ids[t] != 0) {
    const int doc = doc_of(row.ids[t]);
    ASSERT_EQ(row.doc_ids[t], local) << "doc ids must be 0,1,2,... in row order";
    int j = 0;
    while (t < seq_len && row.ids[t] != 0 && doc_of(row.ids[t]) == doc) {
      ASSERT_EQ(pos_of(row.ids[t]), j) << "a document must start at its first token and stay contiguous";
      ASSERT_EQ(row.labels[t], row.ids[t]);
      ASSERT_EQ(row.doc_ids[t], local);
      ++t, ++j;
    }
    ASSERT_EQ(tokens_of_doc.count(doc), 0u) << "document " << doc << " appears twice in an epoch";
    tokens_of_doc[doc] = j;
    ++local;
  }
  for (; t < seq_len; ++t) {  // padding: only at the end
    ASSERT_EQ(row.ids[t], 0);
    ASSERT_EQ(row.labels[t], kIgnoreIndex);
    ASSERT_EQ(row.doc_ids[t], local) << "padding gets the id after the last document";
  }
  if (docs_in_row) *docs_in_row = local;
}

}  // namespace

// ---------------------------------------------------------------- JSONL reading

TEST(DataJsonl, ReadsDocumentsDefaultLabelsAndIgnoreIndex) {
  const auto p = write_file("ok.jsonl",
                            "{\"input_ids\": [1, 2, 3]}\n"
                            "\n"
                            "   \r\n"
                            "{\"labels\": [-100, 5, 63], \"input_ids\": [4, 5, 63]}\r\n");
  const auto docs = read_jsonl_documents(p, 64);
  ASSERT_EQ(docs.size(), 2u);
  EXPECT_EQ(docs[0].input_ids, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(docs[0].labels, docs[0].input_ids);
  EXPECT_EQ(docs[1].input_ids, (std::vector<int32_t>{4, 5, 63}));
  EXPECT_EQ(docs[1].labels, (std::vector<int32_t>{-100, 5, 63}));
}

TEST(DataJsonl, ErrorsNameFileAndLine) {
  struct Case {
    std::string line, expect;
  };
  const std::vector<Case> cases = {
      {"{\"input_ids\": [1, 2", "invalid JSON"},
      {"[1, 2, 3]", "expected a JSON object"},
      {"{\"labels\": [1]}", "missing key 'input_ids'"},
      {"{\"input_ids\": []}", "'input_ids' is empty"},
      {"{\"input_ids\": 5}", "must be an array"},
      {"{\"input_ids\": [1, \"a\"]}", "input_ids[1] must be an integer"},
      {"{\"input_ids\": [1, 2.5]}", "input_ids[1] must be an integer"},
      {"{\"input_ids\": [1, 70]}", "token id 70 at input_ids[1] is outside the vocabulary [0, 64)"},
      {"{\"input_ids\": [-1]}", "token id -1"},
      {"{\"input_ids\": [1, 2], \"labels\": [1]}", "'labels' has 1 elements but 'input_ids' has 2"},
      {"{\"input_ids\": [1, 2], \"labels\": [1, 99]}", "label 99 at labels[1]"},
      {"{\"input_ids\": [1, 2], \"labels\": [1, -5]}", "label -5"},
      {"{\"input_ids\": [1], \"text\": \"hi\"}", "unknown key 'text'"},
  };
  for (const auto& c : cases) {
    const auto p = write_file("bad.jsonl", "{\"input_ids\": [1, 2]}\n\n" + c.line + "\n{\"input_ids\": [3]}\n");
    const std::string err = read_error(p, 64);
    EXPECT_NE(err.find(p + ":3: "), std::string::npos) << c.line << " -> " << err;
    EXPECT_NE(err.find(c.expect), std::string::npos) << c.line << " -> " << err;
  }
  EXPECT_NE(read_error(write_file("v.jsonl", "{\"input_ids\": [64]}\n"), 64).find("vocab_size 64"), std::string::npos);
}

TEST(DataJsonl, EmptyOrMissingFileIsAnError) {
  const auto empty = write_file("empty.jsonl", "");
  EXPECT_EQ(read_error(empty, 64), empty + ": no documents");
  const auto blank = write_file("blank.jsonl", "\n  \n\n");
  EXPECT_EQ(read_error(blank, 64), blank + ": no documents");
  const auto missing = test_path("missing.jsonl");
  EXPECT_NE(read_error(missing, 64).find(missing + ": cannot open"), std::string::npos);
}

// ---------------------------------------------------------------- packing / padding

TEST(DataPacking, ExactLayoutOfASmallEpoch) {
  // Lengths 3,4,2,5,1 into rows of 8, in file order: [d0 d1 pad] [d2 d3 d4].
  std::vector<Document> docs;
  for (int k = 0; k < 5; ++k) docs.push_back(tagged_doc(k, std::vector<int>{3, 4, 2, 5, 1}[k]));
  DataConfig cfg;
  cfg.seq_len = 8;
  cfg.shuffle = false;
  BatchLoader loader(docs, cfg, 1);
  ASSERT_EQ(loader.rows_per_epoch(), 2);
  EXPECT_EQ(loader.tokens_per_epoch(), 15);
  EXPECT_EQ(loader.truncated_documents(), 0);
  const auto mbs = loader.next_global_batch(2, 1);
  const auto& mb = mbs[0];
  EXPECT_EQ(mb.input_ids, (std::vector<int32_t>{1, 2, 3, 65, 66, 67, 68, 0,  //
                                                129, 130, 193, 194, 195, 196, 197, 257}));
  EXPECT_EQ(mb.doc_ids, (std::vector<int32_t>{0, 0, 0, 1, 1, 1, 1, 2,  //
                                              0, 0, 1, 1, 1, 1, 1, 2}));
  EXPECT_EQ(mb.labels[7], kIgnoreIndex);
  // Targets: inside a document the next token; across a boundary or into padding none.
  EXPECT_EQ(mb.target(0), 2);
  EXPECT_EQ(mb.target(2), kIgnoreIndex);   // end of d0
  EXPECT_EQ(mb.target(6), kIgnoreIndex);   // end of d1, next is padding
  EXPECT_EQ(mb.target(9), kIgnoreIndex);   // end of d2
  EXPECT_EQ(mb.target(14), kIgnoreIndex);  // end of d3
  EXPECT_EQ(mb.count_targets(), (3 - 1) + (4 - 1) + (2 - 1) + (5 - 1) + (1 - 1));
}

TEST(DataPacking, EveryTokenExactlyOncePerEpochAndTruncationCounted) {
  const int seq_len = 32;
  auto docs = tagged_docs(300, 1, 45, 7);  // some longer than seq_len
  int64_t expect_tokens = 0, expect_trunc = 0;
  for (const auto& d : docs) {
    expect_tokens += std::min<int64_t>(d.input_ids.size(), seq_len);
    expect_trunc += int64_t(d.input_ids.size()) > seq_len;
  }
  ASSERT_GT(expect_trunc, 0);
  DataConfig cfg;
  cfg.seq_len = seq_len;
  BatchLoader loader(docs, cfg, 99);
  EXPECT_EQ(loader.tokens_per_epoch(), expect_tokens);
  EXPECT_EQ(loader.truncated_documents(), expect_trunc);

  for (int epoch = 0; epoch < 2; ++epoch) {
    const int64_t rows = loader.rows_per_epoch();
    ASSERT_EQ(loader.state().epoch, epoch);
    // Greedy packing never leaves a row emptier than the document that follows it,
    // so it needs fewer rows than one document per row would.
    EXPECT_LT(rows, int64_t(docs.size()));
    const auto all = rows_of(loader.next_global_batch(int(rows), 1));
    std::map<int, int> seen;
    int64_t tokens = 0;
    for (const auto& r : all) {
      check_row(r, seq_len, seen);
      if (HasFatalFailure()) return;
    }
    ASSERT_EQ(seen.size(), docs.size()) << "every document once per epoch";
    for (const auto& [doc, n] : seen) {
      EXPECT_EQ(n, std::min<int>(int(docs[doc].input_ids.size()), seq_len)) << "document " << doc;
      tokens += n;
    }
    EXPECT_EQ(tokens, expect_tokens);
  }
  // After the last row of an epoch the position is the start of the next one.
  EXPECT_EQ(loader.state().epoch, 2);
  EXPECT_EQ(loader.state().row, 0);
}

TEST(DataPacking, RowsAreFilledGreedily) {
  // A row is closed only when the next document (in epoch order) does not fit.
  auto docs = tagged_docs(200, 1, 20, 3);
  DataConfig cfg;
  cfg.seq_len = 24;
  BatchLoader loader(docs, cfg, 5);
  const auto order = epoch_order(int64_t(docs.size()), 5, 0, true);
  const auto rows = rows_of(loader.next_global_batch(int(loader.rows_per_epoch()), 1));
  size_t next = 0;  // index in `order` of the first document of the following row
  for (size_t r = 0; r < rows.size(); ++r) {
    int used = 0;
    while (used < cfg.seq_len && rows[r].ids[used] != 0) ++used;
    while (next < order.size() && used > 0) {  // walk past the documents of this row
      used -= int(docs[order[next]].input_ids.size());
      ++next;
    }
    ASSERT_EQ(used, 0) << "row " << r << " does not hold whole documents in epoch order";
    int fill = 0;
    while (fill < cfg.seq_len && rows[r].ids[fill] != 0) ++fill;
    if (next < order.size()) {
      EXPECT_GT(fill + int(docs[order[next]].input_ids.size()), cfg.seq_len) << "row " << r << " closed too early";
    }
  }
  EXPECT_EQ(next, order.size());
}

TEST(DataPacking, OverlongErrorMode) {
  std::vector<Document> docs = {tagged_doc(0, 5), tagged_doc(1, 9)};
  DataConfig cfg;
  cfg.seq_len = 8;
  cfg.overlong = "error";
  try {
    BatchLoader loader(docs, cfg, 1);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("document 1"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("data.seq_len = 8"), std::string::npos) << e.what();
  }
  cfg.overlong = "truncate";
  BatchLoader loader(docs, cfg, 1);
  EXPECT_EQ(loader.truncated_documents(), 1);
  EXPECT_EQ(loader.tokens_per_epoch(), 5 + 8);
  cfg.overlong = "drop";
  EXPECT_THROW(BatchLoader(docs, cfg, 1), Error);
}

TEST(DataNoPacking, OneDocumentPerRowPadded) {
  auto docs = tagged_docs(40, 1, 12, 11);
  DataConfig cfg;
  cfg.seq_len = 10;
  cfg.packing = false;
  cfg.shuffle = false;
  cfg.pad_id = 7;
  BatchLoader loader(docs, cfg, 1);
  ASSERT_EQ(loader.rows_per_epoch(), 40);
  const auto rows = rows_of(loader.next_global_batch(8, 5));
  ASSERT_EQ(rows.size(), 40u);
  for (size_t r = 0; r < rows.size(); ++r) {
    const int len = std::min<int>(int(docs[r].input_ids.size()), cfg.seq_len);
    for (int t = 0; t < cfg.seq_len; ++t) {
      if (t < len) {
        EXPECT_EQ(rows[r].ids[t], docs[r].input_ids[t]);
        EXPECT_EQ(rows[r].doc_ids[t], 0);
      } else {
        EXPECT_EQ(rows[r].ids[t], 7);
        EXPECT_EQ(rows[r].labels[t], kIgnoreIndex);
        EXPECT_EQ(rows[r].doc_ids[t], 1);
      }
    }
  }
}

// ---------------------------------------------------------------- shuffling

TEST(DataShuffle, Splitmix64MatchesTheReferenceStream) {
  // First outputs of Vigna's reference splitmix64.c from state 0 (regression pin: the
  // shuffles must be identical on every platform).
  uint64_t st = 0;
  EXPECT_EQ(splitmix64(st), 0xE220A8397B1DCDAFULL);
  EXPECT_EQ(splitmix64(st), 0x6E789E6AA1B965F4ULL);
}

TEST(DataShuffle, DeterministicInSeedAndDiffersBetweenEpochsAndSeeds) {
  const auto a = epoch_order(100, 5, 0, true);
  EXPECT_EQ(a, epoch_order(100, 5, 0, true));
  EXPECT_NE(a, epoch_order(100, 5, 1, true));
  EXPECT_NE(a, epoch_order(100, 6, 0, true));
  std::vector<int64_t> sorted = a, identity(100);
  std::sort(sorted.begin(), sorted.end());
  for (int i = 0; i < 100; ++i) identity[i] = i;
  EXPECT_EQ(sorted, identity) << "a permutation";
  EXPECT_NE(a, identity);
  EXPECT_EQ(epoch_order(100, 5, 3, false), identity);

  // Same through the loader: same seed, same stream; another seed, another stream.
  auto docs = tagged_docs(50, 1, 10, 2);
  DataConfig cfg;
  cfg.seq_len = 16;
  BatchLoader x(docs, cfg, 42), y(docs, cfg, 42), z(docs, cfg, 43);
  for (int i = 0; i < 5; ++i) {
    const auto bx = x.next_global_batch(4, 2), by = y.next_global_batch(4, 2), bz = z.next_global_batch(4, 2);
    for (int m = 0; m < 2; ++m) {
      EXPECT_EQ(bx[m].input_ids, by[m].input_ids);
      EXPECT_EQ(bx[m].doc_ids, by[m].doc_ids);
      if (i == 0) {
        EXPECT_NE(bx[m].input_ids, bz[m].input_ids);
      }
    }
  }
}

// ---------------------------------------------------------------- batches and resume

TEST(DataLoader, GlobalBatchShapesAndConsecutiveRows) {
  auto docs = tagged_docs(30, 2, 9, 4);
  DataConfig cfg;
  cfg.seq_len = 12;
  BatchLoader a(docs, cfg, 8), b(docs, cfg, 8);
  const auto g = a.next_global_batch(3, 4);
  ASSERT_EQ(g.size(), 4u);
  for (const auto& mb : g) {
    EXPECT_EQ(mb.rows, 3);
    EXPECT_EQ(mb.seq_len, 12);
    EXPECT_EQ(mb.input_ids.size(), 36u);
    EXPECT_EQ(mb.labels.size(), 36u);
    EXPECT_EQ(mb.doc_ids.size(), 36u);
  }
  EXPECT_EQ(a.state().row, 12);
  // The same 12 rows, one per micro-batch.
  const auto ra = rows_of(g), rb = rows_of(b.next_global_batch(1, 12));
  ASSERT_EQ(ra.size(), rb.size());
  for (size_t r = 0; r < ra.size(); ++r) {
    EXPECT_EQ(ra[r].ids, rb[r].ids);
    EXPECT_EQ(ra[r].labels, rb[r].labels);
    EXPECT_EQ(ra[r].doc_ids, rb[r].doc_ids);
  }
  EXPECT_THROW(a.next_global_batch(0, 1), Error);
  EXPECT_THROW(a.next_global_batch(1, 0), Error);
}

TEST(DataLoader, StateResumesTheExactStreamAcrossEpochs) {
  auto docs = tagged_docs(25, 1, 14, 6);
  DataConfig cfg;
  cfg.seq_len = 16;
  BatchLoader a(docs, cfg, 77);
  const int64_t rows0 = a.rows_per_epoch();
  // Stop mid-epoch, then run on across several epoch boundaries.
  a.next_global_batch(3, 1);
  const auto saved = a.state();
  EXPECT_EQ(saved.epoch, 0);
  EXPECT_EQ(saved.row, 3);
  std::vector<std::vector<MicroBatch>> expect;
  for (int i = 0; i < 10; ++i) expect.push_back(a.next_global_batch(2, 3));
  EXPECT_GE(a.state().epoch, 2) << "the test must cross epochs (rows per epoch " << rows0 << ")";

  BatchLoader b(docs, cfg, 77);
  b.set_state(saved);
  for (int i = 0; i < 10; ++i) {
    const auto got = b.next_global_batch(2, 3);
    for (int m = 0; m < 3; ++m) {
      ASSERT_EQ(got[m].input_ids, expect[i][m].input_ids) << "batch " << i;
      ASSERT_EQ(got[m].labels, expect[i][m].labels);
      ASSERT_EQ(got[m].doc_ids, expect[i][m].doc_ids);
    }
  }
  EXPECT_EQ(b.state().epoch, a.state().epoch);
  EXPECT_EQ(b.state().row, a.state().row);

  // Resuming in a later epoch, from a third loader, gives the same rows too.
  BatchLoader c(docs, cfg, 77);
  const auto later = b.state();
  const auto want = b.next_global_batch(4, 1);
  c.set_state(later);
  EXPECT_EQ(c.next_global_batch(4, 1)[0].input_ids, want[0].input_ids);

  // The end of an epoch is the start of the next.
  BatchLoader d(docs, cfg, 77);
  d.set_state({0, rows0});
  EXPECT_EQ(d.state().epoch, 1);
  EXPECT_EQ(d.state().row, 0);

  // A position outside the epoch is rejected and leaves the loader where it was.
  const auto before = c.state();
  EXPECT_THROW(c.set_state({0, rows0 + 1}), Error);
  EXPECT_THROW(c.set_state({-1, 0}), Error);
  EXPECT_EQ(c.state().epoch, before.epoch);
  EXPECT_EQ(c.state().row, before.row);
}

// ---------------------------------------------------------------- synthetic data

TEST(Synthetic, DeterministicInSeedAndWithinVocab) {
  const auto p1 = test_path("a.jsonl"), p2 = test_path("b.jsonl"), p3 = test_path("c.jsonl");
  write_synthetic_jsonl(p1, 200, 64, 6, 30, 9);
  write_synthetic_jsonl(p2, 200, 64, 6, 30, 9);
  write_synthetic_jsonl(p3, 200, 64, 6, 30, 10);
  auto slurp = [](const std::string& p) {
    std::ifstream in(p);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  };
  EXPECT_EQ(slurp(p1), slurp(p2));
  EXPECT_NE(slurp(p1), slurp(p3));
  const auto docs = read_jsonl_documents(p1, 64);  // the reader checks ids against the vocab
  ASSERT_EQ(docs.size(), 200u);
  std::set<size_t> lengths;
  for (const auto& d : docs) {
    ASSERT_GE(d.input_ids.size(), 6u);
    ASSERT_LE(d.input_ids.size(), 30u);
    lengths.insert(d.input_ids.size());
    EXPECT_EQ(d.input_ids[0], kSyntheticBos);
    EXPECT_EQ(d.labels[0], kIgnoreIndex);
    EXPECT_EQ(d.labels[1], kIgnoreIndex);
    for (size_t t = 1; t < d.input_ids.size(); ++t) {
      EXPECT_GE(d.input_ids[t], 2);
      EXPECT_LT(d.input_ids[t], 64);
      if (t >= 2) {
        EXPECT_EQ(d.labels[t], d.input_ids[t]);
      }
    }
  }
  EXPECT_GT(lengths.size(), 10u) << "document lengths should vary";
  // Small vocabularies still work (one symbol step left).
  const auto p4 = test_path("d.jsonl");
  write_synthetic_jsonl(p4, 20, 4, 3, 5, 1);
  EXPECT_EQ(read_jsonl_documents(p4, 4).size(), 20u);
}

TEST(Synthetic, TargetsAreLearnable) {
  // Every trained target after the first is a function of the two tokens before it,
  // and the first trained target takes at most kSyntheticMaxStep values given its
  // predecessor: a model can push the loss far below log(V).
  const int V = 64;
  const auto p = test_path("s.jsonl");
  write_synthetic_jsonl(p, 500, V, 5, 40, 3);
  std::map<std::pair<int, int>, int> next_of;
  std::map<int, std::set<int>> first_targets;
  std::set<int> steps;
  for (const auto& d : read_jsonl_documents(p, V)) {
    const int M = V - 2;
    steps.insert(((d.input_ids[2] - d.input_ids[1]) % M + M) % M);
    first_targets[d.input_ids[1]].insert(d.labels[2]);
    for (size_t t = 3; t < d.input_ids.size(); ++t) {
      const auto key = std::make_pair(int(d.input_ids[t - 2]), int(d.input_ids[t - 1]));
      auto [it, fresh] = next_of.emplace(key, d.labels[t]);
      ASSERT_EQ(it->second, d.labels[t]) << "target not determined by the two previous tokens";
    }
  }
  EXPECT_EQ(steps, (std::set<int>{1, 2, 3}));
  for (const auto& [prev, targets] : first_targets) EXPECT_LE(int(targets.size()), kSyntheticMaxStep);
}

TEST(Synthetic, RejectsBadArguments) {
  const auto p = test_path("x.jsonl");
  EXPECT_THROW(write_synthetic_jsonl(p, 0, 64, 4, 8, 1), Error);
  EXPECT_THROW(write_synthetic_jsonl(p, 10, 3, 4, 8, 1), Error);
  EXPECT_THROW(write_synthetic_jsonl(p, 10, 64, 2, 8, 1), Error);
  EXPECT_THROW(write_synthetic_jsonl(p, 10, 64, 9, 8, 1), Error);
  EXPECT_THROW(write_synthetic_jsonl(test_path("no/such/dir/x.jsonl"), 10, 64, 4, 8, 1), Error);
}
