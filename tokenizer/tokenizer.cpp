// Byte-level BPE: tokenizer.json parsing and writing, encoding, decoding and training.
// Contract in tokenizer.hpp, user documentation in docs/tokenizer.md.
#include "tokenizer/tokenizer.hpp"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <queue>
#include <set>

#include "io/fsutil.hpp"
#include "io/sha256.hpp"
#include "moe/error.hpp"
#include "tokenizer/byte_level.hpp"

namespace moetune {
namespace {

using njson = nlohmann::json;
using ordered_json = nlohmann::ordered_json;

std::atomic<uint64_t> g_serial{1};

// Per-thread cache of encoded words, for the tokenizer with serial `owner`.
struct WordCache {
  uint64_t owner = 0;
  std::unordered_map<std::string, std::vector<int32_t>> map;
};
thread_local WordCache t_cache;
constexpr size_t kCacheMaxWords = 1 << 18;
constexpr size_t kCacheMaxWordBytes = 64;
constexpr int64_t kMaxUnusedIds = 1 << 16;  // holes tolerated in a tokenizer.json's id range

std::string jstr(const std::string& s) { return njson(s).dump(); }

}  // namespace

// ------------------------------------------------------------------ construction

Tokenizer Tokenizer::byte_level() { return from_merges({}); }

Tokenizer Tokenizer::from_merges(const std::vector<std::pair<std::string, std::string>>& merges) {
  ordered_json vocab = ordered_json::object();
  std::unordered_map<std::string, int32_t> known;
  int32_t next = 0;
  for (int b = 0; b < 256; ++b) {
    const std::string bytes(1, char(b));
    vocab[tok::bytes_to_byte_level(bytes)] = next;
    known[bytes] = next++;
  }
  ordered_json merge_strings = ordered_json::array();
  for (size_t i = 0; i < merges.size(); ++i) {
    const auto& [a, b] = merges[i];
    if (!known.count(a) || !known.count(b))
      throw Error("tokenizer: merge " + std::to_string(i) + " uses a token that no earlier merge made");
    const std::string ab = a + b;
    // Two merges may make the same token ("ab"+"c" and "a"+"bc"): it has one id.
    if (!known.count(ab)) {
      vocab[tok::bytes_to_byte_level(ab)] = next;
      known[ab] = next++;
    }
    merge_strings.push_back(tok::bytes_to_byte_level(a) + " " + tok::bytes_to_byte_level(b));
  }
  ordered_json added = ordered_json::array();
  for (const char* s : kChatSpecials)
    added.push_back(ordered_json{{"id", next++},       {"content", s},        {"single_word", false}, {"lstrip", false},
                                 {"rstrip", false},    {"normalized", false}, {"special", true}});
  const ordered_json byte_level = {
      {"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
  ordered_json j;
  j["version"] = "1.0";
  j["truncation"] = nullptr;
  j["padding"] = nullptr;
  j["added_tokens"] = added;
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = byte_level;
  j["post_processor"] = byte_level;
  j["decoder"] = byte_level;
  j["model"] = ordered_json{{"type", "BPE"},
                            {"dropout", nullptr},
                            {"unk_token", nullptr},
                            {"continuing_subword_prefix", nullptr},
                            {"end_of_word_suffix", nullptr},
                            {"fuse_unk", false},
                            {"byte_fallback", false},
                            {"vocab", vocab},
                            {"merges", merge_strings}};
  return from_json(j.dump(1) + "\n", "tokenizer");
}

Tokenizer Tokenizer::load(const std::string& path) { return from_json(fsutil::read_file(path), path); }

Tokenizer Tokenizer::from_spec(const std::string& spec) {
  if (spec == "byte") return byte_level();
  std::error_code ec;
  if (std::filesystem::is_directory(spec, ec)) {
    const std::string inside = (std::filesystem::path(spec) / "tokenizer.json").string();
    if (!std::filesystem::exists(inside, ec))
      throw Error(spec + ": directory without a tokenizer.json (give a tokenizer.json, a checkpoint, or \"byte\")");
    return load(inside);
  }
  return load(spec);
}

Tokenizer Tokenizer::from_json(const std::string& text, const std::string& source) {
  const auto fail = [&](const std::string& key, const std::string& what) -> Error {
    return Error(source + ": key '" + key + "': " + what);
  };
  njson j;
  try {
    j = njson::parse(text);
  } catch (const njson::exception& e) {
    throw Error(source + ": not a valid tokenizer.json: invalid JSON: " + e.what());
  }
  if (!j.is_object()) throw Error(source + ": not a valid tokenizer.json: expected a JSON object");
  const auto is_null_or = [&](const char* key, auto&& ok) { return !j.contains(key) || j[key].is_null() || ok(j[key]); };

  // Normalizer: none. Pre-tokenizer: ByteLevel.
  if (!is_null_or("normalizer", [](const njson&) { return false; }))
    throw fail("normalizer", "normalizers are not supported (moetune reads byte-level BPE tokenizers), got " +
                                 j["normalizer"].dump().substr(0, 80));
  Tokenizer t;
  if (!j.contains("pre_tokenizer") || !j["pre_tokenizer"].is_object() ||
      !j["pre_tokenizer"].contains("type") || j["pre_tokenizer"]["type"] != "ByteLevel")
    throw fail("pre_tokenizer", "must be {\"type\": \"ByteLevel\", ...} (moetune reads byte-level BPE tokenizers), got " +
                                    (j.contains("pre_tokenizer") ? j["pre_tokenizer"].dump().substr(0, 80) : "nothing"));
  const njson& pre = j["pre_tokenizer"];
  const auto flag = [&](const njson& obj, const char* key, bool dflt, const std::string& where) {
    if (!obj.contains(key) || obj[key].is_null()) return dflt;
    if (!obj[key].is_boolean()) throw fail(where + "." + key, "must be true or false, got " + obj[key].dump());
    return obj[key].get<bool>();
  };
  t.add_prefix_space_ = flag(pre, "add_prefix_space", true, "pre_tokenizer");
  t.use_regex_ = flag(pre, "use_regex", true, "pre_tokenizer");

  // Model: BPE without dropout, byte fallback or subword affixes.
  if (!j.contains("model") || !j["model"].is_object()) throw fail("model", "missing (expected an object)");
  const njson& m = j["model"];
  if (m.contains("type") && m["type"] != "BPE")
    throw fail("model.type", "must be \"BPE\", got " + m["type"].dump());
  if (m.contains("dropout") && !m["dropout"].is_null())
    throw fail("model.dropout", "must be null (BPE dropout is not supported), got " + m["dropout"].dump());
  if (flag(m, "byte_fallback", false, "model")) throw fail("model.byte_fallback", "must be false");
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (m.contains(k) && !m[k].is_null() && m[k] != "") throw fail(std::string("model.") + k, "must be null");
  t.ignore_merges_ = flag(m, "ignore_merges", false, "model");

  // Vocabulary: id -> token. Added tokens may or may not be in model.vocab.
  if (!m.contains("vocab") || !m["vocab"].is_object()) throw fail("model.vocab", "missing (expected an object)");
  std::map<int64_t, std::string> by_id;  // id -> byte-level string (vocab) or content (added)
  for (auto it = m["vocab"].begin(); it != m["vocab"].end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 || it.value().get<int64_t>() >= (1LL << 31))
      throw fail("model.vocab", "the id of " + jstr(it.key()) + " must be an integer in [0, 2^31), got " +
                                    it.value().dump());
    const int64_t id = it.value().get<int64_t>();
    if (!by_id.emplace(id, it.key()).second)
      throw fail("model.vocab", "id " + std::to_string(id) + " is given to both " + jstr(by_id[id]) + " and " +
                                    jstr(it.key()));
  }
  std::map<int64_t, std::string> added;  // id -> content
  if (j.contains("added_tokens") && !j["added_tokens"].is_null()) {
    if (!j["added_tokens"].is_array()) throw fail("added_tokens", "must be an array");
    for (size_t i = 0; i < j["added_tokens"].size(); ++i) {
      const njson& a = j["added_tokens"][i];
      const std::string key = "added_tokens[" + std::to_string(i) + "]";
      if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer() || a["id"].get<int64_t>() < 0 ||
          a["id"].get<int64_t>() >= (1LL << 31) || !a.contains("content") || !a["content"].is_string() ||
          a["content"].get<std::string>().empty())
        throw fail(key, "must be {\"id\": int >= 0, \"content\": non-empty string, ...}, got " + a.dump().substr(0, 80));
      const int64_t id = a["id"].get<int64_t>();
      const std::string content = a["content"].get<std::string>();
      auto v = by_id.find(id);
      if (v != by_id.end() && v->second != content)
        throw fail(key, "id " + std::to_string(id) + " is " + jstr(content) + " here but " + jstr(v->second) +
                            " in model.vocab");
      if (m["vocab"].contains(content) && m["vocab"][content].get<int64_t>() != id)
        throw fail(key, jstr(content) + " has id " + std::to_string(id) + " here but " +
                            m["vocab"][content].dump() + " in model.vocab");
      if (!added.emplace(id, content).second) throw fail(key, "id " + std::to_string(id) + " is listed twice");
    }
  }
  const int64_t size = std::max(by_id.empty() ? 0 : by_id.rbegin()->first + 1, added.empty() ? 0 : added.rbegin()->first + 1);
  // Ids index a table (one entry per id up to the largest): refuse a file whose ids are
  // mostly holes instead of allocating gigabytes for an id near 2^31.
  int64_t used = int64_t(by_id.size());
  for (const auto& a : added) used += by_id.count(a.first) ? 0 : 1;
  if (size - used > kMaxUnusedIds)
    throw fail(by_id.empty() || (!added.empty() && added.rbegin()->first > by_id.rbegin()->first) ? "added_tokens"
                                                                                                 : "model.vocab",
               "the largest id is " + std::to_string(size - 1) + " but only " + std::to_string(used) +
                   " ids are used; more than " + std::to_string(kMaxUnusedIds) + " unused ids (corrupt?)");
  t.tokens_.assign(size_t(size), std::string());
  t.kind_.assign(size_t(size), Kind::Unused);
  for (const auto& [id, content] : added) {
    t.tokens_[size_t(id)] = content;
    t.kind_[size_t(id)] = Kind::Special;
    if (!t.specials_.emplace(content, int32_t(id)).second)
      throw fail("added_tokens", jstr(content) + " is listed twice");
  }
  for (const auto& [id, s] : by_id) {
    if (t.kind_[size_t(id)] == Kind::Special) continue;
    std::string bytes;
    if (!tok::byte_level_to_bytes(s, bytes) || bytes.empty())
      throw fail("model.vocab", jstr(s) + " (id " + std::to_string(id) +
                                    ") is not a byte-level token (each character must be the image of a byte)");
    if (!t.ids_.emplace(bytes, int32_t(id)).second)
      throw fail("model.vocab", jstr(s) + " (id " + std::to_string(id) + ") duplicates id " +
                                    std::to_string(t.ids_[bytes]));
    t.tokens_[size_t(id)] = bytes;
    t.kind_[size_t(id)] = Kind::Normal;
  }
  for (int b = 0; b < 256; ++b) {
    auto it = t.ids_.find(std::string(1, char(b)));
    if (it == t.ids_.end()) {
      char hex[8];
      std::snprintf(hex, sizeof hex, "0x%02X", b);
      throw fail("model.vocab", "lacks the byte token " + jstr(tok::bytes_to_byte_level(std::string(1, char(b)))) +
                                    " (byte " + hex + "); a byte-level BPE needs all 256");
    }
    t.byte_id_[size_t(b)] = it->second;
  }

  // Merges: "a b" strings or ["a", "b"] pairs, in rank order.
  if (!m.contains("merges") || !m["merges"].is_array()) throw fail("model.merges", "missing (expected an array)");
  const njson& ms = m["merges"];
  t.merge_list_.reserve(ms.size());
  for (size_t i = 0; i < ms.size(); ++i) {
    const std::string key = "model.merges[" + std::to_string(i) + "]";
    std::string a, b;
    if (ms[i].is_string()) {
      const std::string s = ms[i].get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || sp == 0 || sp + 1 == s.size() || s.find(' ', sp + 1) != std::string::npos)
        throw fail(key, "must be \"LEFT RIGHT\" (two tokens, one space), got " + jstr(s));
      a = s.substr(0, sp), b = s.substr(sp + 1);
    } else if (ms[i].is_array() && ms[i].size() == 2 && ms[i][0].is_string() && ms[i][1].is_string()) {
      a = ms[i][0].get<std::string>(), b = ms[i][1].get<std::string>();
    } else {
      throw fail(key, "must be \"LEFT RIGHT\" or [\"LEFT\", \"RIGHT\"], got " + ms[i].dump().substr(0, 80));
    }
    std::string ba, bb;
    const auto id_of = [&](const std::string& s, std::string& bytes) -> int32_t {
      if (!tok::byte_level_to_bytes(s, bytes)) return -1;
      auto it = t.ids_.find(bytes);
      return it == t.ids_.end() ? -1 : it->second;
    };
    const int32_t ia = id_of(a, ba), ib = id_of(b, bb);
    if (ia < 0) throw fail(key, jstr(a) + " is not in model.vocab");
    if (ib < 0) throw fail(key, jstr(b) + " is not in model.vocab");
    std::string bab;
    const int32_t iab = id_of(a + b, bab);
    if (iab < 0) throw fail(key, "the merged token " + jstr(a + b) + " is not in model.vocab");
    if (!t.merges_.emplace(pair_key(ia, ib), Merge{int32_t(i), iab}).second)
      throw fail(key, jstr(a + " " + b) + " is listed twice");
    t.merge_list_.emplace_back(ia, ib);
  }
  t.json_ = text;
  t.serial_ = g_serial.fetch_add(1);
  return t;
}

// ------------------------------------------------------------------ encoding

void Tokenizer::encode_word(std::string_view word, std::vector<int32_t>& out) const {
  if (ignore_merges_) {
    auto it = ids_.find(std::string(word));
    if (it != ids_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  const int n = int(word.size());
  if (n == 1) {
    out.push_back(byte_id_[static_cast<unsigned char>(word[0])]);
    return;
  }
  struct Sym {
    int32_t id, prev, next;
    bool alive;
  };
  std::vector<Sym> s(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) s[size_t(i)] = {byte_id_[static_cast<unsigned char>(word[size_t(i)])], i - 1, i + 1 < n ? i + 1 : -1, true};
  // Candidate merges (rank, position of the left symbol, merged id); lowest rank, then
  // leftmost position first. Entries go stale when a neighbour merges; checked on pop.
  struct Cand {
    int32_t rank, pos, id;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  const auto push = [&](int32_t pos) {
    const int32_t nx = s[size_t(pos)].next;
    if (nx < 0) return;
    auto it = merges_.find(pair_key(s[size_t(pos)].id, s[size_t(nx)].id));
    if (it != merges_.end()) heap.push({it->second.rank, pos, it->second.id});
  };
  for (int i = 0; i + 1 < n; ++i) push(i);
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    Sym& l = s[size_t(c.pos)];
    if (!l.alive || l.next < 0) continue;
    Sym& r = s[size_t(l.next)];
    auto it = merges_.find(pair_key(l.id, r.id));
    if (it == merges_.end() || it->second.id != c.id) continue;  // stale
    l.id = c.id;
    r.alive = false;
    l.next = r.next;
    if (l.next >= 0) s[size_t(l.next)].prev = c.pos;
    if (l.prev >= 0) push(l.prev);
    push(c.pos);
  }
  for (int i = 0; i >= 0; i = s[size_t(i)].next) out.push_back(s[size_t(i)].id);
}

std::vector<int32_t> Tokenizer::encode(const std::string& text) const {
  std::vector<int32_t> out;
  if (text.empty()) return out;
  std::string prefixed;
  std::string_view t = text;
  if (add_prefix_space_ && text[0] != ' ') {
    prefixed = " " + text;
    t = prefixed;
  }
  out.reserve(t.size() / 3 + 4);
  WordCache& cache = t_cache;
  if (cache.owner != serial_ || cache.map.size() > kCacheMaxWords) {
    cache.map.clear();
    cache.owner = serial_;
  }
  const auto one = [&](std::string_view w) {
    if (w.size() > kCacheMaxWordBytes) return encode_word(w, out);
    std::string key(w);
    auto it = cache.map.find(key);
    if (it == cache.map.end()) {
      std::vector<int32_t> ids;
      encode_word(w, ids);
      it = cache.map.emplace(std::move(key), std::move(ids)).first;
    }
    out.insert(out.end(), it->second.begin(), it->second.end());
  };
  if (!use_regex_) {
    one(t);
  } else {
    for (const auto& [b, e] : tok::pretokenize(t)) one(t.substr(b, e - b));
  }
  return out;
}

int32_t Tokenizer::special_id(const std::string& name) const {
  auto it = specials_.find(name);
  if (it != specials_.end()) return it->second;
  std::string have;
  for (const auto& [k, v] : specials_) have += (have.empty() ? "" : ", ") + k;
  throw Error("tokenizer has no special token " + jstr(name) + " (it has: " + (have.empty() ? "none" : have) +
              "); the chat template needs " + "<|pad|> <|bos|> <|eos|> <|system|> <|user|> <|assistant|> <|end|>");
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size() || kind_[size_t(id)] == Kind::Unused)
      throw Error("tokenizer: id " + std::to_string(id) + " is not in the vocabulary (size " +
                  std::to_string(vocab_size()) + ")");
    out += tokens_[size_t(id)];
  }
  return out;
}

std::string Tokenizer::sha256_hex() const { return moetune::sha256_hex(json_); }

void Tokenizer::save(const std::string& path) const { fsutil::write_file_atomic(path, json_); }

std::string Tokenizer::describe() const {
  return "byte-level BPE: " + std::to_string(vocab_size()) + " tokens (256 bytes, " + std::to_string(num_merges()) +
         " merges, " + std::to_string(num_specials()) + " special), sha256 " + sha256_hex().substr(0, 12);
}

// ------------------------------------------------------------------ training

void BpeTrainer::add_text(std::string_view text) {
  bytes_ += int64_t(text.size());
  for (const auto& [b, e] : tok::pretokenize(text)) ++counts_[std::string(text.substr(b, e - b))];
}

Tokenizer BpeTrainer::train(const Options& opt) const {
  const int base = 256 + int(kChatSpecials.size());
  if (opt.vocab_size < base)
    throw Error("tokenizer train: --vocab-size must be at least " + std::to_string(base) +
                " (256 bytes + 7 special tokens), got " + std::to_string(opt.vocab_size));
  if (opt.min_frequency < 1) throw Error("tokenizer train: --min-frequency must be >= 1");
  const int want = opt.vocab_size - base;

  // Words in a fixed order (sorted), so that nothing depends on hash-map order.
  std::vector<std::pair<std::string, int64_t>> sorted(counts_.begin(), counts_.end());
  std::sort(sorted.begin(), sorted.end());
  struct Word {
    std::vector<int32_t> syms;
    int64_t count;
  };
  std::vector<Word> words(sorted.size());
  for (size_t w = 0; w < sorted.size(); ++w) {
    words[w].count = sorted[w].second;
    for (unsigned char c : sorted[w].first) words[w].syms.push_back(c);
  }
  std::vector<std::string> bytes(256);
  for (int b = 0; b < 256; ++b) bytes[size_t(b)] = std::string(1, char(b));

  const auto key = [](int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); };
  std::unordered_map<uint64_t, int64_t> pair_count;
  std::unordered_map<uint64_t, std::vector<int32_t>> where;  // pair -> words holding it (maybe stale)
  for (size_t w = 0; w < words.size(); ++w)
    for (size_t i = 0; i + 1 < words[w].syms.size(); ++i) {
      const uint64_t k = key(words[w].syms[i], words[w].syms[i + 1]);
      pair_count[k] += words[w].count;
      auto& v = where[k];
      if (v.empty() || v.back() != int32_t(w)) v.push_back(int32_t(w));
    }
  // Max-heap on (count, then smaller pair); lazily re-validated against pair_count.
  struct Entry {
    int64_t count;
    uint64_t pair;
    bool operator<(const Entry& o) const { return count != o.count ? count < o.count : pair > o.pair; }
  };
  std::priority_queue<Entry> heap;
  for (const auto& [k, c] : pair_count) heap.push({c, k});

  std::vector<std::pair<std::string, std::string>> merges;
  merges.reserve(size_t(want));
  std::unordered_map<std::string, int32_t> id_of;  // bytes of the merged tokens -> id
  std::vector<int32_t> stamp(words.size(), -1);
  int next_report = 1;
  const auto made = [&] { return int(bytes.size()) - 256; };
  while (made() < want && !heap.empty()) {
    const Entry top = heap.top();
    heap.pop();
    auto pc = pair_count.find(top.pair);
    const int64_t cur = pc == pair_count.end() ? 0 : pc->second;
    if (cur != top.count) {
      if (cur > 0) heap.push({cur, top.pair});
      continue;
    }
    if (cur < opt.min_frequency) break;
    const int32_t a = int32_t(top.pair >> 32), b = int32_t(uint32_t(top.pair));
    // A token made before by another merge ("ab"+"c", then "a"+"bc") keeps its id.
    const std::string ab = bytes[size_t(a)] + bytes[size_t(b)];
    auto known = id_of.find(ab);
    const int32_t id = known != id_of.end() ? known->second : int32_t(bytes.size());
    if (known == id_of.end()) {
      id_of.emplace(ab, id);
      bytes.push_back(ab);
    }
    const int32_t stamp_id = int32_t(merges.size());
    merges.emplace_back(bytes[size_t(a)], bytes[size_t(b)]);
    std::vector<int32_t> holders = std::move(where[top.pair]);
    where.erase(top.pair);
    std::set<uint64_t> touched;
    for (int32_t w : holders) {
      if (stamp[size_t(w)] == stamp_id) continue;
      stamp[size_t(w)] = stamp_id;
      Word& wd = words[size_t(w)];
      // Remove the word's pairs, merge (left to right, non-overlapping), add them back.
      for (size_t i = 0; i + 1 < wd.syms.size(); ++i) pair_count[key(wd.syms[i], wd.syms[i + 1])] -= wd.count;
      std::vector<int32_t> ns;
      ns.reserve(wd.syms.size());
      for (size_t i = 0; i < wd.syms.size(); ++i) {
        if (i + 1 < wd.syms.size() && wd.syms[i] == a && wd.syms[i + 1] == b) {
          ns.push_back(id);
          ++i;
        } else {
          ns.push_back(wd.syms[i]);
        }
      }
      wd.syms = std::move(ns);
      for (size_t i = 0; i + 1 < wd.syms.size(); ++i) {
        const uint64_t k = key(wd.syms[i], wd.syms[i + 1]);
        pair_count[k] += wd.count;
        if (wd.syms[i] == id || wd.syms[i + 1] == id) {
          auto& v = where[k];
          if (v.empty() || v.back() != w) v.push_back(w);
          touched.insert(k);
        }
      }
    }
    pair_count.erase(top.pair);
    for (uint64_t k : touched) heap.push({pair_count[k], k});
    if (opt.progress && made() * 10 >= next_report * want) {
      std::printf("tokenizer train: %d/%d tokens learned (%zu merges; last pair seen %lld times)\n", made(), want,
                  merges.size(), static_cast<long long>(cur));
      std::fflush(stdout);
      while (made() * 10 >= next_report * want) ++next_report;
    }
  }
  return Tokenizer::from_merges(merges);
}

}  // namespace moetune
