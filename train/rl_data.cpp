// RL prompt files (read_prompt_jsonl) and the prompt half of the chat template
// (render_prompt). Contract in rl_data.hpp, user documentation in docs/rewards.md.
#include "train/rl_data.hpp"

#include <algorithm>
#include <fstream>

#include "moe/error.hpp"
#include "train/reward.hpp"

namespace moetune {
namespace {

using json = nlohmann::json;

bool blank(const std::string& s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; });
}

std::string hex_byte(unsigned char b) {
  const char* d = "0123456789ABCDEF";
  return std::string("0x") + d[b >> 4] + d[b & 15];
}

const std::string& string_value(const json& v, const std::string& what) {
  if (!v.is_string())
    throw Error(what + " must be a string, got " + std::string(v.type_name()) + " " + v.dump());
  return v.get_ref<const std::string&>();
}

void check_roles(const std::vector<ChatMessage>& messages) {
  if (messages.empty()) throw Error("'messages' is empty (a prompt needs at least one turn)");
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string& r = messages[i].role;
    if (r != "system" && r != "user" && r != "assistant")
      throw Error("unknown role '" + r + "' in messages[" + std::to_string(i) + "] (allowed: system, user, assistant)");
  }
  if (messages.back().role == "assistant")
    throw Error("the last turn of 'messages' is the assistant's: a prompt ends where the model starts answering "
                "(put the reference in 'answer')");
}

// One parsed line -> one row (errors without location; the caller adds it).
PromptRow parse_row(const json& j, bool need_answer) {
  if (!j.is_object())
    throw Error("expected a JSON object ({\"prompt\": ...}, {\"messages\": [...]} or {\"question\": ...}), got " +
                std::string(j.type_name()) + " " + j.dump());
  const int keys = int(j.contains("prompt")) + int(j.contains("messages")) + int(j.contains("question"));
  if (keys == 0) throw Error("no prompt: a row needs one of 'prompt', 'messages' or 'question'");
  if (keys > 1) throw Error("several prompts in one row: use exactly one of 'prompt', 'messages' or 'question'");
  PromptRow r;
  if (j.contains("messages")) {
    const json& msgs = j.at("messages");
    if (!msgs.is_array())
      throw Error("'messages' must be an array of {\"role\": ..., \"content\": ...} objects, got " +
                  std::string(msgs.type_name()) + " " + msgs.dump());
    for (size_t i = 0; i < msgs.size(); ++i) {
      const std::string at = "messages[" + std::to_string(i) + "]";
      const json& m = msgs[i];
      if (!m.is_object())
        throw Error(at + " must be an object {\"role\": ..., \"content\": ...}, got " + std::string(m.type_name()) +
                    " " + m.dump());
      for (auto it = m.begin(); it != m.end(); ++it)
        if (it.key() != "role" && it.key() != "content")
          throw Error("unknown key '" + it.key() + "' in " + at + " (allowed: role, content)");
      if (!m.contains("role")) throw Error("missing key 'role' in " + at);
      if (!m.contains("content")) throw Error("missing key 'content' in " + at);
      r.messages.push_back({string_value(m.at("role"), "'role' in " + at),
                            string_value(m.at("content"), "'content' in " + at)});
    }
    check_roles(r.messages);
  } else {
    const bool prompt = j.contains("prompt");
    r.messages.push_back({"user", string_value(j.at(prompt ? "prompt" : "question"), prompt ? "'prompt'" : "'question'")});
  }
  if (auto ref = reference_answer(j)) {
    if (ref->empty()) throw Error("'answer' is empty (no reference answer after normalisation)");
    r.answer = std::move(*ref);
    r.has_answer = true;
  } else if (need_answer) {
    throw Error(std::string(j.contains("answer") ? "'answer' is null" : "missing key 'answer'") +
                ": the rewards (rl.reward) need a reference answer in every row");
  }
  r.row = j;
  return r;
}

}  // namespace

std::vector<PromptRow> read_prompt_jsonl(const std::string& path, bool need_answer) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open file");
  std::vector<PromptRow> rows;
  std::string line;
  int lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (blank(line)) continue;
    const std::string at = path + ":" + std::to_string(lineno);
    const int64_t bad = first_invalid_utf8(line);
    if (bad >= 0)
      throw Error(at + ": not valid UTF-8 (byte " + hex_byte(static_cast<unsigned char>(line[size_t(bad)])) +
                  " at column " + std::to_string(bad + 1) + ")");
    json j;
    try {
      j = json::parse(line);
    } catch (const json::exception& e) {
      throw Error(at + ": invalid JSON: " + e.what());
    }
    try {
      PromptRow r = parse_row(j, need_answer);
      r.line = lineno;
      rows.push_back(std::move(r));
    } catch (const Error& e) {
      throw Error(at + ": " + e.what());
    }
  }
  if (in.bad()) throw Error(path + ": read error");
  if (rows.empty()) throw Error(path + ": no prompts");
  return rows;
}

std::vector<int32_t> render_prompt(const std::vector<ChatMessage>& messages, const TextEncoder& enc) {
  check_roles(messages);
  const int32_t bos = enc.special_id("<|bos|>"), eos = enc.special_id("<|eos|>"),
                system = enc.special_id("<|system|>"), user = enc.special_id("<|user|>"),
                assistant = enc.special_id("<|assistant|>"), end = enc.special_id("<|end|>");
  std::vector<int32_t> ids{bos};
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    ids.push_back(m.role == "system" ? system : m.role == "user" ? user : assistant);
    for (int32_t id : enc.encode(m.content)) {
      if (id == bos || id == eos || id == system || id == user || id == assistant || id == end)
        throw Error("the tokenizer encoded the text of messages[" + std::to_string(i) + "] to the special token id " +
                    std::to_string(id) + " (encode() must never produce special ids)");
      ids.push_back(id);
    }
    ids.push_back(end);
  }
  ids.push_back(assistant);
  return ids;
}

}  // namespace moetune
