// Binary token files (token_file.hpp): streaming atomic writer and mmap reader.
#include "io/token_file.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cstring>
#include <utility>

#include "io/fsutil.hpp"
#include "moe/error.hpp"

namespace moetune {
namespace {

static_assert(std::endian::native == std::endian::little, "token files are little-endian; add byte swapping");

constexpr char kMagic[8] = {'M', 'O', 'E', 'T', 'O', 'K', 'F', '1'};
constexpr uint32_t kVersion = 1;
constexpr size_t kHeader = 128;
constexpr size_t kFlushBytes = 1 << 20;

template <class T>
T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

}  // namespace

Sha256Bytes sha256_from_hex(const std::string& hex) {
  if (hex.size() != 64) throw Error("not a SHA-256 digest (64 hex digits): '" + hex + "'");
  Sha256Bytes b{};
  const auto nib = [&](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    throw Error("not a SHA-256 digest (64 hex digits): '" + hex + "'");
  };
  for (size_t i = 0; i < 32; ++i) b[i] = uint8_t(nib(hex[2 * i]) * 16 + nib(hex[2 * i + 1]));
  return b;
}

std::string sha256_to_hex(const Sha256Bytes& b) {
  static const char* d = "0123456789abcdef";
  std::string s;
  for (uint8_t x : b) {
    s += d[x >> 4];
    s += d[x & 15];
  }
  return s;
}

// ------------------------------------------------------------------ writer

TokenFileWriter::TokenFileWriter(std::string path, uint64_t vocab_size, const Sha256Bytes& tokenizer_sha256)
    : path_(std::move(path)), vocab_size_(vocab_size), sha_(tokenizer_sha256) {
  if (vocab_size_ == 0 || vocab_size_ > (uint64_t(1) << 31))
    throw Error(path_ + ": token file: vocab_size must be in [1, 2^31], got " + std::to_string(vocab_size_));
  token_bytes_ = vocab_size_ <= 65536 ? 2 : 4;
  tmp_ = path_ + ".tmp-" + std::to_string(::getpid());
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) throw Error(fsutil::errno_message(tmp_, "cannot create", errno));
  buf_.assign(kHeader, 0);  // the header is filled in by finish()
}

TokenFileWriter::~TokenFileWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!finished_) ::unlink(tmp_.c_str());
}

void TokenFileWriter::write(const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    const ssize_t w = ::write(fd_, c, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      throw Error(fsutil::errno_message(tmp_, "write failed", errno));
    }
    c += w;
    n -= size_t(w);
  }
}

void TokenFileWriter::add(std::span<const int32_t> ids) {
  if (finished_) throw Error(path_ + ": token file: add() after finish()");
  const uint64_t doc = num_docs();
  if (ids.empty()) throw Error(path_ + ": token file: document " + std::to_string(doc) + " is empty");
  for (size_t i = 0; i < ids.size(); ++i) {
    const int32_t id = ids[i];
    if (id < 0 || uint64_t(id) >= vocab_size_)
      throw Error(path_ + ": token file: document " + std::to_string(doc) + " has id " + std::to_string(id) +
                  " at position " + std::to_string(i) + ", outside [0, " + std::to_string(vocab_size_) + ")");
    if (token_bytes_ == 2) {
      const uint16_t v = uint16_t(id);
      buf_.insert(buf_.end(), reinterpret_cast<const uint8_t*>(&v), reinterpret_cast<const uint8_t*>(&v) + 2);
    } else {
      const uint32_t v = uint32_t(id);
      buf_.insert(buf_.end(), reinterpret_cast<const uint8_t*>(&v), reinterpret_cast<const uint8_t*>(&v) + 4);
    }
  }
  offsets_.push_back(offsets_.back() + ids.size());
  if (buf_.size() >= kFlushBytes) {
    write(buf_.data(), buf_.size());
    buf_.clear();
  }
}

void TokenFileWriter::finish() {
  if (finished_) return;
  if (num_docs() == 0) throw Error(path_ + ": token file: no documents");
  write(buf_.data(), buf_.size());
  buf_.clear();
  write(offsets_.data(), offsets_.size() * sizeof(uint64_t));
  uint8_t h[kHeader] = {};
  std::memcpy(h, kMagic, 8);
  const uint64_t nd = num_docs(), nt = num_tokens();
  std::memcpy(h + 8, &kVersion, 4);
  std::memcpy(h + 12, &token_bytes_, 4);
  std::memcpy(h + 16, &nd, 8);
  std::memcpy(h + 24, &nt, 8);
  std::memcpy(h + 32, &vocab_size_, 8);
  std::memcpy(h + 40, sha_.data(), 32);
  if (::pwrite(fd_, h, kHeader, 0) != ssize_t(kHeader)) throw Error(fsutil::errno_message(tmp_, "write failed", errno));
  if (::fsync(fd_) != 0) throw Error(fsutil::errno_message(tmp_, "fsync failed", errno));
  if (::close(fd_) != 0) {
    fd_ = -1;
    throw Error(fsutil::errno_message(tmp_, "close failed", errno));
  }
  fd_ = -1;
  if (::rename(tmp_.c_str(), path_.c_str()) != 0) throw Error(fsutil::errno_message(path_, "rename failed", errno));
  finished_ = true;
  fsutil::fsync_dir(fsutil::parent_dir(path_));
}

// ------------------------------------------------------------------ reader

bool TokenFile::looks_like(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  char m[8] = {};
  const bool ok = ::read(fd, m, 8) == 8 && std::memcmp(m, kMagic, 8) == 0;
  ::close(fd);
  return ok;
}

TokenFile::TokenFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error(fsutil::errno_message(path, "cannot open token file", errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw Error(fsutil::errno_message(path, "cannot stat", err));
  }
  size_ = size_t(st.st_size);
  if (size_ < kHeader) {
    char c = 0;
    const bool json_like = ::pread(fd, &c, 1, 0) == 1 && c == '{';
    ::close(fd);
    if (json_like)
      throw Error(path + ": not a moetune token file (it starts with '{': JSONL? use data.format \"tokens\" or "
                         "\"sft\", or make a token file with moetune data prepare)");
    throw Error(path + ": not a moetune token file: " + std::to_string(size_) + " bytes, shorter than the " +
                std::to_string(kHeader) + "-byte header (truncated?)");
  }
  void* p = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
  const int err = errno;
  ::close(fd);
  if (p == MAP_FAILED) throw Error(fsutil::errno_message(path, "cannot mmap", err));
  base_ = static_cast<const uint8_t*>(p);
  try {
    if (std::memcmp(base_, kMagic, 8) != 0) {
      if (base_[0] == '{')
        throw Error(path + ": not a moetune token file (it starts with '{': JSONL? use data.format \"tokens\" or "
                           "\"sft\", or make a token file with moetune data prepare)");
      throw Error(path + ": not a moetune token file (bad magic; expected \"MOETOKF1\")");
    }
    const uint32_t version = load<uint32_t>(base_ + 8);
    if (version != kVersion)
      throw Error(path + ": token file version " + std::to_string(version) + " is not supported (expected 1)");
    token_bytes_ = load<uint32_t>(base_ + 12);
    if (token_bytes_ != 2 && token_bytes_ != 4)
      throw Error(path + ": corrupt token file: token_bytes is " + std::to_string(token_bytes_) + " (2 or 4)");
    num_docs_ = load<uint64_t>(base_ + 16);
    num_tokens_ = load<uint64_t>(base_ + 24);
    vocab_size_ = load<uint64_t>(base_ + 32);
    std::memcpy(sha_.data(), base_ + 40, 32);
    if (num_docs_ == 0) throw Error(path + ": corrupt token file: no documents");
    if (vocab_size_ == 0 || vocab_size_ > (uint64_t(1) << 31) || (token_bytes_ == 2 && vocab_size_ > 65536))
      throw Error(path + ": corrupt token file: vocab_size " + std::to_string(vocab_size_) + " with " +
                  std::to_string(token_bytes_) + "-byte ids");
    // Sizes, without overflow: the file must be exactly header + ids + offsets.
    const uint64_t avail = size_ - kHeader;
    const bool fits = num_tokens_ <= avail / token_bytes_ && num_docs_ < avail / 8 &&
                      num_tokens_ * token_bytes_ + (num_docs_ + 1) * 8 <= avail;
    const uint64_t want = fits ? kHeader + num_tokens_ * token_bytes_ + (num_docs_ + 1) * 8 : 0;
    if (!fits || want != size_)
      throw Error(path + ": corrupt token file: " + std::to_string(size_) + " bytes, but its header (" +
                  std::to_string(num_docs_) + " documents, " + std::to_string(num_tokens_) + " tokens of " +
                  std::to_string(token_bytes_) + " bytes) implies " +
                  (fits ? std::to_string(want) : std::string("more")) + " (truncated or appended to?)");
    ids_ = base_ + kHeader;
    offsets_ = ids_ + num_tokens_ * token_bytes_;
    if (offset(0) != 0) throw Error(path + ": corrupt token file: doc_offsets[0] is not 0");
    for (uint64_t d = 0; d < num_docs_; ++d)
      if (offset(d + 1) <= offset(d))
        throw Error(path + ": corrupt token file: doc_offsets not strictly increasing at document " +
                    std::to_string(d) + " (" + std::to_string(offset(d)) + " -> " + std::to_string(offset(d + 1)) + ")");
    if (offset(num_docs_) != num_tokens_)
      throw Error(path + ": corrupt token file: the last doc offset is " + std::to_string(offset(num_docs_)) +
                  ", not num_tokens " + std::to_string(num_tokens_));
    // Every id in range (one pass; reports the first bad id and its document).
    uint64_t bad = num_tokens_;
    if (token_bytes_ == 2) {
      for (uint64_t i = 0; i < num_tokens_; ++i)
        if (load<uint16_t>(ids_ + 2 * i) >= vocab_size_) {
          bad = i;
          break;
        }
    } else {
      for (uint64_t i = 0; i < num_tokens_; ++i)
        if (load<uint32_t>(ids_ + 4 * i) >= vocab_size_) {
          bad = i;
          break;
        }
    }
    if (bad < num_tokens_) {
      uint64_t lo = 0, hi = num_docs_;  // the document holding token `bad`
      while (hi - lo > 1) {
        const uint64_t mid = (lo + hi) / 2;
        (offset(mid) <= bad ? lo : hi) = mid;
      }
      const uint64_t v = token_bytes_ == 2 ? load<uint16_t>(ids_ + 2 * bad) : load<uint32_t>(ids_ + 4 * bad);
      throw Error(path + ": corrupt token file: id " + std::to_string(v) + " in document " + std::to_string(lo) +
                  " (token " + std::to_string(bad) + ") is outside [0, " + std::to_string(vocab_size_) + ")");
    }
  } catch (...) {
    ::munmap(const_cast<uint8_t*>(base_), size_);
    throw;
  }
}

TokenFile::TokenFile(TokenFile&& o) noexcept
    : path_(std::move(o.path_)),
      base_(std::exchange(o.base_, nullptr)),
      size_(o.size_),
      num_docs_(o.num_docs_),
      num_tokens_(o.num_tokens_),
      vocab_size_(o.vocab_size_),
      token_bytes_(o.token_bytes_),
      sha_(o.sha_),
      ids_(o.ids_),
      offsets_(o.offsets_) {}

TokenFile::~TokenFile() {
  if (base_) ::munmap(const_cast<uint8_t*>(base_), size_);
}

uint64_t TokenFile::offset(uint64_t i) const { return load<uint64_t>(offsets_ + 8 * i); }

void TokenFile::copy(uint64_t d, uint64_t off, uint64_t len, int32_t* out) const {
  const uint64_t start = offset(d) + off;
  if (token_bytes_ == 2) {
    for (uint64_t i = 0; i < len; ++i) out[i] = int32_t(load<uint16_t>(ids_ + 2 * (start + i)));
  } else {
    for (uint64_t i = 0; i < len; ++i) out[i] = int32_t(load<uint32_t>(ids_ + 4 * (start + i)));
  }
}

}  // namespace moetune
