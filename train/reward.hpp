// RL rewards: answer extraction and exact comparison for math tasks, the built-in reward
// functions (math, exact, format), a long-lived external reward program (RewardCommand)
// and their weighted combination (RewardModel). User documentation in docs/rewards.md.
#pragma once
#include <sys/types.h>

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace moetune {

// ---- answers ---------------------------------------------------------------------------

// The final answer of a completion, by the first rule that applies:
//   1. after the LAST "####" (GSM8K; spaces after it skipped): the rest of that line;
//   2. else the content of the LAST "\boxed{...}" whose braces balance (nested {} kept);
//   3. else the last number: [-]digits[,ddd]*[.digits][/digits], the '-' counting only
//      when not preceded by a letter, digit or ')' ("5-3" has the numbers 5 and 3).
// A rule whose text normalises to "" does not apply. The text is normalised by
// normalize_answer. nullopt when no rule applies (no marker, no box, no number).
std::optional<std::string> extract_math_answer(const std::string& completion);

// Normalisation of an answer: remove all whitespace; remove thousands commas (a ','
// between a digit and exactly three digits not followed by a digit: "1,234,567" ->
// "1234567", "(1,2)" kept); then repeatedly strip trailing '.', a leading '+', a leading
// "$" or "\$" and a trailing "$".
std::string normalize_answer(const std::string& text);

// An exact rational number num/den, always reduced (gcd 1) with den > 0, so two
// Rationals are equal iff their values are.
struct Rational {
  int64_t num = 0;
  int64_t den = 1;
  bool operator==(const Rational&) const = default;
};

// Parses "[+-]digits[.digits][(e|E)[+-]digits]" (".5" and "5." accepted) or
// "[+-]digits/digits" exactly: "3.50", "3.5" and "7/2" give the same Rational.
// nullopt for anything else (including "", "1/0", commas, spaces) and when the
// value's reduced numerator or denominator does not fit int64 (never a rounded value).
std::optional<Rational> parse_number(const std::string& text);

// Compares two answers after normalize_answer: as exact rationals when both parse
// (parse_number), else as strings ("\frac{1}{2}" equals only "\frac{1}{2}").
bool math_equal(const std::string& predicted, const std::string& reference);

// The reference answer of a GSM8K "answer" field ("...reasoning...\n#### 42"): the text
// after its last "####" up to the end of that line, normalised; a field without "####"
// is returned trimmed (leading/trailing whitespace removed).
std::string gsm8k_answer(const std::string& answer_field);

// The reference answer of a prompt row (train/rl_data.hpp): row["answer"] through
// gsm8k_answer when it is a string, the JSON text of a number ("42", "3.5"); nullopt
// when the row has no "answer" or it is null. Throws moetune::Error for other types.
std::optional<std::string> reference_answer(const nlohmann::json& row);

// ---- reward functions ------------------------------------------------------------------

// What a reward function sees of one completion.
struct RewardInput {
  std::string prompt;      // the prompt's text (the user content for a one-turn prompt)
  std::string completion;  // the decoded completion, without its stop token
  bool truncated = false;  // true when it ran to max_new_tokens without a stop token
  nlohmann::json row;      // the whole prompt row: "answer" and every other column
};

// 1 if extract_math_answer(completion) exists and math_equal's the row's reference
// answer, else 0. Throws moetune::Error when the row has no answer.
double reward_math(const RewardInput& in);
// 1 if the completion, trimmed, equals the reference answer, trimmed (byte for byte),
// else 0. Throws moetune::Error when the row has no answer.
double reward_exact(const RewardInput& in);
// 1 if the completion ended with a stop token (not truncated) AND
// extract_math_answer(completion) finds an answer, else 0. Needs no answer.
double reward_format(const RewardInput& in);

// True for the rewards that need each prompt row's "answer": "math" and "exact".
bool reward_needs_answer(const std::string& name);

// ---- external reward program -----------------------------------------------------------

// A user's reward program, started once as `/bin/sh -c "<command>"` and kept running.
// Protocol (docs/rewards.md): for each completion one JSON object per line on its stdin,
//   {"prompt": ..., "completion": ..., "truncated": ..., "answer": <reference or null>,
//    <every other column of the row>}
// and it answers one finite number per line on its stdout, in order (flushing each line).
// Its stderr is moetune's. Not thread-safe; move-only.
class RewardCommand {
 public:
  // Starts the program. timeout_s: the longest score() waits for the next answer line.
  // Throws moetune::Error when timeout_s is not positive or pipe/fork fails.
  explicit RewardCommand(const std::string& command, double timeout_s = 60);
  ~RewardCommand();  // closes its stdin, kills its process group, reaps it (no zombies)
  RewardCommand(const RewardCommand&) = delete;
  RewardCommand& operator=(const RewardCommand&) = delete;
  RewardCommand(RewardCommand&& other) noexcept;
  RewardCommand& operator=(RewardCommand&& other) noexcept;

  // One reward per input, in order. Writes all lines while reading answers (poll(), so a
  // program that answers before reading everything cannot deadlock). Throws
  // moetune::Error naming the command and the completion (index and its first 80
  // characters) when the program exits or closes its stdout before answering all
  // (with its exit status), waits more than timeout_s for a line, writes a line that is
  // not one finite number, or writes more lines than asked. After an error the program
  // is killed and every later call throws.
  std::vector<double> score(const std::vector<RewardInput>& inputs);

  const std::string& command() const { return command_; }

 private:
  void stop();
  [[noreturn]] void fail(const std::string& what);

  std::string command_;
  double timeout_s_ = 60;
  pid_t pid_ = -1;
  int to_child_ = -1;    // its stdin (ours: non-blocking write end)
  int from_child_ = -1;  // its stdout (ours: non-blocking read end)
  std::string pending_;  // bytes read after the last complete line
  bool failed_ = false;
};

// ---- combination -----------------------------------------------------------------------

// The rewards of an RL run (config keys rl.reward, rl.reward_weights, rl.reward_command,
// rl.reward_timeout_s).
struct RewardSpec {
  std::vector<std::string> names;  // each of "math", "exact", "format", "command"; no repeats
  std::vector<double> weights;     // empty: 1 each; else one finite weight per name
  std::string command;             // the program of "command"
  double timeout_s = 60;
};

// Per completion the weighted total and every function's own value.
struct RewardScores {
  std::vector<double> total;                     // (N) sum_f weights[f] * per_function[f][i]
  std::vector<std::vector<double>> per_function; // (F, N), in the order of names
  std::vector<std::string> names;                // (F)
};

class RewardModel {
 public:
  // Validates the spec; starts the command when "command" is listed. Throws
  // moetune::Error naming the key: rl.reward empty, unknown or repeated name;
  // rl.reward_weights of another count or not finite; "command" without
  // rl.reward_command, or rl.reward_command without "command"; rl.reward_timeout_s <= 0.
  explicit RewardModel(const RewardSpec& spec);

  RewardScores score(const std::vector<RewardInput>& inputs);

  const std::vector<std::string>& names() const { return names_; }
  const std::vector<double>& weights() const { return weights_; }
  // True when some function needs each row's "answer" (reward_needs_answer).
  bool needs_answer() const;

 private:
  std::vector<std::string> names_;
  std::vector<double> weights_;
  std::optional<RewardCommand> command_;
};

}  // namespace moetune
