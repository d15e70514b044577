// Rollout helpers (train/rollout.hpp): plain-text and JSONL prompt sets, the context
// check, completion text, the unbiased pass@k estimator.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "moe/error.hpp"
#include "train/rollout.hpp"
#include "test_util.hpp"

using namespace moetune;
using namespace moetune::testing;
namespace fs = std::filesystem;

namespace {

}  // namespace

TEST(Rollout, PlainTextPromptsOnePerLine) {
  const std::string p = write_file("a.txt", "12+34=\r\n\n   \nwhat is 2+2?\n");
  const auto rows = read_prompt_text(p);
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0].messages.at(0).content, "12+34=");
  EXPECT_EQ(rows[0].messages.at(0).role, "user");
  EXPECT_EQ(rows[0].line, 1);
  EXPECT_EQ(rows[1].messages.at(0).content, "what is 2+2?");
  EXPECT_EQ(rows[1].line, 4);
  const Tokenizer tok = Tokenizer::byte_level();
  const PromptSet ps = load_prompts(p, tok, false, 4, 64);
  ASSERT_EQ(ps.ids.size(), 2u);
  EXPECT_EQ(ps.ids[0], render_prompt(rows[0].messages, tok));
  EXPECT_EQ(ps.longest, int(ps.ids[1].size()));
  fs::remove(p);
}

TEST(Rollout, PromptErrorsNameFileAndLine) {
  const Tokenizer tok = Tokenizer::byte_level();
  const std::string empty = write_file("e.txt", "\n\n");
  EXPECT_NE(error_of([&] { read_prompt_text(empty); }).find("e.txt: no prompts"), std::string::npos);
  const std::string bad = write_file("b.txt", "ok\nbad \xff byte\n");
  EXPECT_NE(error_of([&] { read_prompt_text(bad); }).find("b.txt:2: not valid UTF-8"), std::string::npos);
  EXPECT_NE(error_of([&] { load_prompts(bad, tok, true, 4, 64); }).find("has no answers"), std::string::npos);
  // A prompt that does not fit the context with max_new_tokens.
  const std::string longp = write_file("l.jsonl", "{\"prompt\": \"1+1=\", \"answer\": \"2\"}\n{\"prompt\": \"" +
                                                     std::string(50, 'x') + "\", \"answer\": \"1\"}\n");
  const std::string msg = error_of([&] { load_prompts(longp, tok, true, 8, 40); });
  EXPECT_NE(msg.find("l.jsonl:2:"), std::string::npos) << msg;
  EXPECT_NE(msg.find("rl.max_new_tokens"), std::string::npos) << msg;
  EXPECT_NO_THROW(load_prompts(longp, tok, true, 8, 80));
  for (const auto& f : {empty, bad, longp}) fs::remove(f);
}

TEST(Rollout, PassAtKIsTheUnbiasedEstimator) {
  EXPECT_DOUBLE_EQ(pass_at_k(4, 1, 1), 0.25);
  EXPECT_DOUBLE_EQ(pass_at_k(4, 0, 4), 0.0);
  EXPECT_DOUBLE_EQ(pass_at_k(4, 1, 4), 1.0);
  EXPECT_NEAR(pass_at_k(10, 3, 2), 1.0 - 21.0 / 45.0, 1e-15);  // 1 - C(7,2)/C(10,2)
  EXPECT_NEAR(pass_at_k(8, 2, 8), 1.0, 0);
  EXPECT_THROW(pass_at_k(4, 1, 5), Error);
}

TEST(Rollout, CompletionTextDropsTheStopTokenAndMarksUnknownIds) {
  const Tokenizer tok = Tokenizer::byte_level();
  const auto stops = stop_ids(tok);
  ASSERT_EQ(stops.size(), 2u);
  Completion c;
  c.tokens = {'4', '2', tok.special_id("<|end|>")};
  EXPECT_EQ(completion_text(c, tok, stops), "42");
  c.truncated = true;  // a truncated completion keeps its last token
  c.tokens = {'4', '2', '!'};
  EXPECT_EQ(completion_text(c, tok, stops), "42!");
  c.tokens = {'a', 300, 'b'};  // 300: an id the model has but the tokenizer does not
  EXPECT_EQ(completion_text(c, tok, stops), "a\xEF\xBF\xBD" "b");
}
