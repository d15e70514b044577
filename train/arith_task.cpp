// The arithmetic task generator: splitmix64 draws, carry/borrow detection, dedupe against
// the held-out set, and the JSONL files (written atomically). Contract in arith_task.hpp.
#include "train/arith_task.hpp"

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <unordered_set>

#include "io/fsutil.hpp"
#include "moe/error.hpp"

namespace moetune {
namespace {

namespace fs = std::filesystem;

// splitmix64 (Steele, Lea, Flood 2014): the same sequence on every platform.
struct SplitMix64 {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform in [0, n), n > 0, without modulo bias (rejection of the top partial block).
  uint64_t below(uint64_t n) {
    const uint64_t limit = UINT64_MAX - UINT64_MAX % n;
    uint64_t r;
    do r = next();
    while (r >= limit);
    return r % n;
  }
};

// Independent streams of one seed: the test set must not change when other counts do.
SplitMix64 stream(uint64_t seed, uint64_t which) {
  SplitMix64 g{seed ^ (0xA5A5A5A5A5A5A5A5ull * (which + 1))};
  g.next();
  return g;
}

void validate(const ArithTaskConfig& cfg) {
  if (cfg.digits < 1 || cfg.digits > 9)
    throw Error("arith task: digits must be in [1, 9], got " + std::to_string(cfg.digits) +
                " (operands below 10^digits; products must fit 64 bits)");
  if (cfg.ops.empty()) throw Error("arith task: ops is empty (use a subset of \"+-*\", e.g. \"+-\")");
  for (size_t i = 0; i < cfg.ops.size(); ++i) {
    const char c = cfg.ops[i];
    if (c != '+' && c != '-' && c != '*')
      throw Error("arith task: ops \"" + cfg.ops + "\" has the unknown operator '" + std::string(1, c) +
                  "' (allowed: + - *)");
    if (cfg.ops.find(c) != i) throw Error("arith task: ops \"" + cfg.ops + "\" lists '" + std::string(1, c) + "' twice");
  }
  const std::pair<const char*, int64_t> counts[] = {
      {"train_sft", cfg.train_sft}, {"train_prompts", cfg.train_prompts}, {"test_prompts", cfg.test_prompts}};
  for (const auto& [name, v] : counts)
    if (v < 0) throw Error(std::string("arith task: ") + name + " must be >= 0, got " + std::to_string(v));
  if (!(cfg.sft_carry_error >= 0 && cfg.sft_carry_error <= 1))
    throw Error("arith task: sft_carry_error must be in [0, 1], got " + std::to_string(cfg.sft_carry_error));
}

// Draws one problem; with `want` >= 0 only one whose carry flag equals want, and never one
// whose text is in `exclude` (nor, when `distinct` is given, in it; it is then added).
ArithProblem draw(SplitMix64& g, const ArithTaskConfig& cfg, int want, const std::unordered_set<std::string>& exclude,
                  std::unordered_set<std::string>* distinct, const char* list, int64_t index) {
  uint64_t range = 1;
  for (int k = 0; k < cfg.digits; ++k) range *= 10;
  constexpr int64_t kTries = int64_t(1) << 20;
  for (int64_t t = 0; t < kTries; ++t) {
    ArithProblem p;
    p.op = cfg.ops[g.below(cfg.ops.size())];
    p.a = int64_t(g.below(range));
    p.b = int64_t(g.below(range));
    if (p.op == '-' && p.a < p.b) std::swap(p.a, p.b);
    if (want >= 0 && arith_has_carry(p.a, p.b, p.op) != (want == 1)) continue;
    const std::string text = p.text();
    if (exclude.count(text) || (distinct && distinct->count(text))) continue;
    if (distinct) distinct->insert(text);
    return p;
  }
  throw Error(std::string("arith task: could not draw ") + list + " problem " + std::to_string(index) +
              (want == 1 ? " (with a carry)" : want == 0 ? " (without a carry)" : "") + " in " +
              std::to_string(kTries) + " tries: digits " + std::to_string(cfg.digits) + " with ops \"" + cfg.ops +
              "\" has too few such problems" + (distinct ? " that are distinct and not held out" : " not held out") +
              " (lower test_prompts/train_prompts, raise digits, or turn balance_carries off)");
}

std::vector<ArithProblem> draw_list(SplitMix64 g, const ArithTaskConfig& cfg, int64_t n,
                                    const std::unordered_set<std::string>& exclude,
                                    std::unordered_set<std::string>* distinct, const char* list) {
  std::vector<ArithProblem> out;
  out.reserve(size_t(n));
  for (int64_t i = 0; i < n; ++i) {
    const int want = cfg.balance_carries ? int(i % 2 == 0) : -1;
    out.push_back(draw(g, cfg, want, exclude, distinct, list, i));
  }
  return out;
}

std::vector<int> digits_of(int64_t v) {  // least significant first; 0 -> {0}
  std::vector<int> d;
  do {
    d.push_back(int(v % 10));
    v /= 10;
  } while (v > 0);
  return d;
}

int64_t count_carry(const std::vector<ArithProblem>& ps) {
  int64_t n = 0;
  for (const ArithProblem& p : ps) n += arith_has_carry(p.a, p.b, p.op);
  return n;
}

}  // namespace

int64_t ArithProblem::result() const { return op == '+' ? a + b : op == '-' ? a - b : a * b; }
std::string ArithProblem::text() const { return std::to_string(a) + op + std::to_string(b) + "="; }
std::string ArithProblem::answer() const { return std::to_string(result()); }

std::string arith_carry_error_answer(const ArithProblem& p) {
  if (p.op == '*') return p.answer();
  int64_t a = p.a, b = p.b, out = 0, place = 1;
  while (a > 0 || b > 0) {
    const int64_t da = a % 10, db = b % 10;
    const int64_t d = p.op == '+' ? (da + db) % 10 : (da - db + 10) % 10;
    out += d * place;
    place *= 10;
    a /= 10;
    b /= 10;
  }
  return std::to_string(out);
}

bool arith_has_carry(int64_t a, int64_t b, char op) {
  if (a < 0 || b < 0) throw Error("arith_has_carry: negative operand");
  const std::vector<int> x = digits_of(a), y = digits_of(b);
  const size_t n = std::max(x.size(), y.size());
  auto at = [](const std::vector<int>& d, size_t i) { return i < d.size() ? d[i] : 0; };
  if (op == '+') {
    int c = 0;
    for (size_t i = 0; i < n; ++i) {
      c = at(x, i) + at(y, i) + c >= 10 ? 1 : 0;
      if (c) return true;
    }
    return false;
  }
  if (op == '-') {
    if (a < b) throw Error("arith_has_carry: '-' needs a >= b");
    for (size_t i = 0; i < n; ++i)
      if (at(x, i) < at(y, i)) return true;  // the first borrow (none before it)
    return false;
  }
  if (op == '*') {
    for (size_t k = 0; k < x.size() + y.size(); ++k) {
      int s = 0;
      for (size_t i = 0; i <= k && i < x.size(); ++i) s += at(x, i) * at(y, k - i);
      if (s >= 10) return true;  // the first column >= 10 carries (no carry came in before it)
    }
    return false;
  }
  throw Error(std::string("arith_has_carry: unknown op '") + op + "'");
}

ArithTask make_arith_task(const ArithTaskConfig& cfg) {
  validate(cfg);
  ArithTask t;
  const std::unordered_set<std::string> none;
  std::unordered_set<std::string> test_texts, train_texts;
  t.test_prompts = draw_list(stream(cfg.seed, 0), cfg, cfg.test_prompts, none, &test_texts, "test_prompts");
  t.train_prompts = draw_list(stream(cfg.seed, 1), cfg, cfg.train_prompts, test_texts, &train_texts, "train_prompts");
  t.sft = draw_list(stream(cfg.seed, 2), cfg, cfg.train_sft, test_texts, nullptr, "train_sft");
  return t;
}

std::string ArithTaskStats::describe() const {
  return "arith task: " + std::to_string(sft) + " SFT samples (" + std::to_string(sft_carry) + " with a carry), " +
         std::to_string(train_prompts) + " train prompts (" + std::to_string(train_prompts_carry) + "), " +
         std::to_string(test_prompts) + " test prompts (" + std::to_string(test_prompts_carry) + ")";
}

ArithTaskStats write_arith_task(const ArithTaskConfig& cfg, const std::string& out_dir) {
  const ArithTask t = make_arith_task(cfg);
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) throw Error(out_dir + ": cannot create the directory: " + ec.message());
  using ojson = nlohmann::ordered_json;
  std::string sft, train, test;
  SplitMix64 noise = stream(cfg.seed, 3);
  for (const ArithProblem& p : t.sft) {
    // One draw per sample whatever the rate, so that the problems do not depend on it.
    const bool wrong = double(noise.next() >> 11) * 0x1.0p-53 < cfg.sft_carry_error && p.op != '*' &&
                       arith_has_carry(p.a, p.b, p.op);
    ojson j = {{"messages", ojson::array({ojson{{"role", "user"}, {"content", p.text()}},
                                          ojson{{"role", "assistant"},
                                                {"content", wrong ? arith_carry_error_answer(p) : p.answer()}}})}};
    sft += j.dump() + "\n";
  }
  auto prompts = [](const std::vector<ArithProblem>& ps, std::string& out) {
    for (const ArithProblem& p : ps) out += ojson{{"prompt", p.text()}, {"answer", p.answer()}}.dump() + "\n";
  };
  prompts(t.train_prompts, train);
  prompts(t.test_prompts, test);
  // Plain-text pre-training documents of the SFT problems, one equation ("12+34=46\n") a
  // document: a base model that knows the equations but not the chat format. One a
  // document, not a stream of them, because an SFT prompt or an eval prompt is a problem
  // alone after <|bos|>: a base model that only ever saw equations after other equations
  // had a held-out loss of 2.06 nats/token on single equations (0.79 when pre-trained on
  // single ones), and after the same 480 SFT steps the first solved 13.4% of the held-out
  // problems, the second 80.2% (seed 1).
  std::string pre;
  for (const ArithProblem& p : t.sft) pre += ojson{{"text", p.text() + p.answer() + "\n"}}.dump() + "\n";
  const fs::path dir(out_dir);
  fsutil::write_file_atomic((dir / "pretrain.jsonl").string(), pre);
  fsutil::write_file_atomic((dir / "sft.jsonl").string(), sft);  // "<name>.tmp", fsync, rename
  fsutil::write_file_atomic((dir / "train_prompts.jsonl").string(), train);
  fsutil::write_file_atomic((dir / "test_prompts.jsonl").string(), test);
  ArithTaskStats s;
  s.sft = int64_t(t.sft.size());
  s.train_prompts = int64_t(t.train_prompts.size());
  s.test_prompts = int64_t(t.test_prompts.size());
  s.sft_carry = count_carry(t.sft);
  s.train_prompts_carry = count_carry(t.train_prompts);
  s.test_prompts_carry = count_carry(t.test_prompts);
  return s;
}

}  // namespace moetune
