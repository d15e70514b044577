// SFT data (suites Sft*): the chat template and its loss mask checked token by token,
// prompt/completion, pre-tokenized samples, mixed formats, every reader error naming
// <path>:<line>, UTF-8 checking on raw bytes, vocabulary checks and the overlong policies.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>

#include "moe/batch.hpp"
#include "moe/error.hpp"
#include "train/sft_data.hpp"
#include "test_util.hpp"

using namespace moetune;
using namespace moetune::testing;
namespace fs = std::filesystem;

namespace {

constexpr int32_t PAD = 256, BOS = 257, EOS = 258, SYS = 259, USR = 260, AST = 261, END = 262;
constexpr int kVocab = 263;
constexpr int32_t X = kIgnoreIndex;

// An encoder that breaks its contract: encodes "!" as the <|end|> id.
struct LeakyEncoder : ByteEncoder {
  std::vector<int32_t> encode(const std::string& text) const override {
    auto ids = ByteEncoder::encode(text);
    for (auto& id : ids)
      if (id == '!') id = END;
    return ids;
  }
};

std::string read_error(const std::string& path, int vocab = kVocab, const TextEncoder& enc = ByteEncoder()) {
  try {
    read_sft_jsonl(path, enc, vocab);
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

// Error of a file whose line 2 is `bad` (line 1 is a valid sample): must name <path>:2.
std::string line2_error(const std::string& bad, int vocab = kVocab) {
  const auto p = write_file("bad.jsonl", "{\"prompt\": \"a\", \"completion\": \"b\"}\n" + bad + "\n");
  const std::string e = read_error(p, vocab);
  EXPECT_NE(e.find(p + ":2: "), std::string::npos) << "error does not name " << p << ":2: " << e;
  return e;
}

std::vector<int32_t> bytes(const std::string& s) { return ByteEncoder().encode(s); }
std::vector<int32_t> cat(std::initializer_list<std::vector<int32_t>> parts) {
  std::vector<int32_t> out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}
std::vector<int32_t> ignored(size_t n) { return std::vector<int32_t>(n, X); }

}  // namespace

// ---------------------------------------------------------------- template and mask

TEST(SftTemplate, ChatLabelsTokenByToken) {
  // Hand-built: user "hi", assistant "yo".
  const Document d = render_chat({{"user", "hi"}, {"assistant", "yo"}}, ByteEncoder());
  const std::vector<int32_t> ids = {BOS, USR, 'h', 'i', END, AST, 'y', 'o', END, EOS};
  const std::vector<int32_t> labels = {X, X, X, X, X, X, 'y', 'o', END, EOS};
  EXPECT_EQ(d.input_ids, ids);
  EXPECT_EQ(d.labels, labels);
  EXPECT_EQ(std::count(d.input_ids.begin(), d.input_ids.end(), PAD), 0) << "the template never uses <|pad|>";
}

TEST(SftTemplate, SystemUserAssistantMultiTurn) {
  const Document d = render_chat({{"system", "be brief"},
                                  {"user", "2+2?"},
                                  {"assistant", "4"},
                                  {"user", "and 3+3?"},
                                  {"assistant", "6."}},
                                 ByteEncoder());
  const auto ids = cat({{BOS, SYS}, bytes("be brief"), {END, USR}, bytes("2+2?"), {END, AST}, bytes("4"), {END, USR},
                        bytes("and 3+3?"), {END, AST}, bytes("6."), {END, EOS}});
  const auto labels = cat({ignored(2), ignored(8), ignored(2), ignored(4), ignored(2), bytes("4"), {END},
                           ignored(1), ignored(8), ignored(2), bytes("6."), {END, EOS}});
  ASSERT_EQ(d.input_ids, ids);
  ASSERT_EQ(d.labels, labels);
  // The rule, position by position: a label is either -100 or the token itself, and it is
  // the token exactly inside an assistant turn (content + closing <|end|>) or the final eos.
  bool in_assistant = false;
  for (size_t t = 0; t < ids.size(); ++t) {
    const int32_t id = ids[t];
    bool trained;
    if (id == AST) {
      in_assistant = true;
      trained = false;
    } else if (id == SYS || id == USR || id == BOS) {
      in_assistant = false;
      trained = false;
    } else if (id == END) {
      trained = in_assistant;
      in_assistant = false;
    } else if (id == EOS) {
      trained = true;  // last message is the assistant's
    } else {
      trained = in_assistant;
    }
    EXPECT_EQ(d.labels[t], trained ? id : X) << "position " << t;
  }
}

TEST(SftTemplate, EosNotTrainedWhenLastMessageIsNotAssistant) {
  const Document d = render_chat({{"user", "a"}, {"assistant", "b"}, {"user", "c"}}, ByteEncoder());
  const std::vector<int32_t> ids = {BOS, USR, 'a', END, AST, 'b', END, USR, 'c', END, EOS};
  const std::vector<int32_t> labels = {X, X, X, X, X, 'b', END, X, X, X, X};
  EXPECT_EQ(d.input_ids, ids);
  EXPECT_EQ(d.labels, labels);
}

TEST(SftTemplate, PromptCompletion) {
  const Document d = render_prompt_completion("Q:", "A!", ByteEncoder());
  const std::vector<int32_t> ids = {BOS, USR, 'Q', ':', END, AST, 'A', '!', END, EOS};
  const std::vector<int32_t> labels = {X, X, X, X, X, X, 'A', '!', END, EOS};
  EXPECT_EQ(d.input_ids, ids);
  EXPECT_EQ(d.labels, labels);
  // Same as the equivalent chat.
  const Document c = render_chat({{"user", "Q:"}, {"assistant", "A!"}}, ByteEncoder());
  EXPECT_EQ(c.input_ids, d.input_ids);
  EXPECT_EQ(c.labels, d.labels);
}

TEST(SftTemplate, SpecialTokenTextIsPlainText) {
  // A literal "<|end|>" in user text must not close the turn: it is 7 byte tokens.
  const Document d = render_chat({{"user", "<|end|>"}, {"assistant", "k"}}, ByteEncoder());
  const auto ids = cat({{BOS, USR}, bytes("<|end|>"), {END, AST, 'k', END, EOS}});
  EXPECT_EQ(d.input_ids, ids);
  EXPECT_EQ(std::count(d.input_ids.begin(), d.input_ids.end(), END), 2);
}

TEST(SftTemplate, RenderErrors) {
  auto err = [](const std::vector<ChatMessage>& m, const TextEncoder& enc) -> std::string {
    try {
      render_chat(m, enc);
    } catch (const Error& e) {
      return e.what();
    }
    return "(no error)";
  };
  EXPECT_NE(err({}, ByteEncoder()).find("empty"), std::string::npos);
  EXPECT_NE(err({{"user", "a"}}, ByteEncoder()).find("no assistant message"), std::string::npos);
  EXPECT_NE(err({{"user", "a"}, {"tool", "x"}, {"assistant", "b"}}, ByteEncoder()).find("unknown role 'tool'"),
            std::string::npos);
  EXPECT_NE(err({{"user", "a!"}, {"assistant", "b"}}, LeakyEncoder()).find("special token id 262"),
            std::string::npos);
  EXPECT_EQ(err({{"user", "a"}, {"assistant", "b"}}, ByteEncoder()), "(no error)");
}

// ---------------------------------------------------------------- reading

TEST(SftRead, AllThreeFormatsMixedWithLineNumbers) {
  const auto p = write_file("mixed.jsonl",
                            "{\"messages\": [{\"role\": \"system\", \"content\": \"s\"}, "
                            "{\"role\": \"user\", \"content\": \"u\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}\n"
                            "\n"
                            "   \n"
                            "{\"prompt\": \"p\", \"completion\": \"c\"}\n"
                            "{\"input_ids\": [1, 2, 262], \"labels\": [-100, 2, 262]}\n"
                            "{\"input_ids\": [5, 6]}\n");
  const auto s = read_sft_jsonl(p, ByteEncoder(), kVocab);
  ASSERT_EQ(s.size(), 4u);
  EXPECT_EQ(s[0].line, 1);
  EXPECT_EQ(s[1].line, 4);
  EXPECT_EQ(s[2].line, 5);
  EXPECT_EQ(s[3].line, 6);
  EXPECT_EQ(s[0].format, SftFormat::Chat);
  EXPECT_EQ(s[1].format, SftFormat::PromptCompletion);
  EXPECT_EQ(s[2].format, SftFormat::PreTokenized);
  EXPECT_EQ(s[3].format, SftFormat::PreTokenized);
  EXPECT_EQ(s[0].doc.input_ids, (std::vector<int32_t>{BOS, SYS, 's', END, USR, 'u', END, AST, 'a', END, EOS}));
  EXPECT_EQ(s[0].doc.labels, (std::vector<int32_t>{X, X, X, X, X, X, X, X, 'a', END, EOS}));
  EXPECT_EQ(s[1].doc.input_ids, (std::vector<int32_t>{BOS, USR, 'p', END, AST, 'c', END, EOS}));
  EXPECT_EQ(s[1].doc.labels, (std::vector<int32_t>{X, X, X, X, X, 'c', END, EOS}));
  EXPECT_EQ(s[2].doc.input_ids, (std::vector<int32_t>{1, 2, 262}));
  EXPECT_EQ(s[2].doc.labels, (std::vector<int32_t>{X, 2, 262}));
  EXPECT_EQ(s[3].doc.labels, (std::vector<int32_t>{5, 6})) << "labels default to input_ids";
  std::vector<SftSample> copy = s;
  const auto docs = sft_documents(std::move(copy));
  ASSERT_EQ(docs.size(), 4u);
  EXPECT_EQ(docs[1].labels, s[1].doc.labels);
}

TEST(SftRead, UnicodeContentIsEncodedAsUtf8Bytes) {
  // JSON escape \u00e9 and a raw 3-byte character both arrive as their UTF-8 bytes.
  const auto p = write_file("u.jsonl", "{\"prompt\": \"\\u00e9\", \"completion\": \"\xe2\x82\xac\"}\n");
  const auto s = read_sft_jsonl(p, ByteEncoder(), kVocab);
  ASSERT_EQ(s.size(), 1u);
  EXPECT_EQ(s[0].doc.input_ids, (std::vector<int32_t>{BOS, USR, 0xC3, 0xA9, END, AST, 0xE2, 0x82, 0xAC, END, EOS}));
}

TEST(SftRead, ErrorsNameFileAndLine) {
  struct Case {
    std::string line, expect;
  };
  const std::vector<Case> cases = {
      {"{\"prompt\": \"a\", ", "invalid JSON"},
      {"[1, 2]", "expected a JSON object"},
      {"\"text\"", "expected a JSON object"},
      {"{}", "empty object"},
      {"{\"text\": \"x\"}", "unknown key 'text'"},
      {"{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}], "
       "\"id\": 3}",
       "unknown key 'id'"},
      {"{\"messages\": [{\"role\": \"user\", \"content\": \"a\", \"name\": \"bob\"}]}", "unknown key 'name' in messages[0]"},
      {"{\"prompt\": \"a\", \"completion\": \"b\", \"source\": \"x\"}", "unknown key 'source'"},
      {"{\"input_ids\": [1], \"label\": [1]}", "unknown key 'label'"},
      {"{\"prompt\": \"a\", \"input_ids\": [1]}", "keys of two formats"},
      {"{\"messages\": [], \"completion\": \"b\"}", "keys of two formats"},
      {"{\"messages\": \"hi\"}", "'messages' must be an array"},
      {"{\"messages\": [\"hi\"]}", "messages[0] must be an object"},
      {"{\"messages\": [{\"role\": \"user\", \"content\": 5}]}", "'content' in messages[0] must be a string"},
      {"{\"messages\": [{\"role\": \"user\", \"content\": null}]}", "'content' in messages[0] must be a string"},
      {"{\"messages\": [{\"role\": 1, \"content\": \"a\"}]}", "'role' in messages[0] must be a string"},
      {"{\"messages\": [{\"content\": \"a\"}]}", "missing key 'role' in messages[0]"},
      {"{\"messages\": [{\"role\": \"user\"}]}", "missing key 'content' in messages[0]"},
      {"{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"bot\", \"content\": \"b\"}]}",
       "unknown role 'bot' in messages[1]"},
      {"{\"messages\": []}", "'messages' is empty"},
      {"{\"messages\": [{\"role\": \"system\", \"content\": \"s\"}, {\"role\": \"user\", \"content\": \"a\"}]}",
       "no assistant message"},
      {"{\"prompt\": \"a\"}", "missing key 'completion'"},
      {"{\"completion\": \"a\"}", "missing key 'prompt'"},
      {"{\"prompt\": [\"a\"], \"completion\": \"b\"}", "'prompt' must be a string"},
      {"{\"prompt\": \"a\", \"completion\": 7}", "'completion' must be a string"},
      {"{\"labels\": [1]}", "missing key 'input_ids'"},
      {"{\"input_ids\": []}", "'input_ids' is empty"},
      {"{\"input_ids\": \"1 2\"}", "'input_ids' must be an array"},
      {"{\"input_ids\": [1, 2.5]}", "input_ids[1] must be an integer"},
      {"{\"input_ids\": [1, 2], \"labels\": [1]}", "'labels' has 1 elements but 'input_ids' has 2"},
      {"{\"input_ids\": [1, 263]}", "token id 263 at input_ids[1] is outside the vocabulary [0, 263)"},
      {"{\"input_ids\": [1, -1]}", "token id -1 at input_ids[1] is outside the vocabulary"},
      {"{\"input_ids\": [1, 2], \"labels\": [-100, -5]}", "label -5 at labels[1] is outside the vocabulary"},
      {"{\"input_ids\": [1, 2], \"labels\": [-100, 263]}", "label 263 at labels[1]"},
  };
  for (const auto& c : cases) {
    const std::string e = line2_error(c.line);
    EXPECT_NE(e.find(c.expect), std::string::npos) << "line: " << c.line << "\nerror: " << e;
  }
}

TEST(SftRead, UnknownRoleNamesTheRole) {
  const std::string e =
      line2_error("{\"messages\": [{\"role\": \"tool\", \"content\": \"x\"}, {\"role\": \"assistant\", \"content\": \"y\"}]}");
  EXPECT_NE(e.find("'tool'"), std::string::npos) << e;
  EXPECT_NE(e.find("system, user, assistant"), std::string::npos) << e;
}

TEST(SftRead, NonUtf8LineRejected) {
  struct Case {
    std::string bytes, byte;
    int column;
  };
  const std::string head = "{\"prompt\": \"a";  // 13 bytes: the bad byte is column 14
  const std::string tail = "\", \"completion\": \"b\"}";
  const std::vector<Case> cases = {
      {"\xff", "0xFF", 14},                 // never valid
      {"\x80", "0x80", 14},                 // continuation without a lead
      {"\xc3(", "0xC3", 14},                // truncated 2-byte sequence
      {"\xc0\xaf", "0xC0", 14},             // overlong '/'
      {"\xe0\x80\xaf", "0xE0", 14},         // overlong 3-byte
      {"\xed\xa0\x80", "0xED", 14},         // UTF-16 surrogate U+D800
      {"\xf4\x90\x80\x80", "0xF4", 14},     // above U+10FFFF
      {"ok\xe2\x82", "0xE2", 16},           // truncated at the end of the string
  };
  for (const auto& c : cases) {
    const std::string e = line2_error(head + c.bytes + tail);
    EXPECT_NE(e.find("not valid UTF-8 (byte " + c.byte + " at column " + std::to_string(c.column) + ")"),
              std::string::npos)
        << e;
  }
  // Valid multi-byte characters pass: 2-, 3- and 4-byte forms at their limits.
  const auto p = write_file("ok.jsonl", head + "\xc2\x80\xdf\xbf\xe0\xa0\x80\xef\xbf\xbf\xf0\x90\x80\x80\xf4\x8f\xbf\xbf" +
                                            tail + "\n");
  EXPECT_EQ(read_error(p), "(no error)");
  // The check is on the raw bytes: an invalid byte outside any JSON string is reported as
  // UTF-8, not as a JSON error.
  EXPECT_NE(line2_error("\xfe{}").find("not valid UTF-8"), std::string::npos);
}

TEST(SftRead, EmptyFileAndMissingFile) {
  const auto p = write_file("empty.jsonl", "\n  \n\n");
  EXPECT_EQ(read_error(p), p + ": no samples");
  const auto q = write_file("zero.jsonl", "");
  EXPECT_EQ(read_error(q), q + ": no samples");
  EXPECT_NE(read_error(q + ".absent").find("cannot open"), std::string::npos);
}

TEST(SftRead, RenderedIdsWithinVocab) {
  // The specials of ByteEncoder reach 262: a model vocabulary of 262 cannot hold <|end|>
  // and 200 cannot hold the byte 0xE9 or any special.
  const auto p = write_file("v.jsonl", "{\"prompt\": \"a\", \"completion\": \"b\"}\n");
  EXPECT_EQ(read_error(p, 263), "(no error)");
  const std::string e = read_error(p, 262);
  EXPECT_NE(e.find(p + ":1: token id 262 at position 3"), std::string::npos) << e;
  const std::string f = read_error(p, 200);
  EXPECT_NE(f.find(p + ":1: token id 257 at position 0"), std::string::npos) << f;
  // Every id of every accepted sample is in range.
  const auto q = write_file("w.jsonl",
                            "{\"messages\": [{\"role\": \"user\", \"content\": \"\xc3\xa9\xff\"}, "
                            "{\"role\": \"assistant\", \"content\": \"z\"}]}\n");
  EXPECT_NE(read_error(q).find("not valid UTF-8"), std::string::npos);
  const auto r = write_file("x.jsonl",
                            "{\"messages\": [{\"role\": \"user\", \"content\": \"\xc3\xa9~\"}, "
                            "{\"role\": \"assistant\", \"content\": \"z\"}]}\n");
  for (const auto& s : read_sft_jsonl(r, ByteEncoder(), kVocab))
    for (int32_t id : s.doc.input_ids) {
      EXPECT_GE(id, 0);
      EXPECT_LT(id, kVocab);
    }
  EXPECT_NE(read_error(r, 0).find("vocab_size must be positive"), std::string::npos);
}

TEST(SftRead, EncoderLeakingSpecialIdIsReported) {
  const auto p = write_file("l.jsonl", "{\"prompt\": \"hi!\", \"completion\": \"b\"}\n");
  const std::string e = read_error(p, kVocab, LeakyEncoder());
  EXPECT_NE(e.find(p + ":1: the tokenizer encoded the text of 'prompt' to the special token id 262"),
            std::string::npos)
      << e;
}

// ---------------------------------------------------------------- overlong policies

namespace {
// Samples of lengths 4, 9, 6, 12 on lines 1, 3, 4, 7; labels trained from position 3.
std::vector<SftSample> overlong_samples() {
  std::vector<SftSample> out;
  const int lens[] = {4, 9, 6, 12}, lines[] = {1, 3, 4, 7};
  for (int k = 0; k < 4; ++k) {
    SftSample s;
    s.line = lines[k];
    for (int t = 0; t < lens[k]; ++t) {
      s.doc.input_ids.push_back(100 * k + t);
      s.doc.labels.push_back(t >= 3 ? 100 * k + t : X);
    }
    out.push_back(s);
  }
  return out;
}
}  // namespace

TEST(SftOverlong, Truncate) {
  auto s = overlong_samples();
  const auto st = apply_overlong(s, 6, "truncate", "f.jsonl");
  EXPECT_EQ(st.truncated, 2);
  EXPECT_EQ(st.skipped, 0);
  EXPECT_EQ(st.truncated_no_target, 0);
  ASSERT_EQ(s.size(), 4u);
  const size_t want[] = {4, 6, 6, 6};
  for (size_t k = 0; k < 4; ++k) {
    ASSERT_EQ(s[k].doc.input_ids.size(), want[k]);
    ASSERT_EQ(s[k].doc.labels.size(), want[k]);
    for (size_t t = 0; t < want[k]; ++t) {  // the first tokens, unchanged
      EXPECT_EQ(s[k].doc.input_ids[t], int32_t(100 * k + t));
      EXPECT_EQ(s[k].doc.labels[t], t >= 3 ? int32_t(100 * k + t) : X);
    }
  }
  // Cut before the first trained label: counted as truncated without a target.
  auto u = overlong_samples();
  const auto su = apply_overlong(u, 3, "truncate", "f.jsonl");
  EXPECT_EQ(su.truncated, 4);
  EXPECT_EQ(su.truncated_no_target, 4);
}

TEST(SftOverlong, Skip) {
  auto s = overlong_samples();
  const auto st = apply_overlong(s, 6, "skip", "f.jsonl");
  EXPECT_EQ(st.skipped, 2);
  EXPECT_EQ(st.truncated, 0);
  ASSERT_EQ(s.size(), 2u);
  EXPECT_EQ(s[0].line, 1);
  EXPECT_EQ(s[1].line, 4);
  EXPECT_EQ(s[1].doc.input_ids.size(), 6u);
  // Exactly seq_len is not overlong.
  auto t = overlong_samples();
  EXPECT_EQ(apply_overlong(t, 12, "skip", "f.jsonl").skipped, 0);
  EXPECT_EQ(t.size(), 4u);
  // Nothing left is an error naming the file.
  auto v = overlong_samples();
  try {
    apply_overlong(v, 3, "skip", "f.jsonl");
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("f.jsonl: all 4 samples"), std::string::npos) << e.what();
  }
}

TEST(SftOverlong, ErrorNamesFileAndLine) {
  auto s = overlong_samples();
  try {
    apply_overlong(s, 8, "error", "f.jsonl");
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("f.jsonl:3: sample has 9 tokens, longer than seq_len = 8"),
              std::string::npos)
        << e.what();
  }
  auto t = overlong_samples();
  const auto st = apply_overlong(t, 12, "error", "f.jsonl");
  EXPECT_EQ(st.truncated + st.skipped, 0);
  EXPECT_EQ(t.size(), 4u);
}

TEST(SftOverlong, BadArguments) {
  auto s = overlong_samples();
  EXPECT_THROW(apply_overlong(s, 8, "drop", "f.jsonl"), Error);
  EXPECT_THROW(apply_overlong(s, 0, "truncate", "f.jsonl"), Error);
  EXPECT_EQ(s.size(), 4u);
}

TEST(SftOverlong, FromFileKeepsLinesForErrors) {
  const auto p = write_file("o.jsonl",
                            "{\"prompt\": \"a\", \"completion\": \"b\"}\n"
                            "\n"
                            "{\"prompt\": \"a long prompt\", \"completion\": \"b\"}\n");
  auto s = read_sft_jsonl(p, ByteEncoder(), kVocab);
  ASSERT_EQ(s.size(), 2u);
  try {
    apply_overlong(s, 10, "error", p);
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(p + ":3: sample has 20 tokens"), std::string::npos) << e.what();
  }
}

TEST(SftRead, CrlfLinesAndByteOrderMark) {
  // Files written on Windows: CRLF line ends and a UTF-8 byte order mark before line 1.
  const auto p = write_file("crlf.jsonl",
                            "\xef\xbb\xbf{\"prompt\": \"a\", \"completion\": \"b\"}\r\n"
                            "\r\n"
                            "{\"prompt\": \"c\", \"completion\": \"d\"}\r\n");
  const auto s = read_sft_jsonl(p, ByteEncoder(), kVocab);
  ASSERT_EQ(s.size(), 2u);
  EXPECT_EQ(s[0].doc.input_ids, (std::vector<int32_t>{BOS, USR, 'a', END, AST, 'b', END, EOS}));
  EXPECT_EQ(s[1].line, 3);
  EXPECT_EQ(s[1].doc.input_ids, (std::vector<int32_t>{BOS, USR, 'c', END, AST, 'd', END, EOS}));
}
