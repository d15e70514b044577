// RL prompt files: one prompt (and usually its reference answer) per JSONL line, and the
// chat template of a prompt up to the point where the model starts answering
// (MODEL.md section 10). See docs/rewards.md.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "tokenizer/text_encoder.hpp"
#include "train/sft_data.hpp"

namespace moetune {

// One prompt of an RL prompt file.
struct PromptRow {
  std::vector<ChatMessage> messages;  // the prompt as chat turns; never ends with an assistant turn
  std::string answer;                 // reference answer (reference_answer() of the row); "" if none
  bool has_answer = false;
  nlohmann::json row;                 // the whole JSON object of the line (every column)
  int line = 0;                       // 1-based line in the file
};

// Reads an RL prompt file: one JSON object per non-empty line with exactly one of
//   "prompt":   "text"                           -> one user turn
//   "messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]
//               (the last turn must not be the assistant's: the model writes that one)
//   "question": "text"                           (GSM8K) -> one user turn
// and optionally "answer": a string (through gsm8k_answer: "...#### 42" -> "42") or a
// number ("42", "3.5"). Any other column is kept in `row` (reward programs see it).
// Every error is a moetune::Error naming "<path>:<line>" (1-based, counting every line):
// invalid UTF-8, invalid JSON, not an object, none or several of prompt/messages/question,
// a wrong type, a message that is not {role, content}, an unknown role, empty messages, a
// trailing assistant turn, an empty answer, and a missing answer when need_answer (set it
// when a reward needs one: reward_needs_answer). A file without prompts is
// "<path>: no prompts"; an unreadable file "<path>: cannot open file".
std::vector<PromptRow> read_prompt_jsonl(const std::string& path, bool need_answer);

// The prompt's tokens: <|bos|> { <|role|> encode(content) <|end|> }* <|assistant|>,
// exactly render_chat(messages + [assistant: completion]).input_ids up to and including
// that <|assistant|>. Throws moetune::Error for empty messages, an unknown role, a
// trailing assistant turn, or an encoder that produces a special id from text.
std::vector<int32_t> render_prompt(const std::vector<ChatMessage>& messages, const TextEncoder& enc);

}  // namespace moetune
