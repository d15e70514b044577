// Fuzzes the SFT JSONL reader (train/sft_data.hpp read_sft_jsonl: chat, prompt/completion
// and pre-tokenized rows) with a small byte-level BPE (a few merges on top of the byte
// tokenizer), then the overlong policies on what it read.
#include "fuzz/fuzz_util.hpp"
#include "tokenizer/tokenizer.hpp"
#include "train/sft_data.hpp"

using namespace moetune;

namespace {

const Tokenizer& tokenizer() {
  static const Tokenizer t = Tokenizer::from_merges({{"t", "h"}, {"th", "e"}, {" ", "a"}, {"1", "2"}, {"<", "|"}});
  return t;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Tokenizer& tok = tokenizer();
  const std::string path = fuzz::write_input("sft.jsonl", data, size);
  fuzz::parse_or_reject([&] {
    std::vector<SftSample> samples = read_sft_jsonl(path, tok, tok.vocab_size());
    for (const auto& s : samples)
      if (s.doc.input_ids.empty() || s.doc.labels.size() != s.doc.input_ids.size())
        fuzz::invariant_failed("read_sft_jsonl returned an empty or mismatched sample");
    for (const char* policy : {"error", "skip", "truncate"}) {
      std::vector<SftSample> copy = samples;
      fuzz::parse_or_reject([&] { (void)apply_overlong(copy, 16, policy, path); });
    }
    (void)sft_documents(std::move(samples));
  });
  return 0;
}
