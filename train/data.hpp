// Training data: JSONL documents, and the deterministic stream of batch rows built
// from them (packing with document masking, or one padded document per row),
// shuffled per epoch, with an exact resume position. See docs/data.md.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moe/batch.hpp"

namespace moetune {

// One training document. input_ids and labels have equal length (Hugging Face
// convention: position t predicts labels[t+1]; a label of -100 is ignored).
struct Document {
  std::vector<int32_t> input_ids;
  std::vector<int32_t> labels;
};

// Reads JSONL: one object per non-empty line,
//   {"input_ids": [int, ...], "labels": [int, ...]}     ("labels" optional, default = input_ids).
// Every error is a moetune::Error naming "<path>:<line>" (1-based, counting every line):
// invalid JSON, not an object, missing or empty input_ids, non-integer element, labels
// of a different length, token id outside [0, vocab_size), label outside
// [0, vocab_size) and != -100, unknown key. A file without documents is the error
// "<path>: no documents".
std::vector<Document> read_jsonl_documents(const std::string& path, int vocab_size);

// Where the BatchLoader reads documents from: in memory (JSONL, SFT) or a memory-mapped
// token file (data.format "bin").
class DocumentSource {
 public:
  virtual ~DocumentSource() = default;
  virtual int64_t num_docs() const = 0;
  virtual int64_t length(int64_t d) const = 0;  // tokens of document d (> 0)
  // Copies tokens [off, off + len) of document d: input ids and labels.
  virtual void copy(int64_t d, int64_t off, int32_t len, int32_t* ids, int32_t* labels) const = 0;
};

// Documents held in memory. Throws moetune::Error naming `name` if one is empty or
// has labels of another length.
class VectorDocuments : public DocumentSource {
 public:
  VectorDocuments(std::vector<Document> docs, const std::string& name);
  int64_t num_docs() const override { return int64_t(docs_.size()); }
  int64_t length(int64_t d) const override { return int64_t(docs_[size_t(d)].input_ids.size()); }
  void copy(int64_t d, int64_t off, int32_t len, int32_t* ids, int32_t* labels) const override;

 private:
  std::vector<Document> docs_;
};

// Documents of a token file (io/token_file.hpp), read through its memory map; the
// labels are the ids (continued pre-training). Throws moetune::Error naming the file if
// it is invalid or its vocab_size exceeds `model_vocab_size` (key 'model.vocab_size').
class TokenFileDocuments : public DocumentSource {
 public:
  TokenFileDocuments(const std::string& path, int model_vocab_size);
  ~TokenFileDocuments() override;
  int64_t num_docs() const override;
  int64_t length(int64_t d) const override;
  void copy(int64_t d, int64_t off, int32_t len, int32_t* ids, int32_t* labels) const override;
  const class TokenFile& file() const { return *file_; }

 private:
  std::unique_ptr<class TokenFile> file_;
};

struct DataConfig {
  std::string train_path;             // JSONL; relative paths in a run config resolve against its directory
  std::string valid_path;             // optional held-out JSONL for the validation loss ("" = none)
  std::string format = "tokens";      // "tokens": JSONL {"input_ids", "labels"}; "sft": chat / prompt-completion
                                      // (docs/sft.md); "bin": token file of moetune data prepare
  std::string tokenizer;              // "" (the checkpoint's, else byte) | "byte" | tokenizer.json | checkpoint dir
  int seq_len = 64;                   // row length in tokens
  bool packing = true;                // true: pack whole documents into rows; false: one document per row
  bool shuffle = true;                // permute documents each epoch, from (seed, epoch)
  std::string overlong = "truncate";  // "truncate" | "error" | "split": documents longer than seq_len
  int32_t pad_id = 0;                 // input id of padding (its label is always -100)
};

// splitmix64: advances `state` and returns the next 64-bit output. Used for the
// shuffles so that the stream is identical on every platform and standard library.
uint64_t splitmix64(uint64_t& state);

// The document order of one epoch: 0..n-1, Fisher-Yates-permuted with a splitmix64
// stream seeded from (seed, epoch) when shuffle is true, the identity otherwise.
std::vector<int64_t> epoch_order(int64_t n, uint64_t seed, int64_t epoch, bool shuffle);

// A deterministic, endless stream of rows of seq_len tokens, made of units: the
// documents, where a document longer than seq_len (S) becomes, by data.overlong,
//  - "truncate": one unit, its first S tokens (counted by truncated_documents());
//  - "error":    a constructor error naming the document;
//  - "split":    units of S tokens with stride S - 1: unit k is tokens [k(S-1), k(S-1)+S)
//                (the last one shorter), so that every next-token target of the document
//                is trained exactly once: the last token of unit k is the first of unit
//                k + 1, where it is an input only (counted by split_documents()).
// Epoch e takes the units in epoch_order(units, seed, e, shuffle) and turns them into rows:
//  - packing: whole units are appended to the current row while they fit; when the
//    next one does not fit, the rest of the row is padding and a new row starts.
//  - no packing: one unit per row, the rest padding.
// Within a row the units get doc ids 0, 1, 2, ... in order and padding gets the next id,
// distinct from every unit's; padding has input pad_id and label -100. Labels are copied
// unchanged: MicroBatch::target() ignores the target across a doc id change. Rows are
// consumed in order; when an epoch is exhausted the next one starts (with its own order,
// hence possibly another row count). Without split, units are documents, one to one.
class BatchLoader {
 public:
  // Throws moetune::Error if there is no document, seq_len <= 0 (or < 2 with split),
  // overlong is not truncate|error|split, or (overlong = "error") a document is longer
  // than seq_len. The source is shared (e.g. by the training and validation loaders).
  BatchLoader(std::shared_ptr<const DocumentSource> docs, DataConfig cfg, uint64_t seed);
  // In-memory documents (VectorDocuments named cfg.train_path).
  BatchLoader(std::vector<Document> docs, DataConfig cfg, uint64_t seed);

  // The next global batch: `micro_batches` MicroBatch of `rows_per_micro` consecutive
  // rows each (input_ids, labels, doc_ids: rows_per_micro * seq_len, row-major).
  std::vector<MicroBatch> next_global_batch(int rows_per_micro, int micro_batches);

  // Position in the stream, for exact resume: the next row is row `row` of epoch `epoch`
  // (always a row that exists: after the last row of an epoch, state() is {epoch + 1, 0}).
  struct State {
    int64_t epoch = 0;
    int64_t row = 0;
  };
  State state() const;
  // Rebuilds the rows of s.epoch and continues from s.row ({e, rows of e} means {e + 1, 0}).
  // Throws moetune::Error, leaving the position unchanged, when s.epoch < 0 or s.row is
  // outside [0, rows of that epoch].
  void set_state(State s);

  int64_t rows_per_epoch() const;       // rows of the current epoch
  int64_t truncated_documents() const;  // documents longer than seq_len, truncated (per epoch)
  int64_t split_documents() const { return split_; }  // documents longer than seq_len, split
  int64_t tokens_per_epoch() const;     // unit tokens per epoch (no padding)
  int64_t num_documents() const { return docs_->num_docs(); }
  int64_t num_units() const;
  const DataConfig& config() const { return cfg_; }

 private:
  // A row is a list of (unit index, length) pieces laid out from position 0.
  struct Piece {
    int64_t unit;
    int32_t len;
  };
  struct Unit {
    int64_t doc, off;
  };
  Unit unit(int64_t u) const { return units_.empty() ? Unit{u, 0} : units_[size_t(u)]; }
  int32_t unit_length(int64_t u) const;
  void build_epoch(int64_t epoch);
  void write_row(int64_t row, int32_t* ids, int32_t* labels, int32_t* doc_ids) const;

  std::shared_ptr<const DocumentSource> docs_;
  DataConfig cfg_;
  uint64_t seed_;
  std::vector<Unit> units_;  // with split only; otherwise unit u = document u
  int64_t truncated_ = 0, split_ = 0, tokens_ = 0;
  int64_t epoch_ = 0, row_ = 0;
  std::vector<int64_t> row_start_;  // (rows + 1): first piece of each row in pieces_
  std::vector<Piece> pieces_;
};

}  // namespace moetune
