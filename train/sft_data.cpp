// SFT JSONL reader (chat, prompt/completion, pre-tokenized), the chat template with its
// loss mask, and the overlong policy. Contract in sft_data.hpp, user documentation in
// docs/sft.md.
#include "train/sft_data.hpp"

#include <algorithm>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <utility>

#include "moe/batch.hpp"
#include "moe/error.hpp"

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

// The ids of the template's special tokens, looked up once.
struct Specials {
  int32_t bos, eos, system, user, assistant, end;
  explicit Specials(const TextEncoder& enc)
      : bos(enc.special_id("<|bos|>")),
        eos(enc.special_id("<|eos|>")),
        system(enc.special_id("<|system|>")),
        user(enc.special_id("<|user|>")),
        assistant(enc.special_id("<|assistant|>")),
        end(enc.special_id("<|end|>")) {}
  bool is_special(int32_t id) const {
    return id == bos || id == eos || id == system || id == user || id == assistant || id == end;
  }
};

// Appends one token; trained tokens get their own id as label, the others -100.
void push(Document& d, int32_t id, bool trained) {
  d.input_ids.push_back(id);
  d.labels.push_back(trained ? id : kIgnoreIndex);
}

// Appends encode(text), refusing special ids (the encoder's contract) so that text can
// never open or close a turn.
void push_text(Document& d, const std::string& text, const TextEncoder& enc, const Specials& sp, bool trained,
               const std::string& what) {
  for (int32_t id : enc.encode(text)) {
    if (sp.is_special(id))
      throw Error("the tokenizer encoded the text of " + what + " to the special token id " + std::to_string(id) +
                  " (encode() must never produce special ids)");
    push(d, id, trained);
  }
}

// Value of a string key, or an error naming the key and what it got.
const std::string& string_at(const json& obj, const char* key, const std::string& where) {
  if (!obj.contains(key)) throw Error("missing key '" + std::string(key) + "'" + where);
  const json& v = obj.at(key);
  if (!v.is_string())
    throw Error("'" + std::string(key) + "'" + where + " must be a string, got " + std::string(v.type_name()) + " " +
                v.dump());
  return v.get_ref<const std::string&>();
}

// Reads the integer array obj[key]. Ids must lie in [0, vocab_size); labels may be -100.
void read_ids(const json& obj, const char* key, int vocab_size, bool is_label, std::vector<int32_t>& out) {
  const json& arr = obj.at(key);
  if (!arr.is_array())
    throw Error("'" + std::string(key) + "' must be an array of integers, got " + std::string(arr.type_name()) + " " +
                arr.dump());
  out.reserve(arr.size());
  for (size_t i = 0; i < arr.size(); ++i) {
    const json& v = arr[i];
    const std::string elem = std::string(key) + "[" + std::to_string(i) + "]";
    if (!v.is_number_integer()) throw Error(elem + " must be an integer, got " + v.dump());
    int64_t id;
    if (v.is_number_unsigned()) {
      const uint64_t u = v.get<uint64_t>();
      id = u > uint64_t(std::numeric_limits<int64_t>::max()) ? std::numeric_limits<int64_t>::max() : int64_t(u);
    } else {
      id = v.get<int64_t>();
    }
    if (is_label && id == kIgnoreIndex) {
      out.push_back(kIgnoreIndex);
      continue;
    }
    if (id < 0 || id >= vocab_size)
      throw Error(std::string(is_label ? "label " : "token id ") + v.dump() + " at " + elem +
                  " is outside the vocabulary [0, " + std::to_string(vocab_size) + ")" +
                  (is_label ? " and is not -100" : "") + " (vocab_size " + std::to_string(vocab_size) + ")");
    out.push_back(int32_t(id));
  }
}

std::string keys_of(const json& obj) {
  std::string s;
  for (auto it = obj.begin(); it != obj.end(); ++it) s += (s.empty() ? "'" : ", '") + it.key() + "'";
  return s;
}

// Rejects any key of obj outside `allowed` (a comma-separated list for the message).
void check_keys(const json& obj, std::initializer_list<const char*> allowed, const std::string& where) {
  for (auto it = obj.begin(); it != obj.end(); ++it) {
    bool ok = false;
    for (const char* a : allowed) ok = ok || it.key() == a;
    if (!ok) {
      std::string list;
      for (const char* a : allowed) list += (list.empty() ? "" : ", ") + std::string(a);
      throw Error("unknown key '" + it.key() + "'" + where + " (allowed: " + list + ")");
    }
  }
}

// One parsed line -> one sample (errors without location; the caller adds it).
SftSample parse_sample(const json& j, const TextEncoder& enc, int vocab_size) {
  if (!j.is_object())
    throw Error("expected a JSON object ({\"messages\": ...}, {\"prompt\": ..., \"completion\": ...} or "
                "{\"input_ids\": ...}), got " + std::string(j.type_name()) + " " + j.dump());
  const bool chat = j.contains("messages");
  const bool pc = j.contains("prompt") || j.contains("completion");
  const bool pre = j.contains("input_ids") || j.contains("labels");
  if (int(chat) + int(pc) + int(pre) > 1)
    throw Error("keys of two formats in one sample (" + keys_of(j) +
                "): use either 'messages', or 'prompt' + 'completion', or 'input_ids' [+ 'labels']");
  SftSample s;
  if (chat) {
    s.format = SftFormat::Chat;
    check_keys(j, {"messages"}, "");
    const json& msgs = j.at("messages");
    if (!msgs.is_array())
      throw Error("'messages' must be an array of {\"role\": ..., \"content\": ...} objects, got " +
                  std::string(msgs.type_name()) + " " + msgs.dump());
    std::vector<ChatMessage> messages;
    for (size_t i = 0; i < msgs.size(); ++i) {
      const std::string where = " in messages[" + std::to_string(i) + "]";
      const json& m = msgs[i];
      if (!m.is_object())
        throw Error("messages[" + std::to_string(i) + "] must be an object {\"role\": ..., \"content\": ...}, got " +
                    std::string(m.type_name()) + " " + m.dump());
      check_keys(m, {"role", "content"}, where);
      messages.push_back({string_at(m, "role", where), string_at(m, "content", where)});
    }
    s.doc = render_chat(messages, enc);
  } else if (pc) {
    s.format = SftFormat::PromptCompletion;
    check_keys(j, {"prompt", "completion"}, "");
    s.doc = render_prompt_completion(string_at(j, "prompt", ""), string_at(j, "completion", ""), enc);
  } else if (pre) {
    s.format = SftFormat::PreTokenized;
    check_keys(j, {"input_ids", "labels"}, "");
    if (!j.contains("input_ids")) throw Error("missing key 'input_ids' (a sample with 'labels' needs it)");
    read_ids(j, "input_ids", vocab_size, false, s.doc.input_ids);
    if (s.doc.input_ids.empty()) throw Error("'input_ids' is empty");
    if (j.contains("labels")) {
      read_ids(j, "labels", vocab_size, true, s.doc.labels);
      if (s.doc.labels.size() != s.doc.input_ids.size())
        throw Error("'labels' has " + std::to_string(s.doc.labels.size()) + " elements but 'input_ids' has " +
                    std::to_string(s.doc.input_ids.size()) + " (they must have equal length)");
    } else {
      s.doc.labels = s.doc.input_ids;
    }
    return s;  // ids already checked
  } else {
    throw Error(j.empty() ? std::string("empty object: expected 'messages', 'prompt' + 'completion' or 'input_ids'")
                          : "unknown key '" + j.begin().key() +
                                "' (a sample has 'messages', or 'prompt' + 'completion', or 'input_ids' [+ 'labels'])");
  }
  // Rendered text: the tokenizer's ids must fit the model's vocabulary.
  for (size_t t = 0; t < s.doc.input_ids.size(); ++t) {
    const int32_t id = s.doc.input_ids[t];
    if (id < 0 || id >= vocab_size)
      throw Error("token id " + std::to_string(id) + " at position " + std::to_string(t) +
                  " of the rendered sample is outside the vocabulary [0, " + std::to_string(vocab_size) +
                  ") (vocab_size " + std::to_string(vocab_size) + "): the tokenizer does not fit the model");
  }
  return s;
}

}  // namespace

int64_t first_invalid_utf8(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const int64_t n = int64_t(s.size());
  int64_t i = 0;
  while (i < n) {
    const unsigned c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    int len;
    unsigned lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;       // overlong
      if (c == 0xED) hi = 0x9F;       // surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;       // overlong
      if (c == 0xF4) hi = 0x8F;       // above U+10FFFF
    } else {
      return i;  // continuation byte without a lead, 0xC0/0xC1 (overlong), 0xF5..0xFF
    }
    for (int k = 1; k < len; ++k) {
      if (i + k >= n) return i;
      const unsigned b = p[i + k];
      if (k == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF)) return i;
    }
    i += len;
  }
  return -1;
}

Document render_chat(const std::vector<ChatMessage>& messages, const TextEncoder& enc) {
  if (messages.empty()) throw Error("'messages' is empty (a chat sample needs at least one assistant message)");
  const Specials sp(enc);
  bool has_assistant = false;
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string& r = messages[i].role;
    if (r != "system" && r != "user" && r != "assistant")
      throw Error("unknown role '" + r + "' in messages[" + std::to_string(i) +
                  "] (allowed: system, user, assistant)");
    has_assistant = has_assistant || r == "assistant";
  }
  if (!has_assistant) throw Error("no assistant message (nothing to train on)");
  Document d;
  push(d, sp.bos, false);
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    const bool assistant = m.role == "assistant";
    push(d, m.role == "system" ? sp.system : m.role == "user" ? sp.user : sp.assistant, false);
    push_text(d, m.content, enc, sp, assistant, "messages[" + std::to_string(i) + "]");
    push(d, sp.end, assistant);
  }
  push(d, sp.eos, messages.back().role == "assistant");
  return d;
}

Document render_prompt_completion(const std::string& prompt, const std::string& completion,
                                  const TextEncoder& enc) {
  const Specials sp(enc);
  Document d;
  push(d, sp.bos, false);
  push(d, sp.user, false);
  push_text(d, prompt, enc, sp, false, "'prompt'");
  push(d, sp.end, false);
  push(d, sp.assistant, false);
  push_text(d, completion, enc, sp, true, "'completion'");
  push(d, sp.end, true);
  push(d, sp.eos, true);
  return d;
}

std::vector<SftSample> read_sft_jsonl(const std::string& path, const TextEncoder& enc, int vocab_size) {
  if (vocab_size <= 0) throw Error(path + ": vocab_size must be positive, got " + std::to_string(vocab_size));
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open file");
  std::vector<SftSample> samples;
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
      SftSample s = parse_sample(j, enc, vocab_size);
      s.line = lineno;
      samples.push_back(std::move(s));
    } catch (const Error& e) {
      throw Error(at + ": " + e.what());
    }
  }
  if (in.bad()) throw Error(path + ": read error");
  if (samples.empty()) throw Error(path + ": no samples");
  return samples;
}

SftOverlongStats apply_overlong(std::vector<SftSample>& samples, int seq_len, const std::string& policy,
                                const std::string& path) {
  if (seq_len <= 0) throw Error("seq_len must be positive, got " + std::to_string(seq_len));
  if (policy != "truncate" && policy != "skip" && policy != "error")
    throw Error("overlong policy must be \"truncate\", \"skip\" or \"error\", got \"" + policy + "\"");
  SftOverlongStats st;
  const size_t L = size_t(seq_len);
  if (policy == "error") {
    for (const SftSample& s : samples)
      if (s.doc.input_ids.size() > L)
        throw Error(path + ":" + std::to_string(s.line) + ": sample has " + std::to_string(s.doc.input_ids.size()) +
                    " tokens, longer than seq_len = " + std::to_string(seq_len) +
                    " (overlong policy \"error\"; \"truncate\" or \"skip\" accept it)");
    return st;
  }
  if (policy == "skip") {
    const size_t before = samples.size();
    samples.erase(std::remove_if(samples.begin(), samples.end(),
                                 [L](const SftSample& s) { return s.doc.input_ids.size() > L; }),
                  samples.end());
    st.skipped = int64_t(before - samples.size());
    if (samples.empty() && before > 0)
      throw Error(path + ": all " + std::to_string(before) + " samples are longer than seq_len = " +
                  std::to_string(seq_len) + " (overlong policy \"skip\" left none)");
    return st;
  }
  for (SftSample& s : samples) {
    if (s.doc.input_ids.size() <= L) continue;
    s.doc.input_ids.resize(L);
    s.doc.labels.resize(L);
    ++st.truncated;
    // labels[0] is never a target (position t predicts labels[t+1]).
    if (std::all_of(s.doc.labels.begin() + 1, s.doc.labels.end(), [](int32_t l) { return l == kIgnoreIndex; }))
      ++st.truncated_no_target;
  }
  return st;
}

std::vector<Document> sft_documents(std::vector<SftSample>&& samples) {
  std::vector<Document> docs;
  docs.reserve(samples.size());
  for (SftSample& s : samples) docs.push_back(std::move(s.doc));
  samples.clear();
  return docs;
}

}  // namespace moetune
