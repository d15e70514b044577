#include "train/byte_tokenizer.hpp"

#include "moe/error.hpp"

namespace moetune {

int32_t ByteTokenizer::special_id(const std::string& name) const {
  for (size_t i = 0; i < kSpecials.size(); ++i)
    if (name == kSpecials[i]) return 256 + int32_t(i);
  throw Error("byte tokenizer: unknown special token '" + name + "'");
}

std::string ByteTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  for (int32_t id : ids) {
    if (id >= 0 && id < 256)
      out += static_cast<char>(id);
    else if (id >= 256 && id < kVocabSize)
      out += kSpecials[size_t(id - 256)];
    else
      throw Error("byte tokenizer: id " + std::to_string(id) + " is outside [0, " + std::to_string(kVocabSize) + ")");
  }
  return out;
}

}  // namespace moetune
