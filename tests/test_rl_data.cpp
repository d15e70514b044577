// RL prompt files and the arithmetic task (suites RlPrompt*, Arith*): the prompt formats,
// every reader error naming <path>:<line>, render_prompt equal to render_chat's prefix,
// and the generator's determinism, held-out split, answers and carry balance.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>

#include "moe/error.hpp"
#include "tokenizer/tokenizer.hpp"
#include "train/arith_task.hpp"
#include "train/reward.hpp"
#include "train/rl_data.hpp"
#include "train/sft_data.hpp"
#include "test_util.hpp"

using namespace moetune;
using namespace moetune::testing;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr int32_t BOS = 257, USR = 260, AST = 261, END = 262;

// Error of a file whose line 3 is `bad` (line 1 valid, line 2 blank): must name <path>:3.
std::string line3_error(const std::string& bad, bool need_answer = false) {
  const auto p = write_file("bad.jsonl", "{\"prompt\": \"a\", \"answer\": \"1\"}\n\n" + bad + "\n");
  const std::string e = error_of([&] { read_prompt_jsonl(p, need_answer); });
  EXPECT_NE(e.find(p + ":3: "), std::string::npos) << "error does not name " << p << ":3: " << e;
  return e;
}

std::vector<json> read_jsonl(const fs::path& p) {
  std::vector<json> rows;
  std::ifstream in(p);
  std::string line;
  while (std::getline(in, line)) rows.push_back(json::parse(line));
  return rows;
}

}  // namespace

// ---- prompt files -------------------------------------------------------------------------

TEST(RlPrompt, ReadsEveryFormat) {
  const auto p = write_file("p.jsonl",
                            "{\"prompt\": \"12+34=\", \"answer\": \"46\", \"level\": 2}\n"
                            "\n"
                            "{\"question\": \"Natalia?\", \"answer\": \"48/2 = 24\\n#### 72\"}\n"
                            "{\"messages\": [{\"role\": \"system\", \"content\": \"be brief\"}, "
                            "{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}, "
                            "{\"role\": \"user\", \"content\": \"2+2?\"}], \"answer\": 4}\n"
                            "{\"prompt\": \"free text\"}\n");
  const auto rows = read_prompt_jsonl(p, false);
  ASSERT_EQ(rows.size(), 4u);
  EXPECT_EQ(rows[0].line, 1);
  ASSERT_EQ(rows[0].messages.size(), 1u);
  EXPECT_EQ(rows[0].messages[0].role, "user");
  EXPECT_EQ(rows[0].messages[0].content, "12+34=");
  EXPECT_EQ(rows[0].answer, "46");
  EXPECT_TRUE(rows[0].has_answer);
  EXPECT_EQ(rows[0].row.at("level"), 2);  // every column is kept
  EXPECT_EQ(rows[1].line, 3);
  EXPECT_EQ(rows[1].messages[0].content, "Natalia?");
  EXPECT_EQ(rows[1].answer, "72");
  EXPECT_EQ(rows[1].row.at("answer"), "48/2 = 24\n#### 72");  // raw in row
  ASSERT_EQ(rows[2].messages.size(), 4u);
  EXPECT_EQ(rows[2].messages[2].role, "assistant");
  EXPECT_EQ(rows[2].answer, "4");
  EXPECT_FALSE(rows[3].has_answer);
  EXPECT_EQ(rows[3].answer, "");
}

TEST(RlPrompt, ErrorsNamePathAndLine) {
  EXPECT_NE(line3_error("{\"prompt\": ").find("invalid JSON"), std::string::npos);
  EXPECT_NE(line3_error("[1, 2]").find("expected a JSON object"), std::string::npos);
  EXPECT_NE(line3_error("{\"answer\": \"1\"}").find("no prompt"), std::string::npos);
  EXPECT_NE(line3_error("{\"prompt\": \"a\", \"question\": \"b\"}").find("several prompts"), std::string::npos);
  EXPECT_NE(line3_error("{\"prompt\": \"a\", \"messages\": []}").find("several prompts"), std::string::npos);
  EXPECT_NE(line3_error("{\"prompt\": 5}").find("'prompt' must be a string, got number 5"), std::string::npos);
  EXPECT_NE(line3_error("{\"question\": null}").find("'question' must be a string"), std::string::npos);
  EXPECT_NE(line3_error("{\"messages\": \"hi\"}").find("'messages' must be an array"), std::string::npos);
  EXPECT_NE(line3_error("{\"messages\": []}").find("'messages' is empty"), std::string::npos);
  EXPECT_NE(line3_error("{\"messages\": [5]}").find("messages[0] must be an object"), std::string::npos);
  EXPECT_NE(line3_error("{\"messages\": [{\"role\": \"user\"}]}").find("missing key 'content' in messages[0]"),
            std::string::npos);
  EXPECT_NE(line3_error("{\"messages\": [{\"role\": \"user\", \"content\": 1}]}").find("'content' in messages[0]"),
            std::string::npos);
  EXPECT_NE(line3_error("{\"messages\": [{\"role\": \"user\", \"content\": \"a\", \"x\": 1}]}")
                .find("unknown key 'x' in messages[0]"),
            std::string::npos);
  EXPECT_NE(line3_error("{\"messages\": [{\"role\": \"tool\", \"content\": \"a\"}]}").find("unknown role 'tool'"),
            std::string::npos);
  EXPECT_NE(line3_error("{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, "
                        "{\"role\": \"assistant\", \"content\": \"a\"}]}")
                .find("last turn of 'messages' is the assistant's"),
            std::string::npos);
  EXPECT_NE(line3_error("{\"prompt\": \"a\", \"answer\": [1]}").find("'answer' must be a string or a number"),
            std::string::npos);
  EXPECT_NE(line3_error("{\"prompt\": \"a\", \"answer\": \"  \"}").find("'answer' is empty"), std::string::npos);
  EXPECT_NE(line3_error("{\"prompt\": \"a\"}", true).find("missing key 'answer'"), std::string::npos);
  EXPECT_NE(line3_error("{\"prompt\": \"a\", \"answer\": null}", true).find("'answer' is null"), std::string::npos);
  EXPECT_NE(line3_error("{\"prompt\": \"a\xc3(\"}").find("not valid UTF-8 (byte 0xC3 at column 14)"),
            std::string::npos);
}

TEST(RlPrompt, ByteOrderMarkAndCrlf) {
  const auto p = write_file("bom.jsonl", "\xEF\xBB\xBF{\"prompt\": \"a\", \"answer\": 1}\r\n\r\n{\"prompt\": \"b\"}\r\n");
  const auto rows = read_prompt_jsonl(p, false);
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0].messages[0].content, "a");
  EXPECT_EQ(rows[0].answer, "1");
  EXPECT_EQ(rows[1].line, 3);
}

TEST(RlPrompt, EmptyOrMissingFile) {
  const auto p = write_file("empty.jsonl", "\n  \n");
  EXPECT_EQ(error_of([&] { read_prompt_jsonl(p, false); }), p + ": no prompts");
  const std::string missing = (test_dir() / "nope.jsonl").string();
  EXPECT_EQ(error_of([&] { read_prompt_jsonl(missing, false); }), missing + ": cannot open file");
}

TEST(RlPrompt, RenderPromptIsRenderChatsPrefix) {
  const ByteEncoder byte_enc;
  const Tokenizer tok = Tokenizer::byte_level();
  const std::vector<std::vector<ChatMessage>> prompts = {
      {{"user", "12+34="}},
      {{"system", "be brief"}, {"user", "hi <|end|>"}, {"assistant", "yo"}, {"user", "2+2?"}},
      {{"system", ""}, {"user", ""}},
  };
  for (const TextEncoder* enc : {static_cast<const TextEncoder*>(&byte_enc), static_cast<const TextEncoder*>(&tok)}) {
    for (const auto& msgs : prompts) {
      const std::vector<int32_t> ids = render_prompt(msgs, *enc);
      auto with_answer = msgs;
      with_answer.push_back({"assistant", "46"});
      const Document d = render_chat(with_answer, *enc);
      ASSERT_LT(ids.size(), d.input_ids.size());
      EXPECT_EQ(ids, std::vector<int32_t>(d.input_ids.begin(), d.input_ids.begin() + long(ids.size())));
      EXPECT_EQ(ids.back(), enc->special_id("<|assistant|>"));
      // What follows is the answer: the template adds nothing between <|assistant|> and it.
      EXPECT_EQ(d.input_ids[ids.size()], int32_t('4'));
    }
  }
  EXPECT_EQ(render_prompt({{"user", "ab"}}, byte_enc), (std::vector<int32_t>{BOS, USR, 'a', 'b', END, AST}));
}

TEST(RlPrompt, RenderPromptRejectsBadTurns) {
  const ByteEncoder enc;
  EXPECT_NE(error_of([&] { render_prompt({}, enc); }).find("empty"), std::string::npos);
  EXPECT_NE(error_of([&] { render_prompt({{"bot", "x"}}, enc); }).find("unknown role 'bot'"), std::string::npos);
  EXPECT_NE(error_of([&] { render_prompt({{"user", "q"}, {"assistant", "a"}}, enc); }).find("assistant"),
            std::string::npos);
}

// ---- arithmetic task ----------------------------------------------------------------------

TEST(ArithTask, CarryDefinition) {
  EXPECT_TRUE(arith_has_carry(19, 1, '+'));
  EXPECT_TRUE(arith_has_carry(5, 5, '+'));
  EXPECT_FALSE(arith_has_carry(12, 34, '+'));
  EXPECT_FALSE(arith_has_carry(0, 0, '+'));
  EXPECT_TRUE(arith_has_carry(30, 12, '-'));
  EXPECT_TRUE(arith_has_carry(100, 1, '-'));
  EXPECT_FALSE(arith_has_carry(34, 12, '-'));
  EXPECT_FALSE(arith_has_carry(7, 7, '-'));
  EXPECT_FALSE(arith_has_carry(12, 3, '*'));  // 36
  EXPECT_FALSE(arith_has_carry(11, 11, '*')); // 121: columns 1, 2, 1
  EXPECT_TRUE(arith_has_carry(15, 2, '*'));   // 5*2 = 10
  EXPECT_TRUE(arith_has_carry(25, 22, '*'));  // middle column 4+10
  EXPECT_TRUE(arith_has_carry(55, 11, '*'));  // middle column 5+5
  EXPECT_NE(error_of([] { arith_has_carry(1, 2, '-'); }).find("a >= b"), std::string::npos);
  EXPECT_NE(error_of([] { arith_has_carry(1, 2, '/'); }).find("unknown op"), std::string::npos);
}

TEST(ArithTask, DeterministicBytesAndGolden) {
  ArithTaskConfig cfg;
  cfg.train_sft = 300;
  cfg.train_prompts = 100;
  cfg.test_prompts = 50;
  cfg.ops = "+-*";
  const fs::path a = test_dir() / "a", b = test_dir() / "b", c = test_dir() / "c";
  const ArithTaskStats s = write_arith_task(cfg, a.string());
  write_arith_task(cfg, b.string());
  cfg.seed = 2;
  write_arith_task(cfg, c.string());
  for (const char* f : {"sft.jsonl", "train_prompts.jsonl", "test_prompts.jsonl"}) {
    EXPECT_EQ(read_text(a / f), read_text(b / f)) << f;
    EXPECT_NE(read_text(a / f), read_text(c / f)) << f;
    EXPECT_FALSE(fs::exists(a / (std::string(f) + ".tmp"))) << f;
  }
  EXPECT_EQ(s.sft, 300);
  EXPECT_EQ(s.train_prompts, 100);
  EXPECT_EQ(s.test_prompts, 50);
  EXPECT_NE(s.describe().find("300 SFT samples"), std::string::npos) << s.describe();
  // The same seed gives these exact lines on every platform (splitmix64, no <random>).
  const std::string test = read_text(a / "test_prompts.jsonl");
  const std::string sft = read_text(a / "sft.jsonl");
  EXPECT_EQ(test.substr(0, test.find('\n')), "{\"prompt\":\"73-67=\",\"answer\":\"6\"}");
  EXPECT_EQ(sft.substr(0, sft.find('\n')), "{\"messages\":[{\"role\":\"user\",\"content\":\"45-9=\"},{\"role\":\"assistant\",\"content\":\"36\"}]}");
}

TEST(ArithTask, TestSetDependsOnlyOnItsOwnOptions) {
  ArithTaskConfig cfg;
  cfg.train_sft = 100;
  cfg.train_prompts = 50;
  cfg.test_prompts = 40;
  const ArithTask t1 = make_arith_task(cfg);
  cfg.train_sft = 500;
  cfg.train_prompts = 10;
  const ArithTask t2 = make_arith_task(cfg);
  ASSERT_EQ(t1.test_prompts.size(), t2.test_prompts.size());
  for (size_t i = 0; i < t1.test_prompts.size(); ++i) EXPECT_EQ(t1.test_prompts[i].text(), t2.test_prompts[i].text());
}

TEST(ArithTask, HeldOutAnswersCorrectAndBalanced) {
  ArithTaskConfig cfg;
  cfg.train_sft = 3000;
  cfg.train_prompts = 1000;
  cfg.test_prompts = 500;
  cfg.ops = "+-*";
  const fs::path dir = test_dir() / "task";
  const ArithTaskStats st = write_arith_task(cfg, dir.string());

  // Re-evaluate every problem from the file text.
  auto check = [&](const std::string& text, const std::string& answer, bool& carry) {
    ASSERT_FALSE(text.empty());
    ASSERT_EQ(text.back(), '=');
    const size_t op = text.find_first_of("+-*", 1);
    ASSERT_NE(op, std::string::npos) << text;
    const std::string sa = text.substr(0, op), sb = text.substr(op + 1, text.size() - op - 2);
    ASSERT_LE(sa.size(), 2u);
    ASSERT_LE(sb.size(), 2u);
    const int64_t a = std::stoll(sa), b = std::stoll(sb);
    EXPECT_EQ(std::to_string(a), sa);  // no leading zeros
    const char o = text[op];
    const int64_t r = o == '+' ? a + b : o == '-' ? a - b : a * b;
    EXPECT_GE(r, 0) << text;
    EXPECT_EQ(answer, std::to_string(r)) << text;
    carry = arith_has_carry(a, b, o);
  };
  std::set<std::string> test_texts, train_texts;
  int64_t carries = 0;
  for (const json& j : read_jsonl(dir / "test_prompts.jsonl")) {
    bool c = false;
    check(j.at("prompt"), j.at("answer"), c);
    carries += c;
    EXPECT_TRUE(test_texts.insert(j.at("prompt").get<std::string>()).second) << "duplicate test prompt";
  }
  EXPECT_EQ(test_texts.size(), 500u);
  EXPECT_EQ(carries, 250);
  EXPECT_EQ(st.test_prompts_carry, 250);
  carries = 0;
  for (const json& j : read_jsonl(dir / "train_prompts.jsonl")) {
    bool c = false;
    check(j.at("prompt"), j.at("answer"), c);
    carries += c;
    EXPECT_EQ(test_texts.count(j.at("prompt").get<std::string>()), 0u) << "test prompt in train_prompts";
    EXPECT_TRUE(train_texts.insert(j.at("prompt").get<std::string>()).second) << "duplicate train prompt";
  }
  EXPECT_EQ(carries, 500);
  carries = 0;
  int64_t n = 0;
  for (const json& j : read_jsonl(dir / "sft.jsonl")) {
    const json& m = j.at("messages");
    ASSERT_EQ(m.size(), 2u);
    EXPECT_EQ(m[0].at("role"), "user");
    EXPECT_EQ(m[1].at("role"), "assistant");
    bool c = false;
    check(m[0].at("content"), m[1].at("content"), c);
    carries += c;
    ++n;
    EXPECT_EQ(test_texts.count(m[0].at("content").get<std::string>()), 0u) << "test prompt in sft";
  }
  EXPECT_EQ(n, 3000);
  EXPECT_EQ(carries, 1500);

  // The files are what the readers expect, and the math reward accepts the answers.
  const auto rows = read_prompt_jsonl((dir / "test_prompts.jsonl").string(), true);
  ASSERT_EQ(rows.size(), 500u);
  RewardInput in;
  in.completion = rows[7].answer;
  in.row = rows[7].row;
  EXPECT_EQ(reward_math(in), 1.0);
  const Tokenizer tok = Tokenizer::byte_level();
  EXPECT_EQ(read_sft_jsonl((dir / "sft.jsonl").string(), tok, tok.vocab_size()).size(), 3000u);
}

TEST(ArithTask, UnbalancedAndSingleOp) {
  ArithTaskConfig cfg;
  cfg.balance_carries = false;
  cfg.ops = std::string(1, '*');  // (a literal here trips a GCC 12 -Wstringop-overflow false positive)
  cfg.digits = 3;
  cfg.train_sft = 10;
  cfg.train_prompts = 10;
  cfg.test_prompts = 10;
  const ArithTask t = make_arith_task(cfg);
  for (const auto& p : t.sft) EXPECT_EQ(p.op, '*');
  EXPECT_EQ(t.test_prompts.size(), 10u);
}

TEST(ArithTask, ConfigErrorsNameTheOption) {
  auto err = [](ArithTaskConfig c) { return error_of([&] { make_arith_task(c); }); };
  ArithTaskConfig c;
  c.digits = 0;
  EXPECT_NE(err(c).find("digits must be in [1, 9]"), std::string::npos);
  c.digits = 10;
  EXPECT_NE(err(c).find("digits must be in [1, 9], got 10"), std::string::npos);
  c = {};
  c.ops = "";
  EXPECT_NE(err(c).find("ops is empty"), std::string::npos);
  c.ops = "+/";
  EXPECT_NE(err(c).find("unknown operator '/'"), std::string::npos);
  c.ops = "++";
  EXPECT_NE(err(c).find("lists '+' twice"), std::string::npos);
  c = {};
  c.test_prompts = -1;
  EXPECT_NE(err(c).find("test_prompts must be >= 0"), std::string::npos);
  // One digit of '+' has 100 problems: 500 distinct test prompts cannot exist.
  c = {};
  c.digits = 1;
  c.ops = "+";
  const std::string e = err(c);
  EXPECT_NE(e.find("could not draw test_prompts problem"), std::string::npos) << e;
  // One digit of '-' never borrows.
  c.ops = "-";
  c.test_prompts = 2;
  EXPECT_NE(err(c).find("(with a carry)"), std::string::npos) << err(c);
}

TEST(ArithTask, CarryErrorAnswersAndNoisyDemonstrations) {
  EXPECT_EQ(arith_carry_error_answer({27, 35, '+'}), "52");  // 7+5 -> 2, 2+3 -> 5
  EXPECT_EQ(arith_carry_error_answer({95, 7, '+'}), "92");   // 5+7 -> 2, 9+0 -> 9
  EXPECT_EQ(arith_carry_error_answer({5, 5, '+'}), "0");
  EXPECT_EQ(arith_carry_error_answer({40, 17, '-'}), "33");  // 0-7 -> 3, 4-1 -> 3
  EXPECT_EQ(arith_carry_error_answer({12, 34, '+'}), "46");  // no carry: the right answer
  EXPECT_EQ(arith_carry_error_answer({12, 34, '*'}), "408");
  ArithTaskConfig cfg;
  cfg.train_sft = 400;
  cfg.train_prompts = 20;
  cfg.test_prompts = 20;
  const fs::path clean = test_dir() / "clean", all = test_dir() / "all", zero = test_dir() / "zero";
  write_arith_task(cfg, clean.string());
  cfg.sft_carry_error = 0.0;
  write_arith_task(cfg, zero.string());
  EXPECT_EQ(read_text(clean / "sft.jsonl"), read_text(zero / "sft.jsonl"));
  cfg.sft_carry_error = 1.0;
  write_arith_task(cfg, all.string());
  // Every carry sample is wrong, every other one right; prompts and pre-training text are unchanged.
  const ArithTask t = make_arith_task(cfg);
  std::istringstream in(read_text(all / "sft.jsonl"));
  std::string line;
  size_t i = 0;
  int wrong = 0;
  while (std::getline(in, line)) {
    const ArithProblem& p = t.sft.at(i++);
    const auto j = nlohmann::json::parse(line);
    const std::string ans = j["messages"][1]["content"];
    const bool carry = arith_has_carry(p.a, p.b, p.op);
    EXPECT_EQ(ans, carry ? arith_carry_error_answer(p) : p.answer()) << line;
    wrong += ans != p.answer();
  }
  EXPECT_EQ(i, t.sft.size());
  EXPECT_GT(wrong, 100);
  for (const char* f : {"train_prompts.jsonl", "test_prompts.jsonl", "pretrain.jsonl"})
    EXPECT_EQ(read_text(clean / f), read_text(all / f)) << f;
  // The pre-training text: every SFT problem once, right answer, one equation a document.
  std::istringstream pre(read_text(all / "pretrain.jsonl"));
  size_t docs = 0;
  while (std::getline(pre, line)) {
    ASSERT_LT(docs, t.sft.size()) << line;
    const ArithProblem& p = t.sft[docs++];
    EXPECT_EQ(nlohmann::json::parse(line).at("text").get<std::string>(), p.text() + p.answer() + "\n") << line;
  }
  EXPECT_EQ(docs, t.sft.size());
  cfg.sft_carry_error = 1.5;
  EXPECT_THROW(write_arith_task(cfg, (test_dir() / "bad").string()), Error);
}
