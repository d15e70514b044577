// Binary token files: documents of token ids, written once by `moetune data prepare`
// and read by memory map during training (data.format "bin"). Layout, little-endian:
//
//   offset 0    char[8]   magic "MOETOKF1"
//          8    uint32    version = 1
//         12    uint32    token_bytes: 2 (uint16 ids, vocab_size <= 65536) or 4 (uint32)
//         16    uint64    num_docs   (>= 1)
//         24    uint64    num_tokens
//         32    uint64    vocab_size (every id is < vocab_size)
//         40    uint8[32] SHA-256 of the tokenizer.json the ids came from
//         72    zeros up to 128
//        128    ids       num_tokens x token_bytes
//   128 + num_tokens x token_bytes:
//               uint64    doc_offsets[num_docs + 1]: 0, end of doc 0, ..., num_tokens
//                         (strictly increasing: no empty documents)
//
// The file size is exactly what the header implies. See docs/data.md.
#pragma once
#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace moetune {

using Sha256Bytes = std::array<uint8_t, 32>;

// "ab12..." (64 lowercase hex digits) -> bytes; throws moetune::Error otherwise.
Sha256Bytes sha256_from_hex(const std::string& hex);
std::string sha256_to_hex(const Sha256Bytes& b);

// Streams documents into "<path>.tmp-<pid>"; finish() writes the offsets and header,
// fsyncs, and renames onto <path>. Destroyed without finish() (an error), the temporary
// file is removed and an existing <path> is untouched.
class TokenFileWriter {
 public:
  TokenFileWriter(std::string path, uint64_t vocab_size, const Sha256Bytes& tokenizer_sha256);
  ~TokenFileWriter();
  TokenFileWriter(const TokenFileWriter&) = delete;
  TokenFileWriter& operator=(const TokenFileWriter&) = delete;

  // Appends one document. Throws moetune::Error for an empty document or an id outside
  // [0, vocab_size) (naming the document index).
  void add(std::span<const int32_t> ids);
  // Throws moetune::Error if no document was added.
  void finish();

  uint64_t num_docs() const { return offsets_.size() - 1; }
  uint64_t num_tokens() const { return offsets_.back(); }

 private:
  void write(const void* p, size_t n);
  std::string path_, tmp_;
  uint64_t vocab_size_;
  Sha256Bytes sha_;
  uint32_t token_bytes_;
  int fd_ = -1;
  bool finished_ = false;
  std::vector<uint64_t> offsets_{0};
  std::vector<uint8_t> buf_;
};

// A token file mapped read-only. Every check happens on open: magic (a file starting
// with '{' is reported as JSONL), version, token_bytes, the exact file size, the
// offsets, and every id < vocab_size. Errors are moetune::Error naming the path.
class TokenFile {
 public:
  explicit TokenFile(const std::string& path);
  ~TokenFile();
  TokenFile(TokenFile&& o) noexcept;
  TokenFile& operator=(TokenFile&&) = delete;
  TokenFile(const TokenFile&) = delete;

  // True if the file at `path` starts with the magic (false if it cannot be read).
  static bool looks_like(const std::string& path);

  const std::string& path() const { return path_; }
  uint64_t num_docs() const { return num_docs_; }
  uint64_t num_tokens() const { return num_tokens_; }
  uint64_t vocab_size() const { return vocab_size_; }
  uint32_t token_bytes() const { return token_bytes_; }
  const Sha256Bytes& tokenizer_sha256() const { return sha_; }

  uint64_t doc_length(uint64_t d) const { return offset(d + 1) - offset(d); }
  // Copies ids [offset, offset + len) of document d into out (as int32).
  void copy(uint64_t d, uint64_t offset, uint64_t len, int32_t* out) const;

 private:
  uint64_t offset(uint64_t i) const;
  std::string path_;
  const uint8_t* base_ = nullptr;
  size_t size_ = 0;
  uint64_t num_docs_ = 0, num_tokens_ = 0, vocab_size_ = 0;
  uint32_t token_bytes_ = 0;
  Sha256Bytes sha_{};
  const uint8_t* ids_ = nullptr;
  const uint8_t* offsets_ = nullptr;
};

}  // namespace moetune
