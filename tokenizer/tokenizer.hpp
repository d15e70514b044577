// Byte-level BPE tokenizer, stored as a Hugging Face tokenizer.json (model type BPE,
// ByteLevel pre-tokenizer), and its trainer. The byte tokenizer that needs no file is
// the same thing with no merges. See docs/tokenizer.md.
//
// Ids of a tokenizer built by moetune (Tokenizer::byte_level, BpeTrainer):
//   0..255            the bytes (id b = byte b)
//   256..256+M-1      the M merges, in the order they were learned
//   256+M..256+M+6    the special tokens kChatSpecials, in that order
// A tokenizer.json from elsewhere (e.g. GPT-2's) keeps its own ids.
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tokenizer/text_encoder.hpp"

namespace moetune {

// The special tokens of the chat template (docs/sft.md), in id order.
inline constexpr std::array<const char*, 7> kChatSpecials = {
    "<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"};

class Tokenizer : public TextEncoder {
 public:
  // The byte tokenizer: 256 byte ids, no merges, then kChatSpecials (vocabulary 263).
  static Tokenizer byte_level();
  // A tokenizer built from merges given as pairs of byte strings (learned order), with
  // the id layout above. Throws moetune::Error if a merge's parts are not tokens yet.
  static Tokenizer from_merges(const std::vector<std::pair<std::string, std::string>>& merges);
  // Parses tokenizer.json text. `source` (a path) prefixes every error, which also names
  // the key: not JSON, model.type not "BPE", a normalizer or a pre_tokenizer other than
  // ByteLevel, dropout / byte_fallback / subword prefixes, a vocab entry that is not
  // byte-level, a missing byte token, a merge whose parts or result are not in the
  // vocabulary, two tokens with one id, an added token contradicting the vocabulary.
  static Tokenizer from_json(const std::string& text, const std::string& source);
  // Reads and parses a tokenizer.json file.
  static Tokenizer load(const std::string& path);
  // "byte" -> byte_level(); a directory (a checkpoint) -> its tokenizer.json; anything
  // else is the path of a tokenizer.json.
  static Tokenizer from_spec(const std::string& spec);

  // TextEncoder. encode: pre-tokenize (byte_level.hpp), then apply the merges by rank
  // inside each word (lowest rank first, leftmost first among equal ranks), as Hugging
  // Face's BPE does. Accepts any bytes. Special tokens are never produced.
  std::vector<int32_t> encode(const std::string& text) const override;
  int32_t special_id(const std::string& name) const override;
  bool has_special(const std::string& name) const { return specials_.count(name) != 0; }

  // Bytes of the ids concatenated; a special id decodes to its content. Throws
  // moetune::Error for an id that is not in the vocabulary.
  std::string decode(const std::vector<int32_t>& ids) const;

  int vocab_size() const { return int(tokens_.size()); }  // largest id + 1
  int num_merges() const { return int(merge_list_.size()); }
  int num_specials() const { return int(specials_.size()); }
  bool is_special(int32_t id) const { return id >= 0 && id < vocab_size() && kind_[size_t(id)] == Kind::Special; }
  // Raw bytes of a token (a special's content for a special); "" for an unused id.
  const std::string& token(int32_t id) const { return tokens_.at(size_t(id)); }

  // The tokenizer.json text: the file's bytes for a loaded tokenizer, moetune's own
  // serialization for a built one. save() writes exactly these bytes (atomically), so
  // sha256_hex() identifies the tokenizer across copies.
  const std::string& json() const { return json_; }
  std::string sha256_hex() const;
  void save(const std::string& path) const;
  // One line for logs: "byte-level BPE: 263 tokens (256 bytes, 0 merges, 7 special), sha256 1a2b3c4d..."
  std::string describe() const;

 private:
  enum class Kind : uint8_t { Unused, Normal, Special };
  struct Merge {
    int32_t rank, id;
  };
  static uint64_t pair_key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }
  void encode_word(std::string_view word, std::vector<int32_t>& out) const;

  std::vector<std::string> tokens_;  // id -> raw bytes (special: content)
  std::vector<Kind> kind_;
  std::array<int32_t, 256> byte_id_{};
  std::unordered_map<std::string, int32_t> ids_;  // raw bytes of normal tokens -> id
  std::unordered_map<uint64_t, Merge> merges_;    // (left, right) -> (rank, merged id)
  std::vector<std::pair<int32_t, int32_t>> merge_list_;
  std::unordered_map<std::string, int32_t> specials_;
  bool add_prefix_space_ = false, use_regex_ = true, ignore_merges_ = false;
  std::string json_;
  uint64_t serial_ = 0;  // identifies this vocabulary in the per-thread word cache
};

// Trains a byte-level BPE: feed it text, then train(). Words are counted after the
// pre-tokenizer, merges never cross a word boundary.
class BpeTrainer {
 public:
  // Counts the words of one text (a document: pre-tokenization sees it whole).
  void add_text(std::string_view text);
  int64_t bytes_seen() const { return bytes_; }
  int64_t distinct_words() const { return int64_t(counts_.size()); }

  struct Options {
    int vocab_size = 0;        // wanted vocabulary, specials included: merges = vocab_size - 263
    int64_t min_frequency = 2; // stop early when the most frequent pair occurs fewer times
    bool progress = false;     // print a line every 10% of the merges
  };
  // Learns merges: repeatedly the most frequent adjacent pair of tokens over all words
  // (weighted by word count), ties broken by the smaller (left id, right id). Fully
  // deterministic. Throws moetune::Error if vocab_size < 263 (bytes and specials).
  Tokenizer train(const Options& opt) const;

 private:
  std::unordered_map<std::string, int64_t> counts_;
  int64_t bytes_ = 0;
};

}  // namespace moetune
