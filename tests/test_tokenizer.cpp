// Tokenizers: the byte-level alphabet and pre-tokenizer (GPT-2 pattern), the byte
// tokenizer, BPE training, encoding against a naive reference, tokenizer.json save /
// load / foreign files, and bad tokenizer.json files.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "moe/error.hpp"
#include "tokenizer/byte_level.hpp"
#include "tokenizer/tokenizer.hpp"

using namespace moetune;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

std::vector<std::string> words_of(const std::string& text) {
  std::vector<std::string> out;
  for (const auto& [b, e] : tok::pretokenize(text)) out.push_back(text.substr(b, e - b));
  return out;
}

fs::path scratch(const std::string& name) {
  const fs::path d = fs::temp_directory_path() / ("moetune_tok_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

// A corpus with repeated words, numbers, punctuation, whitespace runs and UTF-8.
std::string corpus(int lines, uint32_t seed) {
  static const char* vocab[] = {"the",  "cat",    "sat",   "on",     "mat",  "caf\xc3\xa9", "\xe6\x9d\xb1\xe4\xba\xac",
                                "2024", "don't", "it's", "<|user|>", "!!",   "(x+y)",       "naive", "tokens"};
  std::mt19937 g(seed);
  std::string s;
  for (int l = 0; l < lines; ++l) {
    const int n = 3 + int(g() % 8);
    for (int w = 0; w < n; ++w) {
      if (w) s += (g() % 7 == 0) ? "  " : " ";
      s += vocab[g() % (sizeof vocab / sizeof vocab[0])];
    }
    s += (g() % 5 == 0) ? "\n\n" : "\n";
  }
  return s;
}

// GPT-2's original algorithm, as a reference: in each word, repeatedly merge every
// occurrence (left to right) of the adjacent pair of lowest rank.
std::vector<int32_t> naive_encode(const Tokenizer& t, const std::string& text) {
  std::map<std::pair<std::string, std::string>, int> rank;
  // Recover the merges from the tokenizer.json.
  const json j = json::parse(t.json());
  std::map<std::string, int32_t> id;
  for (auto it = j["model"]["vocab"].begin(); it != j["model"]["vocab"].end(); ++it) {
    std::string b;
    EXPECT_TRUE(tok::byte_level_to_bytes(it.key(), b));
    id[b] = it.value().get<int32_t>();
  }
  int r = 0;
  for (const auto& m : j["model"]["merges"]) {
    const std::string s = m.get<std::string>();
    std::string a, b;
    EXPECT_TRUE(tok::byte_level_to_bytes(s.substr(0, s.find(' ')), a));
    EXPECT_TRUE(tok::byte_level_to_bytes(s.substr(s.find(' ') + 1), b));
    rank.emplace(std::make_pair(a, b), r++);
  }
  std::vector<int32_t> out;
  for (const std::string& w : words_of(text)) {
    std::vector<std::string> parts;
    for (char c : w) parts.emplace_back(1, c);
    while (parts.size() > 1) {
      int best = -1;
      for (size_t i = 0; i + 1 < parts.size(); ++i) {
        auto it = rank.find({parts[i], parts[i + 1]});
        if (it != rank.end() && (best < 0 || it->second < best)) best = it->second;
      }
      if (best < 0) break;
      std::vector<std::string> np;
      for (size_t i = 0; i < parts.size(); ++i) {
        if (i + 1 < parts.size()) {
          auto it = rank.find({parts[i], parts[i + 1]});
          if (it != rank.end() && it->second == best) {
            np.push_back(parts[i] + parts[i + 1]);
            ++i;
            continue;
          }
        }
        np.push_back(parts[i]);
      }
      parts = std::move(np);
    }
    for (const auto& p : parts) out.push_back(id.at(p));
  }
  return out;
}

Tokenizer trained(int vocab_size, int lines = 400, uint32_t seed = 7) {
  BpeTrainer tr;
  const std::string c = corpus(lines, seed);
  // Feed it as several documents.
  for (size_t i = 0; i < c.size(); i += 1000) tr.add_text(std::string_view(c).substr(i, 1000));
  return tr.train({vocab_size, 2, false});
}

std::string error_of(const std::string& text) {
  try {
    Tokenizer::from_json(text, "tok.json");
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST(ByteLevel, Gpt2ByteToUnicodeMap) {
  EXPECT_EQ(tok::byte_to_codepoint(' '), char32_t(0x120));   // 'Ġ'
  EXPECT_EQ(tok::byte_to_codepoint('\n'), char32_t(0x10A));  // 'Ċ'
  EXPECT_EQ(tok::byte_to_codepoint(0), char32_t(0x100));
  EXPECT_EQ(tok::byte_to_codepoint(127), char32_t(0x121));
  EXPECT_EQ(tok::byte_to_codepoint(173), char32_t(0x143));   // soft hyphen -> 'Ń'
  EXPECT_EQ(tok::byte_to_codepoint('!'), char32_t('!'));
  EXPECT_EQ(tok::byte_to_codepoint(0xFF), char32_t(0xFF));
  std::set<char32_t> images;
  for (int b = 0; b < 256; ++b) {
    images.insert(tok::byte_to_codepoint(uint8_t(b)));
    EXPECT_EQ(tok::codepoint_to_byte(tok::byte_to_codepoint(uint8_t(b))), b);
  }
  EXPECT_EQ(images.size(), 256u);
  EXPECT_EQ(tok::codepoint_to_byte(0x144), -1);
  EXPECT_EQ(tok::bytes_to_byte_level(" a\n"), "\xc4\xa0" "a" "\xc4\x8a");
  std::string back;
  EXPECT_TRUE(tok::byte_level_to_bytes("\xc4\xa0" "a" "\xc4\x8a", back));
  EXPECT_EQ(back, " a\n");
  EXPECT_FALSE(tok::byte_level_to_bytes("\xe6\x9d\xb1", back));  // not the image of a byte
}

TEST(ByteLevel, UnicodeClasses) {
  EXPECT_TRUE(tok::is_letter(U'é'));
  EXPECT_TRUE(tok::is_letter(U'東'));
  EXPECT_TRUE(tok::is_letter(U'Ж'));
  EXPECT_FALSE(tok::is_letter(U'5'));
  EXPECT_TRUE(tok::is_number(U'٣'));  // Arabic-Indic digit (Nd)
  EXPECT_TRUE(tok::is_number(U'½'));  // No
  EXPECT_TRUE(tok::is_number(U'Ⅻ'));  // Nl
  EXPECT_FALSE(tok::is_number(U'x'));
  EXPECT_TRUE(tok::is_space(0xA0));
  EXPECT_TRUE(tok::is_space(0x3000));
  EXPECT_FALSE(tok::is_space(0x200B));  // zero-width space is not White_Space
  EXPECT_FALSE(tok::is_letter(0x1F642)); // emoji: So
  EXPECT_FALSE(tok::is_number(0x1F642));
  EXPECT_TRUE(tok::valid_utf8("gr\xc3\xbc\xc3\x9f \xf0\x9f\x99\x82"));
  EXPECT_FALSE(tok::valid_utf8("\xc0\xaf"));      // overlong
  EXPECT_FALSE(tok::valid_utf8("\xed\xa0\x80"));  // surrogate
  EXPECT_FALSE(tok::valid_utf8("ab\xe6\x9d"));    // truncated
}

TEST(ByteLevel, PretokenizerFollowsTheGpt2Pattern) {
  using V = std::vector<std::string>;
  EXPECT_EQ(words_of("Hello world's  end"), (V{"Hello", " world", "'s", " ", " end"}));
  EXPECT_EQ(words_of("I'm 12 apples!!  \n\nok"), (V{"I", "'m", " 12", " apples", "!!", "  \n", "\n", "ok"}));
  EXPECT_EQ(words_of("x   "), (V{"x", "   "}));
  EXPECT_EQ(words_of("  x"), (V{" ", " x"}));
  EXPECT_EQ(words_of("a+=b x ++y"), (V{"a", "+=", "b", " x", " ++", "y"}));
  EXPECT_EQ(words_of("DON'T we'll've"), (V{"DON", "'", "T", " we", "'ll", "'ve"}));
  EXPECT_EQ(words_of("abc123def"), (V{"abc", "123", "def"}));
  EXPECT_EQ(words_of("na\xc3\xafve caf\xc3\xa9 \xe6\x9d\xb1\xe4\xba\xac \xd9\xa3\xd9\xa4 \xc2\xbd"),
            (V{"na\xc3\xafve", " caf\xc3\xa9", " \xe6\x9d\xb1\xe4\xba\xac", " \xd9\xa3\xd9\xa4", " \xc2\xbd"}));
  EXPECT_EQ(words_of("a\xc2\xa0" "b"), (V{"a", "\xc2\xa0", "b"}));  // NBSP is whitespace
  EXPECT_EQ(words_of("\tx\n"), (V{"\t", "x", "\n"}));
  EXPECT_EQ(words_of("a\xff\xfe" "b"), (V{"a", "\xff\xfe", "b"}));  // invalid bytes: "other"
  EXPECT_EQ(words_of(""), V{});
  // The words always tile the text, whatever the bytes.
  std::mt19937 g(11);
  for (int n = 0; n < 200; ++n) {
    std::string s(size_t(g() % 40), '\0');
    for (auto& c : s) c = char(n % 2 ? g() % 256 : " \n'aZ9!\xc3\xa9"[g() % 9]);
    std::string joined;
    for (const auto& w : words_of(s)) {
      EXPECT_FALSE(w.empty());
      joined += w;
    }
    EXPECT_EQ(joined, s);
  }
}

TEST(Tokenizer, ByteLevelIsBytesThenChatSpecials) {
  const Tokenizer t = Tokenizer::byte_level();
  EXPECT_EQ(t.vocab_size(), 263);
  EXPECT_EQ(t.num_merges(), 0);
  const std::string s = "gr\xc3\xbc\xc3\x9f dich <|user|>\n";
  const auto ids = t.encode(s);
  ASSERT_EQ(ids.size(), s.size());
  for (size_t i = 0; i < s.size(); ++i) EXPECT_EQ(ids[i], int32_t(static_cast<unsigned char>(s[i])));
  for (size_t i = 0; i < kChatSpecials.size(); ++i) {
    EXPECT_EQ(t.special_id(kChatSpecials[i]), 256 + int32_t(i));
    EXPECT_TRUE(t.is_special(256 + int32_t(i)));
    EXPECT_EQ(t.decode({256 + int32_t(i)}), kChatSpecials[i]);
  }
  EXPECT_THROW(t.special_id("<|tool|>"), Error);
  EXPECT_THROW(t.decode({263}), Error);
  EXPECT_THROW(t.decode({-1}), Error);
  // Built twice, it is the same file.
  EXPECT_EQ(Tokenizer::byte_level().sha256_hex(), t.sha256_hex());
}

TEST(Tokenizer, RoundTripOfArbitraryBytesAndUtf8) {
  for (const Tokenizer& t : {Tokenizer::byte_level(), trained(420)}) {
    std::mt19937 g(3);
    for (int n = 0; n < 100; ++n) {
      std::string s(size_t(g() % 64), '\0');
      for (auto& c : s) c = char(g() % 256);  // NUL and invalid UTF-8 included
      EXPECT_EQ(t.decode(t.encode(s)), s);
    }
    const std::string utf8 = corpus(20, 99) + "gr\xc3\xbc\xc3\x9f dich, \xe4\xb8\x96\xe7\x95\x8c \xf0\x9f\x99\x82";
    EXPECT_EQ(t.decode(t.encode(utf8)), utf8);
  }
}

TEST(Tokenizer, TrainingLearnsTheMostFrequentPairsInOrder) {
  BpeTrainer tr;
  tr.add_text("aaaa aaaa aaaa");  // words "aaaa" x1, " aaaa" x2
  EXPECT_EQ(tr.distinct_words(), 2);
  const Tokenizer t = tr.train({263 + 3, 1, false});
  // (a,a) 9 times -> "aa"; (aa,aa) 3 times -> "aaaa"; (' ',aaaa) 2 times -> " aaaa".
  ASSERT_EQ(t.num_merges(), 3);
  EXPECT_EQ(t.token(256), "aa");
  EXPECT_EQ(t.token(257), "aaaa");
  EXPECT_EQ(t.token(258), " aaaa");
  EXPECT_EQ(t.vocab_size(), 266);
  EXPECT_EQ(t.special_id("<|pad|>"), 259);
  EXPECT_EQ(t.encode("aaaa aaaa"), (std::vector<int32_t>{257, 258}));
  EXPECT_EQ(t.encode("aaa"), (std::vector<int32_t>{256, 'a'}));
  // " aaaaaaa": (a,a) leftmost first -> " |aa|aa|aa|a", (aa,aa) -> " |aaaa|aa|a", then " aaaa".
  EXPECT_EQ(t.encode(" aaaaaaa"), (std::vector<int32_t>{258, 256, 'a'}));
  // min_frequency stops early: only (a,a) occurs >= 4 times.
  EXPECT_EQ(tr.train({263 + 3, 4, false}).num_merges(), 1);
  EXPECT_THROW(tr.train({262, 2, false}), Error);
}

TEST(Tokenizer, TrainingIsDeterministicAndEncodingMatchesNaiveBpe) {
  const Tokenizer a = trained(300), b = trained(300);
  EXPECT_EQ(a.json(), b.json());
  EXPECT_EQ(a.vocab_size(), 300);
  // Asked for more than the corpus supports (pairs seen twice or more), it stops early.
  const Tokenizer big = trained(5000);
  EXPECT_GT(big.vocab_size(), 300);
  EXPECT_LT(big.vocab_size(), 5000);
  const std::string text = corpus(60, 123) + " tokens!! (x+y)y don't 2024202420";
  const auto ids = a.encode(text);
  EXPECT_EQ(ids, naive_encode(a, text));
  EXPECT_LT(ids.size(), text.size() / 2);  // it compresses the text it was trained on
}

TEST(Tokenizer, SavedAndReloadedGivesTheSameIds) {
  const fs::path d = scratch("reload");
  const Tokenizer t = trained(450);
  t.save((d / "tokenizer.json").string());
  const Tokenizer r = Tokenizer::load((d / "tokenizer.json").string());
  EXPECT_EQ(r.json(), t.json());
  EXPECT_EQ(r.sha256_hex(), t.sha256_hex());
  EXPECT_EQ(r.vocab_size(), t.vocab_size());
  EXPECT_EQ(r.num_merges(), t.num_merges());
  for (int32_t id = 0; id < t.vocab_size(); ++id) EXPECT_EQ(r.token(id), t.token(id)) << id;
  std::mt19937 g(5);
  for (int n = 0; n < 50; ++n) {
    std::string s = corpus(3, uint32_t(n));
    for (int k = 0; k < 5; ++k) s.insert(g() % (s.size() + 1), 1, char(g() % 256));
    EXPECT_EQ(r.encode(s), t.encode(s));
  }
  // It is a Hugging Face tokenizer.json: BPE model, ByteLevel pre-tokenizer, the
  // specials as added tokens, byte tokens in the GPT-2 alphabet.
  const json j = json::parse(t.json());
  EXPECT_EQ(j["model"]["type"], "BPE");
  EXPECT_EQ(j["pre_tokenizer"]["type"], "ByteLevel");
  EXPECT_EQ(j["decoder"]["type"], "ByteLevel");
  EXPECT_EQ(j["model"]["vocab"]["\xc4\xa0"], ' ');
  EXPECT_EQ(j["model"]["merges"].size(), size_t(t.num_merges()));
  ASSERT_EQ(j["added_tokens"].size(), 7u);
  EXPECT_EQ(j["added_tokens"][2]["content"], "<|eos|>");
  EXPECT_EQ(j["added_tokens"][2]["id"], t.special_id("<|eos|>"));
  EXPECT_EQ(j["added_tokens"][2]["special"], true);
  fs::remove_all(d);
}

TEST(Tokenizer, SpecialTokensAreNeverProducedFromText) {
  const Tokenizer t = trained(600);  // its corpus contains "<|user|>" often
  std::string text;
  for (const char* s : kChatSpecials) text += std::string(s) + " x" + s + "\n";
  for (int32_t id : t.encode(text)) EXPECT_FALSE(t.is_special(id)) << id;
  EXPECT_EQ(t.decode(t.encode(text)), text);
  for (const char* s : kChatSpecials) EXPECT_EQ(t.decode({t.special_id(s)}), s);
}

TEST(Tokenizer, TwoMergesMakingOneTokenShareItsId) {
  const Tokenizer t = Tokenizer::from_merges({{"a", "b"}, {"ab", "c"}, {"b", "c"}, {"a", "bc"}});
  EXPECT_EQ(t.num_merges(), 4);
  EXPECT_EQ(t.vocab_size(), 256 + 3 + 7);
  EXPECT_EQ(t.encode("abc"), (std::vector<int32_t>{257}));
  EXPECT_EQ(t.encode("xbc"), (std::vector<int32_t>{'x', 258}));
  EXPECT_THROW(Tokenizer::from_merges({{"ab", "c"}}), Error);
}

TEST(Tokenizer, ReadsAHuggingFaceStyleFile) {
  // GPT-2 layout: ids not in byte order, the special in model.vocab too, merges as
  // pairs, add_prefix_space. Byte ids: byte b -> 300 - b.
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[tok::bytes_to_byte_level(std::string(1, char(b)))] = 300 - b;
  vocab["\xc4\xa0h"] = 301;  // " h"
  vocab["\xc4\xa0hi"] = 302; // " hi"
  vocab["<|endoftext|>"] = 303;
  json j = {{"version", "1.0"},
            {"added_tokens", {{{"id", 303}, {"content", "<|endoftext|>"}, {"special", true}}}},
            {"normalizer", nullptr},
            {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"use_regex", true}}},
            {"post_processor", {{"type", "ByteLevel"}}},
            {"decoder", {{"type", "ByteLevel"}}},
            {"model",
             {{"type", "BPE"}, {"dropout", nullptr}, {"vocab", vocab},
              {"merges", json::array({json::array({"\xc4\xa0", "h"}), json::array({"\xc4\xa0h", "i"})})}}}};
  const Tokenizer t = Tokenizer::from_json(j.dump(), "gpt2.json");
  EXPECT_EQ(t.vocab_size(), 304);
  EXPECT_EQ(t.encode("hi"), (std::vector<int32_t>{302}));  // prefix space added
  EXPECT_EQ(t.encode("hi hix"), (std::vector<int32_t>{302, 302, 300 - 'x'}));
  EXPECT_EQ(t.encode("<|endoftext|>")[0], 300 - ' ');  // never the special
  EXPECT_EQ(t.special_id("<|endoftext|>"), 303);
  EXPECT_EQ(t.decode({303, 302}), "<|endoftext|> hi");
  const std::string err = [&] {
    try {
      t.special_id("<|user|>");
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  }();
  EXPECT_NE(err.find("<|endoftext|>"), std::string::npos) << err;
  // ignore_merges: a word that is a token is taken whole.
  j["model"]["ignore_merges"] = true;
  j["model"]["vocab"]["\xc4\xa0hix"] = 304;
  j["model"]["merges"].push_back(json::array({"\xc4\xa0hi", "x"}));
  EXPECT_EQ(Tokenizer::from_json(j.dump(), "gpt2.json").encode("hix"), (std::vector<int32_t>{304}));
}

TEST(Tokenizer, BadFilesNameTheFileAndKey) {
  const json good = json::parse(Tokenizer::from_merges({{"a", "b"}}).json());
  const auto mutated = [&](auto f) {
    json j = good;
    f(j);
    return j.dump();
  };
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{\"model\": ", "invalid JSON"},
      {"[1, 2]", "expected a JSON object"},
      {mutated([](json& j) { j["model"]["type"] = "WordPiece"; }), "model.type"},
      {mutated([](json& j) { j.erase("model"); }), "'model'"},
      {mutated([](json& j) { j["normalizer"] = {{"type", "NFC"}}; }), "normalizer"},
      {mutated([](json& j) { j["pre_tokenizer"] = {{"type", "Whitespace"}}; }), "pre_tokenizer"},
      {mutated([](json& j) { j["model"]["dropout"] = 0.1; }), "model.dropout"},
      {mutated([](json& j) { j["model"]["byte_fallback"] = true; }), "model.byte_fallback"},
      {mutated([](json& j) { j["model"]["vocab"].erase("\xc4\xa0"); }), "lacks the byte token"},
      {mutated([](json& j) { j["model"]["vocab"]["\xe6\x9d\xb1"] = 999; }), "not a byte-level token"},
      {mutated([](json& j) { j["model"]["vocab"]["zz"] = 5; }), "id 5 is given to both"},
      {mutated([](json& j) { j["model"]["vocab"]["q"] = "x"; }), "model.vocab"},
      {mutated([](json& j) { j["model"]["merges"].push_back("a"); }), "model.merges[1]"},
      {mutated([](json& j) { j["model"]["merges"].push_back("x y"); }), "merged token"},
      {mutated([](json& j) { j["model"]["merges"].push_back("ab zz"); }), "\"zz\" is not in model.vocab"},
      {mutated([](json& j) { j["model"]["merges"].push_back(7); }), "model.merges[1]"},
      {mutated([](json& j) { j["added_tokens"][0]["id"] = 256; }), "added_tokens[0]"},
      {mutated([](json& j) { j["added_tokens"][1]["content"] = ""; }), "added_tokens[1]"},
      // Found by fuzz_tokenizer: type fields that are not strings, ids near 2^31, 1e400.
      {mutated([](json& j) { j["model"]["type"] = 5; }), "model.type"},
      {mutated([](json& j) { j["pre_tokenizer"]["type"] = {"ByteLevel"}; }), "pre_tokenizer"},
      {mutated([](json& j) { j["model"]["vocab"]["xy"] = 2147483647; }), "far beyond the"},
      {mutated([](json& j) { j["added_tokens"][0]["id"] = 2147483000; }), "added_tokens"},
      {"{\"model\": {\"vocab\": {\"a\": 1e400}}}", "invalid JSON"},
  };
  for (const auto& [text, want] : cases) {
    const std::string e = error_of(text);
    EXPECT_NE(e.find("tok.json"), std::string::npos) << e;
    EXPECT_NE(e.find(want), std::string::npos) << "want '" << want << "' in: " << e;
  }
  EXPECT_EQ(error_of(good.dump()), "(no error)");
  try {
    Tokenizer::load("/nonexistent/tokenizer.json");
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/tokenizer.json"), std::string::npos) << e.what();
  }
}
