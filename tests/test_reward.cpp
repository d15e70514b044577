// RL rewards (suites Reward*): answer extraction and normalisation, exact rationals,
// GSM8K reference answers, the built-in rewards, the external reward program (happy
// path and every failure mode, each an Error naming the command in bounded time, no
// zombies) and the weighted combination with its config errors.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <thread>

#include "moe/error.hpp"
#include "train/reward.hpp"
#include "test_util.hpp"

using namespace moetune;
using namespace moetune::testing;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

RewardInput input(const std::string& completion, const json& row = json::object(), bool truncated = false) {
  RewardInput in;
  in.prompt = row.contains("prompt") ? row["prompt"].get<std::string>() : "q";
  in.completion = completion;
  in.truncated = truncated;
  in.row = row;
  return in;
}

// Zombie children of this process (state Z in /proc/<pid>/stat with our pid as parent).
int zombie_children() {
  int n = 0;
  for (const auto& e : fs::directory_iterator("/proc")) {
    std::ifstream f(e.path() / "stat");
    std::string stat;
    if (!std::getline(f, stat)) continue;
    const size_t close = stat.rfind(')');
    if (close == std::string::npos) continue;
    char state = 0;
    long ppid = 0;
    if (std::sscanf(stat.c_str() + close + 1, " %c %ld", &state, &ppid) == 2 && ppid == long(::getpid()) &&
        state == 'Z')
      ++n;
  }
  return n;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Runs `command` on `inputs` and returns its error, checking it names the command and
// came back within `max_s` seconds.
std::string command_error(const std::string& command, const std::vector<RewardInput>& inputs, double timeout_s = 5,
                          double max_s = 4) {
  const auto t0 = std::chrono::steady_clock::now();
  std::string e;
  {
    RewardCommand rc(command, timeout_s);
    e = error_of([&] { rc.score(inputs); });
    // A failed command stays failed.
    EXPECT_NE(error_of([&] { rc.score(inputs); }).find("not running"), std::string::npos);
  }
  EXPECT_LT(seconds_since(t0), max_s) << command;
  EXPECT_NE(e.find("reward command '" + command + "'"), std::string::npos) << e;
  EXPECT_EQ(zombie_children(), 0);
  return e;
}

}  // namespace

// ---- extraction ---------------------------------------------------------------------------

TEST(RewardExtract, Gsm8kMarkerWinsAndTheLastOneCounts) {
  EXPECT_EQ(extract_math_answer("5+3 = 8 so\n#### 8").value(), "8");
  EXPECT_EQ(extract_math_answer("#### 7\nwait, recheck\n#### 9\nbye 100").value(), "9");
  EXPECT_EQ(extract_math_answer("it costs 3 dollars #### $1,234.").value(), "1234");
  EXPECT_EQ(extract_math_answer("####-5").value(), "-5");
  EXPECT_EQ(extract_math_answer("#### +12").value(), "12");
  // The marker beats a box and later numbers on other lines.
  EXPECT_EQ(extract_math_answer("\\boxed{3}\n#### 4\n5").value(), "4");
  // An empty marker does not apply: the next rules do.
  EXPECT_EQ(extract_math_answer("the answer is 6\n####   \n").value(), "6");
}

TEST(RewardExtract, BoxedKeepsNestedBracesAndTheLastBoxCounts) {
  EXPECT_EQ(extract_math_answer("so \\boxed{\\frac{1}{2}}.").value(), "\\frac{1}{2}");
  EXPECT_EQ(extract_math_answer("\\boxed{{a}+{b_{1}}} and 7").value(), "{a}+{b_{1}}");
  EXPECT_EQ(extract_math_answer("\\boxed{1} no, \\boxed{ 2,000 }").value(), "2000");
  // An unclosed last box is skipped: the previous one counts.
  EXPECT_EQ(extract_math_answer("\\boxed{5} then \\boxed{6").value(), "5");
  // Unbalanced only: the last number.
  EXPECT_EQ(extract_math_answer("\\boxed{6 and 7").value(), "7");
  // A boxed answer is compared as a string when it is not a number.
  EXPECT_TRUE(math_equal(extract_math_answer("\\boxed{\\frac{1}{2}}").value(), "\\frac{1}{2}"));
  EXPECT_FALSE(math_equal(extract_math_answer("\\boxed{\\frac{1}{2}}").value(), "0.5"));
}

TEST(RewardExtract, LastNumberWithSignsCommasDecimalsAndFractions) {
  EXPECT_EQ(extract_math_answer("first 3, then 12.").value(), "12");
  EXPECT_EQ(extract_math_answer("The answer is -7.").value(), "-7");
  EXPECT_EQ(extract_math_answer("5-3").value(), "3");  // a minus after a digit is an operator
  EXPECT_EQ(extract_math_answer("x-3").value(), "3");
  EXPECT_EQ(extract_math_answer("(2)-3").value(), "3");
  EXPECT_EQ(extract_math_answer("we get (-3)").value(), "-3");
  EXPECT_EQ(extract_math_answer("pi is about 3.14159!").value(), "3.14159");
  EXPECT_EQ(extract_math_answer("total: 1,234,567 apples").value(), "1234567");
  EXPECT_EQ(extract_math_answer("list 1,23").value(), "23");  // not a thousands group
  EXPECT_EQ(extract_math_answer("ratio 3/4 here").value(), "3/4");
  EXPECT_EQ(extract_math_answer("46").value(), "46");
  EXPECT_FALSE(extract_math_answer("no number here").has_value());
  EXPECT_FALSE(extract_math_answer("").has_value());
  EXPECT_FALSE(extract_math_answer("#### \n\\boxed{ }").has_value());
}

TEST(RewardExtract, Normalisation) {
  EXPECT_EQ(normalize_answer(" 1 234 "), "1234");
  EXPECT_EQ(normalize_answer("1,234"), "1234");
  EXPECT_EQ(normalize_answer("(1,2)"), "(1,2)");
  EXPECT_EQ(normalize_answer("1,2345"), "1,2345");
  EXPECT_EQ(normalize_answer("42."), "42");
  EXPECT_EQ(normalize_answer("+42"), "42");
  EXPECT_EQ(normalize_answer("$42$"), "42");
  EXPECT_EQ(normalize_answer("\\$5.50."), "5.50");
  EXPECT_EQ(normalize_answer(""), "");
}

// ---- numbers ------------------------------------------------------------------------------

TEST(RewardNumber, ParsesExactRationals) {
  const Rational half{1, 2}, seven_halves{7, 2};
  EXPECT_EQ(parse_number("3.50").value(), seven_halves);
  EXPECT_EQ(parse_number("3.5").value(), seven_halves);
  EXPECT_EQ(parse_number("7/2").value(), seven_halves);
  EXPECT_EQ(parse_number("14/4").value(), seven_halves);
  EXPECT_EQ(parse_number("-0.5").value(), (Rational{-1, 2}));
  EXPECT_EQ(parse_number("-1/2").value(), (Rational{-1, 2}));
  EXPECT_EQ(parse_number(".5").value(), half);
  EXPECT_EQ(parse_number("5.").value(), (Rational{5, 1}));
  EXPECT_EQ(parse_number("+12").value(), (Rational{12, 1}));
  EXPECT_EQ(parse_number("-0").value(), (Rational{0, 1}));
  EXPECT_EQ(parse_number("1e3").value(), (Rational{1000, 1}));
  EXPECT_EQ(parse_number("2.5E-1").value(), (Rational{1, 4}));
  EXPECT_EQ(parse_number("0e999999").value(), (Rational{0, 1}));
  EXPECT_EQ(parse_number("0007").value(), (Rational{7, 1}));
  // Trailing zeros beyond int64 are fine: the value is small.
  EXPECT_EQ(parse_number("0.5000000000000000000000000000000000000000000000").value(), half);
  EXPECT_EQ(parse_number("9223372036854775807").value(), (Rational{INT64_MAX, 1}));
}

TEST(RewardNumber, RejectsNonNumbersAndOverflowInsteadOfRounding) {
  for (const char* s : {"", "-", ".", "abc", "1/0", "1,000", "1 2", "1/2/3", "1.2.3", "--1", "1e", "1e+", "3/-4",
                        "0x10", "inf", "nan", "1/", "/2", "12a"})
    EXPECT_FALSE(parse_number(s).has_value()) << s;
  EXPECT_FALSE(parse_number("9223372036854775808").has_value());
  EXPECT_FALSE(parse_number("99999999999999999999999999999999999999999999").has_value());
  EXPECT_FALSE(parse_number("1e30").has_value());
  EXPECT_FALSE(parse_number("1e-30").has_value());
  EXPECT_FALSE(parse_number("1e99999999999").has_value());
}

TEST(RewardNumber, MathEqualComparesRationalsElseStrings) {
  EXPECT_TRUE(math_equal("3.50", "7/2"));
  EXPECT_TRUE(math_equal("$1,234", "1234"));
  EXPECT_TRUE(math_equal("42", "42.0"));
  EXPECT_TRUE(math_equal("-0", "0"));
  EXPECT_FALSE(math_equal("42", "43"));
  EXPECT_FALSE(math_equal("0.333", "1/3"));
  EXPECT_TRUE(math_equal(" x + 1 ", "x+1"));
  EXPECT_FALSE(math_equal("x", "y"));
}

TEST(RewardNumber, Gsm8kReferenceAnswers) {
  EXPECT_EQ(gsm8k_answer("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"), "72");
  EXPECT_EQ(gsm8k_answer("so\n#### 1,000\n"), "1000");
  EXPECT_EQ(gsm8k_answer("  42 \n"), "42");
  EXPECT_EQ(gsm8k_answer("\\frac{1}{2}"), "\\frac{1}{2}");
  EXPECT_EQ(reference_answer(json{{"answer", "x\n#### 5"}}).value(), "5");
  EXPECT_EQ(reference_answer(json{{"answer", 46}}).value(), "46");
  EXPECT_EQ(reference_answer(json{{"answer", 3.5}}).value(), "3.5");
  EXPECT_FALSE(reference_answer(json{{"prompt", "p"}}).has_value());
  EXPECT_FALSE(reference_answer(json{{"answer", nullptr}}).has_value());
  EXPECT_NE(error_of([] { reference_answer(json{{"answer", true}}); }).find("'answer'"), std::string::npos);
}

// ---- built-in rewards ---------------------------------------------------------------------

TEST(RewardBuiltin, MathExactFormat) {
  const json row = {{"prompt", "12+34="}, {"answer", "46"}};
  EXPECT_EQ(reward_math(input("46", row)), 1.0);
  EXPECT_EQ(reward_math(input("I think it is 46.", row)), 1.0);
  EXPECT_EQ(reward_math(input("#### 46.0", row)), 1.0);
  EXPECT_EQ(reward_math(input("47", row)), 0.0);
  EXPECT_EQ(reward_math(input("no idea", row)), 0.0);
  EXPECT_EQ(reward_math(input("x\n#### 72", {{"answer", "steps\n#### 72"}})), 1.0);  // GSM8K reference
  EXPECT_EQ(reward_math(input("3.5", {{"answer", 3.5}})), 1.0);

  EXPECT_EQ(reward_exact(input(" 46\n", row)), 1.0);
  EXPECT_EQ(reward_exact(input("46.", row)), 0.0);
  EXPECT_EQ(reward_exact(input("the answer is 46", row)), 0.0);

  EXPECT_EQ(reward_format(input("46", row)), 1.0);
  EXPECT_EQ(reward_format(input("46", row, /*truncated=*/true)), 0.0);
  EXPECT_EQ(reward_format(input("no answer", row)), 0.0);
  EXPECT_EQ(reward_format(input("12", json::object())), 1.0);  // needs no answer

  const std::string e = error_of([] { reward_math(input("46", {{"prompt", "12+34="}})); });
  EXPECT_NE(e.find("reward 'math' needs an 'answer'"), std::string::npos) << e;
  EXPECT_NE(error_of([] { reward_exact(input("46", json::object())); }).find("'exact'"), std::string::npos);
  EXPECT_TRUE(reward_needs_answer("math"));
  EXPECT_TRUE(reward_needs_answer("exact"));
  EXPECT_FALSE(reward_needs_answer("format"));
  EXPECT_FALSE(reward_needs_answer("command"));
}

// ---- reward command -----------------------------------------------------------------------

TEST(RewardCommand, ScoresEveryLineAndStaysRunningAcrossCalls) {
  // Numbers its answers 1.5, 2.5, ...: the second call continues the count (one process).
  RewardCommand rc("n=0; while IFS= read -r l; do n=$((n+1)); echo \"$n.5\"; done");
  std::vector<RewardInput> in = {input("a"), input("b"), input("c")};
  EXPECT_EQ(rc.score(in), (std::vector<double>{1.5, 2.5, 3.5}));
  EXPECT_EQ(rc.score({input("d")}), (std::vector<double>{4.5}));
  EXPECT_TRUE(rc.score({}).empty());
}

TEST(RewardCommand, SeesTheProtocolFields) {
  // 1 when the line carries the reference answer, the truncation flag and an extra column.
  RewardCommand rc(
      "while IFS= read -r l; do case \"$l\" in *'\"answer\":\"46\"'*'\"level\":3'*'\"truncated\":true'*) "
      "echo 1;; *) echo 0;; esac; done");
  const json row = {{"prompt", "12+34="}, {"answer", "x\n#### 46"}, {"level", 3}};
  auto s = rc.score({input("46", row, true), input("46", row, false), input("46", json::object(), true)});
  EXPECT_EQ(s, (std::vector<double>{1, 0, 0}));
  // Invalid UTF-8 in a completion is sent as U+FFFD, not an exception.
  EXPECT_EQ(rc.score({input("\xff", row, true)}).size(), 1u);
}

TEST(RewardCommand, LargeInputsWhileTheProgramAnswersEarly) {
  // Answers before reading each line's end would deadlock a write-then-read design:
  // 8 lines of 200 kB are far above a pipe buffer.
  RewardCommand rc("while IFS= read -r l; do echo 0.25; done", 10);
  std::vector<RewardInput> in(8, input(std::string(200000, 'x')));
  EXPECT_EQ(rc.score(in), std::vector<double>(8, 0.25));
}

TEST(RewardCommand, ExampleScript) {
  if (::access("/usr/bin/python3", X_OK) != 0) GTEST_SKIP() << "no /usr/bin/python3";
  const std::string script = std::string(MOETUNE_SOURCE_DIR) + "/examples/reward_length.py";
  RewardCommand rc("/usr/bin/python3 " + script, 30);
  const json row = {{"prompt", "12+34="}, {"answer", "46"}};
  auto s = rc.score({input("46", row), input("45", row), input("the answer is 46", row), input("46", row, true)});
  ASSERT_EQ(s.size(), 4u);
  EXPECT_GT(s[0], 0.9);         // right and short
  EXPECT_LT(s[1], 0.0 + 1e-9);  // wrong
  EXPECT_GT(s[2], 0.5);         // right but longer: a little less
  EXPECT_LT(s[2], s[0]);
  EXPECT_LT(s[3], s[0]);        // truncated
}

TEST(RewardCommand, CrashMidStream) {
  const std::string e = command_error("read -r l; echo 1; exit 3", {input("a"), input("b"), input("c")});
  EXPECT_NE(e.find("exited with status 3"), std::string::npos) << e;
  EXPECT_NE(e.find("after answering 1 of 3"), std::string::npos) << e;
  EXPECT_NE(e.find("completion 1 of 3 (\"b\")"), std::string::npos) << e;
}

TEST(RewardCommand, KilledBySignal) {
  const std::string e = command_error("kill -9 $$", {input("a")});
  EXPECT_NE(e.find("killed by signal 9"), std::string::npos) << e;
}

TEST(RewardCommand, ExitBeforeReadingIsReportedNotSigpipe) {
  // Writing 1 MB into a pipe nobody reads raises SIGPIPE: moetune must survive it.
  const std::string e = command_error("exit 0", std::vector<RewardInput>(5, input(std::string(200000, 'y'))));
  EXPECT_NE(e.find("exited with status 0"), std::string::npos) << e;
  EXPECT_NE(e.find("completion 0 of 5"), std::string::npos) << e;
}

TEST(RewardCommand, TimeoutKillsTheProgram) {
  const std::string long_text(300, 'z');
  const std::string e = command_error("read -r l; echo 1; sleep 30; echo 2", {input("a"), input(long_text)},
                                      /*timeout_s=*/1, /*max_s=*/4);
  EXPECT_NE(e.find("no answer within 1"), std::string::npos) << e;
  // The completion is named by index and its first 80 characters.
  EXPECT_NE(e.find("completion 1 of 2 (\"" + std::string(80, 'z') + "...\")"), std::string::npos) << e;
}

TEST(RewardCommand, TimeoutWhileNotReadingItsInput) {
  // Neither reads nor answers: the writes would block forever without poll().
  const std::string e =
      command_error("sleep 30", std::vector<RewardInput>(4, input(std::string(100000, 'w'))), 1, 4);
  EXPECT_NE(e.find("no answer within 1"), std::string::npos) << e;
}

TEST(RewardCommand, GarbageLine) {
  for (const char* bad : {"abc", "1.5x", "nan", "inf", "", "1 2"}) {
    const std::string cmd = std::string("read -r l; echo 0.5; read -r l; echo '") + bad + "'; cat >/dev/null";
    const std::string e = command_error(cmd, {input("a"), input("b")});
    EXPECT_NE(e.find("is not a finite number"), std::string::npos) << e;
    EXPECT_NE(e.find("completion 1 of 2"), std::string::npos) << e;
  }
}

TEST(RewardCommand, AcceptsSpacesSignsAndExponents) {
  RewardCommand rc("while IFS= read -r l; do printf ' +2e-1 \\r\\n'; done");
  EXPECT_EQ(rc.score({input("a")}), (std::vector<double>{0.2}));
}

TEST(RewardCommand, MissingLine) {
  const std::string e = command_error("read -r l; echo 1; read -r l", {input("a"), input("b")});
  EXPECT_NE(e.find("exited with status 0 after answering 1 of 2"), std::string::npos) << e;
}

TEST(RewardCommand, ExtraLines) {
  // Two lines per completion: caught in the call that reads them, or (when the second
  // line arrives after the call returned) at the start of the next call.
  const std::string cmd = "while IFS= read -r l; do echo 1; echo 2; done";
  RewardCommand rc(cmd);
  std::string e = error_of([&] { rc.score({input("a")}); });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // let the second line arrive
  if (e == "(no error)") e = error_of([&] { rc.score({input("b")}); });
  EXPECT_NE(e.find("reward command '" + cmd + "'"), std::string::npos) << e;
  EXPECT_TRUE(e.find("more lines than") != std::string::npos || e.find("before being asked") != std::string::npos)
      << e;
}

TEST(RewardCommand, CommandNotFound) {
  const std::string e = command_error("moetune_no_such_reward_program_xyz --flag", {input("a")});
  EXPECT_NE(e.find("status 127 (command not found?)"), std::string::npos) << e;
}

TEST(RewardCommand, BadTimeoutAndNoZombiesAfterManyStarts) {
  EXPECT_NE(error_of([] { RewardCommand rc("cat", 0); }).find("rl.reward_timeout_s"), std::string::npos);
  for (int i = 0; i < 10; ++i) {
    RewardCommand rc("while IFS= read -r l; do echo 1; done");
    EXPECT_EQ(rc.score({input("a")}).size(), 1u);
    RewardCommand moved = std::move(rc);  // moved-from owns nothing
    EXPECT_EQ(moved.score({input("b")}).size(), 1u);
  }
  // A program that ignores EOF on stdin is killed by the destructor.
  const auto t0 = std::chrono::steady_clock::now();
  { RewardCommand rc("trap '' TERM; sleep 30"); }
  EXPECT_LT(seconds_since(t0), 3.0);
  EXPECT_EQ(zombie_children(), 0);
}

// ---- combination --------------------------------------------------------------------------

TEST(RewardModel, WeightedTotalAndPerFunctionValues) {
  RewardSpec spec;
  spec.names = {"math", "format", "command"};
  spec.weights = {1.0, 0.5, -2.0};
  spec.command = "while IFS= read -r l; do echo 0.25; done";
  RewardModel m(spec);
  EXPECT_TRUE(m.needs_answer());
  const json row = {{"answer", "46"}};
  const RewardScores s = m.score({input("46", row), input("47", row, true), input("none", row)});
  EXPECT_EQ(s.names, spec.names);
  ASSERT_EQ(s.per_function.size(), 3u);
  EXPECT_EQ(s.per_function[0], (std::vector<double>{1, 0, 0}));
  EXPECT_EQ(s.per_function[1], (std::vector<double>{1, 0, 0}));
  EXPECT_EQ(s.per_function[2], (std::vector<double>{0.25, 0.25, 0.25}));
  EXPECT_EQ(s.total, (std::vector<double>{1.0 + 0.5 - 0.5, -0.5, -0.5}));
}

TEST(RewardModel, WeightsDefaultToOne) {
  RewardSpec spec;
  spec.names = {"format", "exact"};
  RewardModel m(spec);
  EXPECT_EQ(m.weights(), (std::vector<double>{1, 1}));
  const RewardScores s = m.score({input("46", {{"answer", 46}})});
  EXPECT_EQ(s.total, (std::vector<double>{2}));
  RewardSpec fmt;
  fmt.names = {"format"};
  EXPECT_FALSE(RewardModel(fmt).needs_answer());
}

TEST(RewardModel, ConfigErrorsNameTheKey) {
  auto err = [](RewardSpec s) { return error_of([&] { RewardModel m(s); }); };
  RewardSpec s;
  EXPECT_NE(err(s).find("rl.reward is empty"), std::string::npos);
  s.names = {"math", "speed"};
  EXPECT_NE(err(s).find("rl.reward[1]: unknown reward 'speed'"), std::string::npos) << err(s);
  s.names = {"math", "math"};
  EXPECT_NE(err(s).find("rl.reward lists 'math' twice"), std::string::npos);
  s.names = {"math", "format"};
  s.weights = {1};
  EXPECT_NE(err(s).find("rl.reward_weights has 1 weights but rl.reward has 2"), std::string::npos) << err(s);
  s.weights = {1, std::nan("")};
  EXPECT_NE(err(s).find("rl.reward_weights[1]"), std::string::npos);
  s.weights = {};
  s.names = {"command"};
  EXPECT_NE(err(s).find("rl.reward_command is not set"), std::string::npos);
  s.names = {"math"};
  s.command = "cat";
  EXPECT_NE(err(s).find("rl.reward_command is set but rl.reward does not list 'command'"), std::string::npos);
  s.names = {"command"};
  s.timeout_s = -1;
  EXPECT_NE(err(s).find("rl.reward_timeout_s"), std::string::npos);
}
