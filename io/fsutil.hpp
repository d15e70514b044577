// Small POSIX file helpers for crash-safe output: an AtomicFile that writes to
// "<path>.tmp", fsyncs and renames over <path> only on commit(), directory fsync,
// and whole-file reads. Every failure throws moetune::Error naming the path.
#pragma once
#include <cstddef>
#include <string>
#include <string_view>

namespace moetune::fsutil {

// "<path>: <what>: <strerror(err)>"
std::string errno_message(const std::string& path, const std::string& what, int err);

// Writes to "<path>.tmp"; commit() fsyncs it, closes it, renames it to <path> and
// fsyncs the parent directory. Destroyed without commit() (an exception was thrown),
// the temporary file is removed, so <path> is either the old file or the complete
// new one, never a half-written file.
class AtomicFile {
 public:
  explicit AtomicFile(std::string path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  const std::string& path() const { return path_; }
  // Appends size bytes (one write() loop, no per-element I/O).
  void write(const void* data, size_t size);
  void write(std::string_view s) { write(s.data(), s.size()); }
  void commit();

 private:
  std::string path_, tmp_;
  int fd_ = -1;
  bool committed_ = false;
};

// Writes the whole string through an AtomicFile.
void write_file_atomic(const std::string& path, std::string_view bytes);
// Reads a whole regular file; Error "<path>: cannot open ..." if it is missing.
std::string read_file(const std::string& path);
// fsync a directory so that renames inside it are durable. Filesystems that do not
// support it (EINVAL) are tolerated.
void fsync_dir(const std::string& dir);
// Parent directory of a path ("." when it has none).
std::string parent_dir(const std::string& path);

}  // namespace moetune::fsutil
