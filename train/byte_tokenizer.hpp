// The byte-level tokenizer that needs no files: ids 0..255 are the bytes, then the
// special tokens of the chat template (docs/sft.md). Plain text never produces a
// special id: the text "<|bos|>" encodes to its 7 bytes.
#pragma once
#include <array>
#include <string>
#include <vector>

#include "train/sft_data.hpp"

namespace moetune {

class ByteTokenizer : public TextEncoder {
 public:
  static constexpr std::array<const char*, 7> kSpecials = {"<|pad|>",  "<|bos|>",       "<|eos|>", "<|system|>",
                                                           "<|user|>", "<|assistant|>", "<|end|>"};
  static constexpr int kVocabSize = 256 + int(kSpecials.size());  // 263

  std::vector<int32_t> encode(const std::string& text) const override {
    std::vector<int32_t> ids(text.size());
    for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
    return ids;
  }
  // Throws moetune::Error for an unknown name.
  int32_t special_id(const std::string& name) const override;
  // Bytes back; special ids decode to their names.
  std::string decode(const std::vector<int32_t>& ids) const;
};

}  // namespace moetune
