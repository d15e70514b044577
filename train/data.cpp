// JSONL document reader and the BatchLoader row stream (packing, padding, per-epoch
// shuffling, exact resume). Contract in data.hpp, user documentation in docs/data.md.
#include "train/data.hpp"

#include <algorithm>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <utility>

#include "io/token_file.hpp"
#include "moe/error.hpp"

namespace moetune {
namespace {

using json = nlohmann::json;

bool blank(const std::string& s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; });
}

// Reads the integer array j[key] into out. `at` is "<path>:<line>". Ids must lie in
// [0, vocab_size); labels may also be -100.
void read_ids(const json& obj, const char* key, const std::string& at, int vocab_size, bool is_label,
              std::vector<int32_t>& out) {
  const json& arr = obj.at(key);
  if (!arr.is_array()) throw Error(at + ": '" + key + "' must be an array of integers, got " + arr.dump());
  out.reserve(arr.size());
  for (size_t i = 0; i < arr.size(); ++i) {
    const json& v = arr[i];
    const std::string elem = std::string(key) + "[" + std::to_string(i) + "]";
    if (!v.is_number_integer()) throw Error(at + ": " + elem + " must be an integer, got " + v.dump());
    int64_t id;
    if (v.is_number_unsigned()) {
      const uint64_t u = v.get<uint64_t>();
      id = u > uint64_t(std::numeric_limits<int64_t>::max()) ? std::numeric_limits<int64_t>::max() : int64_t(u);
    } else {
      id = v.get<int64_t>();
    }
    if (is_label && id == kIgnoreIndex) {
      out.push_back(kIgnoreIndex);
      continue;
    }
    if (id < 0 || id >= vocab_size) {
      if (is_label)
        throw Error(at + ": label " + v.dump() + " at " + elem + " is outside the vocabulary [0, " +
                    std::to_string(vocab_size) + ") and is not -100 (vocab_size " + std::to_string(vocab_size) + ")");
      throw Error(at + ": token id " + v.dump() + " at " + elem + " is outside the vocabulary [0, " +
                  std::to_string(vocab_size) + ") (vocab_size " + std::to_string(vocab_size) + ")");
    }
    out.push_back(int32_t(id));
  }
}

}  // namespace

std::vector<Document> read_jsonl_documents(const std::string& path, int vocab_size) {
  if (vocab_size <= 0) throw Error(path + ": vocab_size must be positive, got " + std::to_string(vocab_size));
  std::ifstream in(path);
  if (!in) throw Error(path + ": cannot open file");
  std::vector<Document> docs;
  std::string line;
  int64_t lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (blank(line)) continue;
    const std::string at = path + ":" + std::to_string(lineno);
    json j;
    try {
      j = json::parse(line);
    } catch (const json::exception& e) {
      throw Error(at + ": invalid JSON: " + e.what());
    }
    if (!j.is_object()) throw Error(at + ": expected a JSON object {\"input_ids\": [...]}, got " + j.dump());
    for (auto it = j.begin(); it != j.end(); ++it)
      if (it.key() != "input_ids" && it.key() != "labels")
        throw Error(at + ": unknown key '" + it.key() + "' (allowed: input_ids, labels)");
    if (!j.contains("input_ids")) throw Error(at + ": missing key 'input_ids'");
    Document d;
    read_ids(j, "input_ids", at, vocab_size, false, d.input_ids);
    if (d.input_ids.empty()) throw Error(at + ": 'input_ids' is empty");
    if (j.contains("labels")) {
      read_ids(j, "labels", at, vocab_size, true, d.labels);
      if (d.labels.size() != d.input_ids.size())
        throw Error(at + ": 'labels' has " + std::to_string(d.labels.size()) + " elements but 'input_ids' has " +
                    std::to_string(d.input_ids.size()) + " (they must have equal length)");
    } else {
      d.labels = d.input_ids;
    }
    docs.push_back(std::move(d));
  }
  if (in.bad()) throw Error(path + ": read error");
  if (docs.empty()) throw Error(path + ": no documents");
  return docs;
}

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

std::vector<int64_t> epoch_order(int64_t n, uint64_t seed, int64_t epoch, bool shuffle) {
  std::vector<int64_t> order(size_t(std::max<int64_t>(n, 0)));
  for (int64_t i = 0; i < n; ++i) order[size_t(i)] = i;
  if (!shuffle) return order;
  // One stream per (seed, epoch): hash the seed, then fold the epoch in.
  uint64_t st = seed;
  st = splitmix64(st) ^ (0xA0761D6478BD642FULL * (uint64_t(epoch) + 1));
  for (int64_t i = n - 1; i > 0; --i) {
    const int64_t j = int64_t(splitmix64(st) % uint64_t(i + 1));
    std::swap(order[size_t(i)], order[size_t(j)]);
  }
  return order;
}

VectorDocuments::VectorDocuments(std::vector<Document> docs, const std::string& name) : docs_(std::move(docs)) {
  for (size_t i = 0; i < docs_.size(); ++i) {
    if (docs_[i].input_ids.empty()) throw Error(name + ": document " + std::to_string(i) + " is empty");
    if (docs_[i].labels.size() != docs_[i].input_ids.size())
      throw Error(name + ": document " + std::to_string(i) + " has labels of a different length than input_ids");
  }
}

void VectorDocuments::copy(int64_t d, int64_t off, int32_t len, int32_t* ids, int32_t* labels) const {
  const Document& doc = docs_[size_t(d)];
  std::copy_n(doc.input_ids.begin() + off, len, ids);
  std::copy_n(doc.labels.begin() + off, len, labels);
}

TokenFileDocuments::TokenFileDocuments(const std::string& path, int model_vocab_size)
    : file_(std::make_unique<TokenFile>(path)) {
  if (file_->vocab_size() > uint64_t(model_vocab_size))
    throw Error(path + ": the token file's vocabulary has " + std::to_string(file_->vocab_size()) +
                " ids but key 'model.vocab_size' is " + std::to_string(model_vocab_size) +
                " (the model must cover the tokenizer it was prepared with)");
  if (file_->num_docs() > uint64_t(std::numeric_limits<int64_t>::max()))
    throw Error(path + ": too many documents");
}
TokenFileDocuments::~TokenFileDocuments() = default;
int64_t TokenFileDocuments::num_docs() const { return int64_t(file_->num_docs()); }
int64_t TokenFileDocuments::length(int64_t d) const { return int64_t(file_->doc_length(uint64_t(d))); }
void TokenFileDocuments::copy(int64_t d, int64_t off, int32_t len, int32_t* ids, int32_t* labels) const {
  file_->copy(uint64_t(d), uint64_t(off), uint64_t(len), ids);
  std::copy_n(ids, len, labels);
}

BatchLoader::BatchLoader(std::vector<Document> docs, DataConfig cfg, uint64_t seed)
    : BatchLoader(std::make_shared<VectorDocuments>(std::move(docs),
                                                     cfg.train_path.empty() ? std::string("data") : cfg.train_path),
                  cfg, seed) {}

BatchLoader::BatchLoader(std::shared_ptr<const DocumentSource> docs, DataConfig cfg, uint64_t seed)
    : docs_(std::move(docs)), cfg_(std::move(cfg)), seed_(seed) {
  if (cfg_.seq_len <= 0) throw Error("data.seq_len must be positive, got " + std::to_string(cfg_.seq_len));
  if (cfg_.overlong != "truncate" && cfg_.overlong != "error" && cfg_.overlong != "split")
    throw Error("data.overlong must be \"truncate\", \"error\" or \"split\", got \"" + cfg_.overlong + "\"");
  const bool split = cfg_.overlong == "split";
  if (split && cfg_.seq_len < 2)
    throw Error("data.overlong = \"split\" needs data.seq_len >= 2, got " + std::to_string(cfg_.seq_len));
  const std::string src = cfg_.train_path.empty() ? std::string("data") : cfg_.train_path;
  const int64_t n = docs_->num_docs();
  if (n == 0) throw Error(src + ": no documents");
  const int64_t S = cfg_.seq_len;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t len = docs_->length(i);
    if (len <= 0) throw Error(src + ": document " + std::to_string(i) + " is empty");
    if (len > S) {
      if (cfg_.overlong == "error")
        throw Error(src + ": document " + std::to_string(i) + " (0-based, in file order) has " + std::to_string(len) +
                    " tokens, longer than data.seq_len = " + std::to_string(S) +
                    " (set data.overlong = \"truncate\" or \"split\")");
      ++(split ? split_ : truncated_);
    }
    if (!split) {
      tokens_ += std::min(len, S);
      continue;
    }
    for (int64_t off = 0;; off += S - 1) {  // units of S tokens, stride S - 1
      units_.push_back({i, off});
      tokens_ += std::min(S, len - off);
      if (off + S >= len) break;
    }
  }
  if (split && split_ == 0) units_.clear();  // units = documents: the stream without split
  build_epoch(0);
}

int64_t BatchLoader::num_units() const { return units_.empty() ? docs_->num_docs() : int64_t(units_.size()); }

int32_t BatchLoader::unit_length(int64_t u) const {
  const Unit x = unit(u);
  return int32_t(std::min<int64_t>(docs_->length(x.doc) - x.off, cfg_.seq_len));
}

void BatchLoader::build_epoch(int64_t epoch) {
  epoch_ = epoch;
  row_ = 0;
  pieces_.clear();
  row_start_.assign(1, 0);
  int64_t fill = 0;  // tokens in the row being built
  for (int64_t u : epoch_order(num_units(), seed_, epoch, cfg_.shuffle)) {
    const int32_t len = unit_length(u);
    // Close the current row when this unit does not fit (always, without packing).
    if (fill > 0 && (!cfg_.packing || fill + len > cfg_.seq_len)) {
      row_start_.push_back(int64_t(pieces_.size()));
      fill = 0;
    }
    pieces_.push_back({u, len});
    fill += len;
  }
  if (fill > 0) row_start_.push_back(int64_t(pieces_.size()));
}

void BatchLoader::write_row(int64_t row, int32_t* ids, int32_t* labels, int32_t* doc_ids) const {
  int pos = 0;
  int32_t local = 0;
  for (int64_t p = row_start_[size_t(row)]; p < row_start_[size_t(row) + 1]; ++p, ++local) {
    const Piece& pc = pieces_[size_t(p)];
    const Unit x = unit(pc.unit);
    docs_->copy(x.doc, x.off, pc.len, ids + pos, labels + pos);
    std::fill_n(doc_ids + pos, pc.len, local);
    pos += pc.len;
  }
  const int pad = cfg_.seq_len - pos;
  std::fill_n(ids + pos, pad, cfg_.pad_id);
  std::fill_n(labels + pos, pad, kIgnoreIndex);
  std::fill_n(doc_ids + pos, pad, local);  // `local` = number of units: distinct from theirs
}

std::vector<MicroBatch> BatchLoader::next_global_batch(int rows_per_micro, int micro_batches) {
  if (rows_per_micro <= 0) throw Error("next_global_batch: rows_per_micro must be positive");
  if (micro_batches <= 0) throw Error("next_global_batch: micro_batches must be positive");
  const int S = cfg_.seq_len;
  std::vector<MicroBatch> out(static_cast<size_t>(micro_batches));
  for (auto& mb : out) {
    mb.rows = rows_per_micro;
    mb.seq_len = S;
    const size_t n = size_t(rows_per_micro) * size_t(S);
    mb.input_ids.resize(n);
    mb.labels.resize(n);
    mb.doc_ids.resize(n);
    for (int r = 0; r < rows_per_micro; ++r) {
      const size_t off = size_t(r) * size_t(S);
      write_row(row_, mb.input_ids.data() + off, mb.labels.data() + off, mb.doc_ids.data() + off);
      // Move on to the next epoch as soon as this one is used up, so that state() is
      // always the position of a row that exists.
      if (++row_ == rows_per_epoch()) build_epoch(epoch_ + 1);
    }
  }
  return out;
}

BatchLoader::State BatchLoader::state() const { return {epoch_, row_}; }

void BatchLoader::set_state(State s) {
  if (s.epoch < 0) throw Error("data state: epoch must be >= 0, got " + std::to_string(s.epoch));
  const State old = state();
  build_epoch(s.epoch);
  if (s.row < 0 || s.row > rows_per_epoch()) {
    const int64_t rows = rows_per_epoch();
    build_epoch(old.epoch);  // leave the loader where it was
    row_ = old.row;
    throw Error("data state: row " + std::to_string(s.row) + " is outside epoch " + std::to_string(s.epoch) + " of " +
                std::to_string(rows) + " rows (was the data or data config changed?)");
  }
  row_ = s.row;
  if (row_ == rows_per_epoch()) build_epoch(epoch_ + 1);  // the end of an epoch is the start of the next
}

int64_t BatchLoader::rows_per_epoch() const { return int64_t(row_start_.size()) - 1; }
int64_t BatchLoader::truncated_documents() const { return truncated_; }
int64_t BatchLoader::tokens_per_epoch() const { return tokens_; }

}  // namespace moetune
