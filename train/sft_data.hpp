// Supervised fine-tuning (SFT) data: reads chat, prompt/completion and pre-tokenized
// JSONL samples, renders text samples through the chat template with loss masking
// (labels -100 outside the assistant's answers), and applies the overlong policy.
// The result is a list of train/data.hpp Documents for the BatchLoader. See docs/sft.md.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "tokenizer/text_encoder.hpp"
#include "train/data.hpp"

namespace moetune {

// One chat turn. role: "system" | "user" | "assistant".
struct ChatMessage {
  std::string role;
  std::string content;
};

enum class SftFormat { Chat, PromptCompletion, PreTokenized };

// One sample of an SFT file and the 1-based line it came from (for error messages).
struct SftSample {
  Document doc;
  int line = 0;
  SftFormat format = SftFormat::Chat;
};

// The 0-based byte offset of the first byte that makes `s` invalid UTF-8 (RFC 3629: no
// overlong forms, no surrogates U+D800..U+DFFF, nothing above U+10FFFF, no truncated
// sequence), or -1 if `s` is valid. Shared by the JSONL readers (SFT and RL prompts).
int64_t first_invalid_utf8(const std::string& s);

// Chat template (docs/sft.md):
//   <|bos|> { <|role|> encode(content) <|end|> }* <|eos|>
// input_ids (L) and labels (L), Hugging Face convention (position t predicts
// labels[t+1]; the model shifts). labels[t] = input_ids[t] on the tokens of every
// assistant content and the <|end|> closing that assistant turn, plus the final
// <|eos|> when the last message is the assistant's; -100 everywhere else.
// Throws moetune::Error (no location; read_sft_jsonl adds it) when messages is empty,
// a role is not system|user|assistant (naming it), or there is no assistant message.
Document render_chat(const std::vector<ChatMessage>& messages, const TextEncoder& enc);

// The chat template of [user: prompt, assistant: completion]:
//   <|bos|><|user|>prompt<|end|><|assistant|>completion<|end|><|eos|>
// Loss on the completion's tokens, its <|end|> and the <|eos|>.
Document render_prompt_completion(const std::string& prompt, const std::string& completion,
                                  const TextEncoder& enc);

// Reads SFT JSONL: one sample per non-empty line, the format detected per line by its keys
// (formats may be mixed in one file):
//   {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
//   {"prompt": "...", "completion": "..."}
//   {"input_ids": [...], "labels": [...]}        (labels optional = input_ids; -100 ignored)
// Every token id (rendered or given) must lie in [0, vocab_size). Every error is a
// moetune::Error naming "<path>:<line>" (1-based, counting every line): a line that is
// not valid UTF-8 (checked on the raw bytes), invalid JSON, not an object, unknown key,
// keys of two formats, missing key, wrong type, unknown role, empty messages, no
// assistant message, empty or out-of-vocabulary ids, labels of another length. A file
// without samples is "<path>: no samples".
std::vector<SftSample> read_sft_jsonl(const std::string& path, const TextEncoder& enc, int vocab_size);

// What apply_overlong did, for the log.
struct SftOverlongStats {
  int64_t truncated = 0;           // samples cut to their first seq_len tokens
  int64_t skipped = 0;             // samples dropped
  int64_t truncated_no_target = 0; // of the truncated: no trained target left (labels[1..] all -100)
};

// Applies the overlong policy to samples longer than seq_len tokens:
//   "truncate": keep the first seq_len tokens (input_ids and labels);
//   "skip":     drop the sample (the others keep their order);
//   "error":    throw moetune::Error naming "<path>:<line>" of the first such sample.
// Throws moetune::Error for seq_len <= 0, an unknown policy, or when "skip" leaves no sample.
SftOverlongStats apply_overlong(std::vector<SftSample>& samples, int seq_len, const std::string& policy,
                                const std::string& path);

// The documents of the samples, in order (moves them out of `samples`).
std::vector<Document> sft_documents(std::vector<SftSample>&& samples);

}  // namespace moetune
