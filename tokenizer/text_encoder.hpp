// What the data readers need from a tokenizer: text to ids, and the ids of the
// special tokens of the chat template.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace moetune {

struct TextEncoder {
  virtual ~TextEncoder() = default;
  // Token ids of plain text. Never produces special ids: a literal "<|user|>" in the
  // text is encoded as ordinary text, so user content cannot forge a turn.
  virtual std::vector<int32_t> encode(const std::string& text) const = 0;
  // Id of a special token: "<|bos|>", "<|eos|>", "<|system|>", "<|user|>",
  // "<|assistant|>", "<|end|>", "<|pad|>". Throws moetune::Error when it has none.
  virtual int32_t special_id(const std::string& name) const = 0;
};

}  // namespace moetune
