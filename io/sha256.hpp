// SHA-256 (FIPS 180-4) of byte strings and files, for checkpoint manifests.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

namespace moetune {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t n);
  std::string hex();  // finalises; lowercase hex digest

 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t len_ = 0;
  uint64_t total_ = 0;
};

std::string sha256_hex(std::string_view bytes);
// Throws moetune::Error naming the file if it cannot be read.
std::string sha256_file(const std::string& path);

}  // namespace moetune
