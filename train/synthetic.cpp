// Synthetic arithmetic-progression documents for the demo (see synthetic.hpp).
#include "train/synthetic.hpp"

#include <algorithm>
#include <fstream>

#include "moe/error.hpp"

namespace moetune {
namespace {

// Uniform integer in [lo, hi] (modulo bias is negligible at these sizes).
int64_t uniform(uint64_t& state, int64_t lo, int64_t hi) {
  return lo + int64_t(splitmix64(state) % uint64_t(hi - lo + 1));
}

void append_array(std::string& s, const std::vector<int32_t>& v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(v[i]);
  }
  s += ']';
}

}  // namespace

Document synthetic_document(uint64_t& state, int vocab_size, int len) {
  const int64_t M = vocab_size - 2;  // symbols 2 .. V-1
  const int64_t max_step = std::min<int64_t>(kSyntheticMaxStep, M - 1);
  int64_t x = uniform(state, 0, M - 1);
  const int64_t step = uniform(state, 1, max_step);
  Document d;
  d.input_ids.reserve(size_t(len));
  d.input_ids.push_back(kSyntheticBos);
  for (int t = 1; t < len; ++t) {
    d.input_ids.push_back(int32_t(2 + x));
    x = (x + step) % M;
  }
  d.labels = d.input_ids;
  d.labels[0] = kIgnoreIndex;  // BOS and the random start are the "prompt":
  d.labels[1] = kIgnoreIndex;  // not trained on
  return d;
}

std::vector<Document> synthetic_documents(int num_docs, int vocab_size, int min_len, int max_len, uint64_t seed) {
  if (num_docs < 1) throw Error("synthetic data: number of documents must be >= 1, got " + std::to_string(num_docs));
  if (vocab_size < 4) throw Error("synthetic data: vocab_size must be >= 4, got " + std::to_string(vocab_size));
  if (min_len < 3) throw Error("synthetic data: min_len must be >= 3, got " + std::to_string(min_len));
  if (max_len < min_len)
    throw Error("synthetic data: max_len (" + std::to_string(max_len) + ") must be >= min_len (" +
                std::to_string(min_len) + ")");
  std::vector<Document> docs;
  docs.reserve(size_t(num_docs));
  uint64_t state = seed;
  for (int i = 0; i < num_docs; ++i) {
    const int len = int(uniform(state, min_len, max_len));
    docs.push_back(synthetic_document(state, vocab_size, len));
  }
  return docs;
}

void write_synthetic_jsonl(const std::string& path, int num_docs, int vocab_size, int min_len, int max_len,
                           uint64_t seed) {
  const std::vector<Document> docs = synthetic_documents(num_docs, vocab_size, min_len, max_len, seed);
  std::ofstream out(path);
  if (!out) throw Error(path + ": cannot open for writing");
  std::string line;
  for (const Document& d : docs) {
    line = "{\"input_ids\":";
    append_array(line, d.input_ids);
    line += ",\"labels\":";
    append_array(line, d.labels);
    line += "}\n";
    out << line;
  }
  out.flush();
  if (!out) throw Error(path + ": write error");
}

}  // namespace moetune
