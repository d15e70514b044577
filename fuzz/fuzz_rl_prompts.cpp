// Fuzzes the RL prompt readers (train/rl_data.hpp read_prompt_jsonl, through
// train/rollout.hpp load_prompts, which also renders each prompt with the tokenizer):
// the input as a JSONL prompt file with need_answer true and false, and as a *.txt
// prompt file (one prompt per line).
#include "fuzz/fuzz_util.hpp"
#include "tokenizer/tokenizer.hpp"
#include "train/rollout.hpp"

using namespace moetune;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const Tokenizer tok = Tokenizer::byte_level();
  const std::string jsonl = fuzz::write_input("prompts.jsonl", data, size);
  const std::string txt = fuzz::write_input("prompts.txt", data, size);
  for (const bool need_answer : {true, false})
    fuzz::parse_or_reject([&] {
      const PromptSet ps = load_prompts(jsonl, tok, need_answer, 8, 1 << 20);
      for (const auto& r : ps.rows)
        if (need_answer && (!r.has_answer || r.answer.empty()))
          fuzz::invariant_failed("a row without an answer passed need_answer");
    });
  fuzz::parse_or_reject([&] { (void)load_prompts(txt, tok, false, 8, 1 << 20); });
  return 0;
}
