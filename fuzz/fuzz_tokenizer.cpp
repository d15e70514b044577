// Fuzzes the tokenizer.json reader (tokenizer/tokenizer.hpp Tokenizer::load ->
// from_json). A tokenizer that loads must encode any bytes and decode them back
// exactly (with the leading space add_prefix_space puts in front); the test strings are
// a fixed sample and the first bytes of the input itself.
#include <nlohmann/json.hpp>
#include <string>

#include "fuzz/fuzz_util.hpp"
#include "tokenizer/tokenizer.hpp"

using namespace moetune;

namespace {

void check_round_trip(const Tokenizer& t, const std::string& text, bool prefix_space) {
  const std::vector<int32_t> ids = t.encode(text);
  for (int32_t id : ids)
    if (t.is_special(id)) fuzz::invariant_failed("encode() produced the special id " + std::to_string(id));
  const std::string back = t.decode(ids);
  const std::string want = (prefix_space && !text.empty() && text[0] != ' ') ? " " + text : text;
  if (back != want) fuzz::invariant_failed("decode(encode(s)) != s for s = " + nlohmann::json(want).dump());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = fuzz::write_input("tokenizer.json", data, size);
  fuzz::parse_or_reject([&] {
    const Tokenizer t = Tokenizer::load(path);
    // add_prefix_space shows in encode(""): nothing; so probe it on a word.
    const std::vector<int32_t> probe = t.encode("x");
    const bool prefix_space = t.decode(probe) == " x";
    check_round_trip(t, "Hello, world! It's 2024: naïve café, 中文 \n\t  x  y\r\n", prefix_space);
    check_round_trip(t, std::string(reinterpret_cast<const char*>(data), std::min<size_t>(size, 128)), prefix_space);
    for (const char* s : {"<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|end|>"})
      if (t.has_special(s)) (void)t.decode({t.special_id(s)});
    (void)t.describe();
  });
  return 0;
}
