// A seeded arithmetic task for the RL demo: problems "a op b=" with the number as the
// answer, an SFT file to give a tiny byte-level model a partial skill, RL training
// prompts and held-out test prompts that appear in neither training set. Deterministic
// on every platform (splitmix64, no <random> distributions). See docs/rewards.md.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace moetune {

struct ArithTaskConfig {
  int digits = 2;                // operands drawn uniformly from [0, 10^digits); 1..9
  std::string ops = "+-";        // a non-empty subset of "+-*", each at most once; drawn uniformly
  bool balance_carries = true;   // even-indexed problems of each file carry, odd ones do not
  int64_t train_sft = 20000, train_prompts = 2000, test_prompts = 500;  // counts, >= 0
  uint64_t seed = 1;
  // Noisy demonstrations: with this probability an SFT sample of a problem with a carry
  // (or borrow) answers as if the carry were forgotten (digit by digit, mod 10), a
  // systematic mistake that the math reward catches. '*' answers stay right; the
  // pre-training text and the prompt files are always right. In [0, 1].
  double sft_carry_error = 0.0;
};

// One problem. For '-' the operands are ordered so that a >= b: results are never negative.
struct ArithProblem {
  int64_t a = 0, b = 0;
  char op = '+';
  int64_t result() const;
  std::string text() const;    // the prompt: "12+34="
  std::string answer() const;  // the result in decimal: "46"
};

// True when schoolbook arithmetic carries or borrows in some column: '+': a digit sum
// (with carry in) >= 10; '-' (a >= b): a column needs a borrow; '*': some column sum of
// the single-digit partial products a_i * b_j (i + j = column) is >= 10.
// Throws moetune::Error for another op, negative operands, or '-' with a < b.
bool arith_has_carry(int64_t a, int64_t b, char op);

// The result with every carry (or borrow) forgotten: each column's digit sum (or
// difference) mod 10, leading zeros dropped. For '*' the right result.
std::string arith_carry_error_answer(const ArithProblem& p);

// The three problem lists. test_prompts and train_prompts hold distinct problems
// (by text); sft may repeat a problem; no problem of test_prompts appears in train_prompts
// or sft. Each list comes from its own stream of the seed, so the test set depends only
// on seed, digits, ops, balance_carries and test_prompts. Throws moetune::Error for a bad
// config (naming the option: digits, ops, train_sft, train_prompts, test_prompts) or
// when the problem space is too small for the distinct problems asked for.
struct ArithTask {
  std::vector<ArithProblem> sft, train_prompts, test_prompts;
};
ArithTask make_arith_task(const ArithTaskConfig& cfg);

struct ArithTaskStats {
  int64_t sft = 0, train_prompts = 0, test_prompts = 0;                  // problems written
  int64_t sft_carry = 0, train_prompts_carry = 0, test_prompts_carry = 0;  // of them with a carry
  std::string describe() const;  // one line for the log
};

// Writes make_arith_task(cfg) to out_dir (created if missing), each file atomically
// (io/fsutil.hpp write_file_atomic: "<name>.tmp", fsync, rename):
//   sft.jsonl            {"messages":[{"role":"user","content":"12+34="},{"role":"assistant","content":"46"}]}
//                        (with sft_carry_error p: that share of carry problems answered wrongly)
//   train_prompts.jsonl  {"prompt":"12+34=","answer":"46"}
//   test_prompts.jsonl   the same format
//   pretrain.jsonl       {"text":"12+34=46\n"}: the SFT problems as plain text, one per document
// Throws moetune::Error as make_arith_task, or naming a file that cannot be written.
ArithTaskStats write_arith_task(const ArithTaskConfig& cfg, const std::string& out_dir);

}  // namespace moetune
