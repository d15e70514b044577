// RL rewards: answer extraction, exact rationals, the built-in reward functions, the
// external reward program (fork/exec + two pipes + poll) and the weighted combination.
// Contract in reward.hpp, user documentation in docs/rewards.md.
#include "train/reward.hpp"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstring>
#include <thread>
#include <utility>

#include "moe/error.hpp"

namespace moetune {
namespace {

using json = nlohmann::json;
__extension__ typedef __int128 i128;

bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }
bool is_alnum(char c) { return std::isalnum(static_cast<unsigned char>(c)) != 0; }

std::string trim(const std::string& s) {
  size_t b = 0, e = s.size();
  while (b < e && is_space(s[b])) ++b;
  while (e > b && is_space(s[e - 1])) --e;
  return s.substr(b, e - b);
}

// The last number of `s` (rule 3 of extract_math_answer), as written.
std::optional<std::string> last_number(const std::string& s) {
  const size_t n = s.size();
  std::optional<std::string> last;
  size_t i = 0;
  while (i < n) {
    if (!is_digit(s[i])) {
      ++i;
      continue;
    }
    size_t b = i;
    if (b > 0 && s[b - 1] == '-' && (b < 2 || !(is_alnum(s[b - 2]) || s[b - 2] == ')'))) --b;
    size_t j = i;
    while (j < n && is_digit(s[j])) ++j;
    // Thousands groups: ",ddd" not followed by another digit.
    while (j + 3 < n && s[j] == ',' && is_digit(s[j + 1]) && is_digit(s[j + 2]) && is_digit(s[j + 3]) &&
           (j + 4 == n || !is_digit(s[j + 4])))
      j += 4;
    if (j + 1 < n && s[j] == '.' && is_digit(s[j + 1])) {
      ++j;
      while (j < n && is_digit(s[j])) ++j;
    }
    if (j + 1 < n && s[j] == '/' && is_digit(s[j + 1])) {
      ++j;
      while (j < n && is_digit(s[j])) ++j;
    }
    last = s.substr(b, j - b);
    i = j;
  }
  return last;
}

// Content of the last \boxed{...} with balanced braces whose content normalises to
// something; nullopt if there is none.
std::optional<std::string> last_boxed(const std::string& s) {
  static const std::string kOpen = "\\boxed{";
  size_t pos = s.rfind(kOpen);
  while (pos != std::string::npos) {
    const size_t start = pos + kOpen.size();
    int depth = 1;
    size_t j = start;
    for (; j < s.size() && depth > 0; ++j) {
      if (s[j] == '{') ++depth;
      if (s[j] == '}') --depth;
    }
    if (depth == 0) {
      std::string content = normalize_answer(s.substr(start, j - 1 - start));
      if (!content.empty()) return content;
    }
    if (pos == 0) break;
    pos = s.rfind(kOpen, pos - 1);
  }
  return std::nullopt;
}

// Rest of the line after the last "####" (spaces after the marker skipped), or nullopt.
std::optional<std::string> after_last_marker(const std::string& s) {
  const size_t pos = s.rfind("####");
  if (pos == std::string::npos) return std::nullopt;
  size_t b = pos + 4;
  const size_t e = std::min(s.find('\n', b), s.size());
  return s.substr(b, e - b);
}

// Checked a = a * 10 + d on a non-negative i128 below 10^37.
bool push_digit(i128& a, int d) {
  static const i128 kLimit = [] {
    i128 v = 1;
    for (int k = 0; k < 37; ++k) v *= 10;
    return v;
  }();
  if (a >= kLimit) return false;
  a = a * 10 + d;
  return true;
}

bool pow10_times(i128& a, int64_t e) {  // a *= 10^e, checked
  for (int64_t k = 0; k < e; ++k) {
    if (a == 0) return true;
    if (!push_digit(a, 0)) return false;
  }
  return true;
}

i128 gcd128(i128 a, i128 b) {
  if (a < 0) a = -a;
  while (b != 0) {
    const i128 t = a % b;
    a = b;
    b = t;
  }
  return a;
}

std::optional<Rational> make_rational(bool neg, i128 num, i128 den) {
  if (den == 0) return std::nullopt;
  const i128 g = gcd128(num, den);
  if (g > 1) {
    num /= g;
    den /= g;
  }
  const i128 kMax = i128(INT64_MAX);
  if (num > kMax || den > kMax) return std::nullopt;
  Rational r;
  r.num = neg && num != 0 ? -int64_t(num) : int64_t(num);
  r.den = int64_t(den);
  return r;
}

// Parses digits [b, e) of s into a; false for none, a non-digit or overflow.
bool parse_digits(const std::string& s, size_t b, size_t e, i128& a) {
  if (b >= e) return false;
  a = 0;
  for (size_t k = b; k < e; ++k)
    if (!is_digit(s[k]) || !push_digit(a, s[k] - '0')) return false;
  return true;
}

std::string describe_status(int status) {
  if (WIFEXITED(status)) {
    const int code = WEXITSTATUS(status);
    return "exited with status " + std::to_string(code) + (code == 127 ? " (command not found?)" : "");
  }
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    const char* name = strsignal(sig);
    return "was killed by signal " + std::to_string(sig) + (name ? std::string(" (") + name + ")" : "");
  }
  return "stopped (wait status " + std::to_string(status) + ")";
}

// write() with SIGPIPE blocked for this thread: a closed pipe is reported as EPIPE (and
// the signal it raised is consumed) instead of killing moetune.
ssize_t write_no_sigpipe(int fd, const char* p, size_t n) {
  sigset_t pipe_set, old, pending;
  sigemptyset(&pipe_set);
  sigaddset(&pipe_set, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe_set, &old);
  sigpending(&pending);
  const bool was_pending = sigismember(&pending, SIGPIPE) == 1;
  const ssize_t r = ::write(fd, p, n);
  const int err = errno;
  if (r < 0 && err == EPIPE && !was_pending) {
    const timespec zero{0, 0};
    while (sigtimedwait(&pipe_set, nullptr, &zero) < 0 && errno == EINTR) {
    }
  }
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  errno = err;
  return r;
}

std::string first_chars(const std::string& s, size_t n = 80) {
  if (s.size() <= n) return s;
  return s.substr(0, n) + "...";
}

// "completion 3 (\"12+34=...\")" for error messages (JSON-quoted so newlines stay visible).
std::string name_completion(const std::vector<RewardInput>& inputs, size_t i) {
  std::string text = i < inputs.size() ? first_chars(inputs[i].completion) : std::string();
  return "completion " + std::to_string(i) + " of " + std::to_string(inputs.size()) + " (" +
         json(text).dump(-1, ' ', false, json::error_handler_t::replace) + ")";
}

// Parses one answer line: surrounding whitespace allowed, one finite number.
std::optional<double> parse_score(const std::string& line) {
  std::string t = trim(line);
  if (!t.empty() && t[0] == '+') t.erase(0, 1);
  if (t.empty()) return std::nullopt;
  double v = 0;
  const auto [ptr, ec] = std::from_chars(t.data(), t.data() + t.size(), v);
  if (ec != std::errc() || ptr != t.data() + t.size() || !std::isfinite(v)) return std::nullopt;
  return v;
}

}  // namespace

// ---- answers ---------------------------------------------------------------------------

std::string normalize_answer(const std::string& text) {
  std::string t;
  for (char c : text)
    if (!is_space(c)) t.push_back(c);
  std::string u;
  for (size_t k = 0; k < t.size(); ++k) {
    const bool thousands = t[k] == ',' && k > 0 && is_digit(t[k - 1]) && k + 3 < t.size() && is_digit(t[k + 1]) &&
                           is_digit(t[k + 2]) && is_digit(t[k + 3]) && (k + 4 == t.size() || !is_digit(t[k + 4]));
    if (!thousands) u.push_back(t[k]);
  }
  for (bool changed = true; changed && !u.empty();) {
    changed = false;
    if (u.back() == '.' || u.back() == '$') {
      u.pop_back();
      changed = true;
    } else if (u[0] == '+' || u[0] == '$') {
      u.erase(0, 1);
      changed = true;
    } else if (u.size() >= 2 && u[0] == '\\' && u[1] == '$') {
      u.erase(0, 2);
      changed = true;
    }
  }
  return u;
}

std::optional<std::string> extract_math_answer(const std::string& completion) {
  if (auto marked = after_last_marker(completion)) {
    std::string a = normalize_answer(*marked);
    if (!a.empty()) return a;
  }
  if (auto boxed = last_boxed(completion)) return boxed;
  if (auto num = last_number(completion)) {
    std::string a = normalize_answer(*num);
    if (!a.empty()) return a;
  }
  return std::nullopt;
}

std::optional<Rational> parse_number(const std::string& s) {
  size_t i = 0;
  bool neg = false;
  if (i < s.size() && (s[i] == '+' || s[i] == '-')) {
    neg = s[i] == '-';
    ++i;
  }
  const size_t slash = s.find('/', i);
  if (slash != std::string::npos) {
    i128 num, den;
    if (!parse_digits(s, i, slash, num) || !parse_digits(s, slash + 1, s.size(), den)) return std::nullopt;
    return make_rational(neg, num, den);
  }
  // Mantissa digits (integer and fraction part), then an optional exponent.
  std::string digits;
  int64_t frac = 0;
  size_t j = i;
  while (j < s.size() && is_digit(s[j])) digits.push_back(s[j++]);
  if (j < s.size() && s[j] == '.') {
    ++j;
    while (j < s.size() && is_digit(s[j])) {
      digits.push_back(s[j++]);
      ++frac;
    }
  }
  if (digits.empty()) return std::nullopt;
  int64_t exp = 0;
  if (j < s.size() && (s[j] == 'e' || s[j] == 'E')) {
    ++j;
    bool eneg = false;
    if (j < s.size() && (s[j] == '+' || s[j] == '-')) eneg = s[j++] == '-';
    if (j >= s.size()) return std::nullopt;
    for (; j < s.size(); ++j) {
      if (!is_digit(s[j])) return std::nullopt;
      exp = std::min<int64_t>(exp * 10 + (s[j] - '0'), 100000);
    }
    if (eneg) exp = -exp;
  }
  if (j != s.size()) return std::nullopt;
  // Trailing zeros only move the decimal point; leading zeros add nothing.
  int64_t scale = exp - frac;  // value = mantissa * 10^scale
  while (digits.size() > 1 && digits.back() == '0') {
    digits.pop_back();
    ++scale;
  }
  i128 mant;
  if (!parse_digits(digits, 0, digits.size(), mant)) return std::nullopt;
  if (mant == 0) return Rational{0, 1};
  i128 den = 1;
  if (scale >= 0) {
    if (!pow10_times(mant, scale)) return std::nullopt;
  } else {
    if (!pow10_times(den, -scale)) return std::nullopt;
  }
  return make_rational(neg, mant, den);
}

bool math_equal(const std::string& predicted, const std::string& reference) {
  const std::string a = normalize_answer(predicted), b = normalize_answer(reference);
  const auto ra = parse_number(a), rb = parse_number(b);
  if (ra && rb) return *ra == *rb;
  return a == b;
}

std::string gsm8k_answer(const std::string& answer_field) {
  if (auto marked = after_last_marker(answer_field)) return normalize_answer(*marked);
  return trim(answer_field);
}

std::optional<std::string> reference_answer(const json& row) {
  if (!row.is_object() || !row.contains("answer")) return std::nullopt;
  const json& a = row.at("answer");
  if (a.is_null()) return std::nullopt;
  if (a.is_string()) return gsm8k_answer(a.get_ref<const std::string&>());
  if (a.is_number()) return a.dump();
  throw Error("'answer' must be a string or a number, got " + std::string(a.type_name()) + " " + a.dump());
}

// ---- reward functions ------------------------------------------------------------------

namespace {
std::string needed_answer(const RewardInput& in, const char* reward) {
  auto ref = reference_answer(in.row);
  if (!ref)
    throw Error(std::string("reward '") + reward + "' needs an 'answer' in the prompt row, which has none (prompt " +
                json(first_chars(in.prompt)).dump(-1, ' ', false, json::error_handler_t::replace) + ")");
  return *ref;
}
}  // namespace

double reward_math(const RewardInput& in) {
  const std::string ref = needed_answer(in, "math");
  const auto pred = extract_math_answer(in.completion);
  return pred && math_equal(*pred, ref) ? 1.0 : 0.0;
}

double reward_exact(const RewardInput& in) {
  const std::string ref = needed_answer(in, "exact");
  return trim(in.completion) == trim(ref) ? 1.0 : 0.0;
}

double reward_format(const RewardInput& in) {
  return !in.truncated && extract_math_answer(in.completion).has_value() ? 1.0 : 0.0;
}

bool reward_needs_answer(const std::string& name) { return name == "math" || name == "exact"; }

// ---- external reward program -----------------------------------------------------------

RewardCommand::RewardCommand(const std::string& command, double timeout_s)
    : command_(command), timeout_s_(timeout_s) {
  if (!(timeout_s > 0) || !std::isfinite(timeout_s))
    throw Error("reward command '" + command + "': the timeout must be a positive number of seconds, got " +
                std::to_string(timeout_s) + " (rl.reward_timeout_s)");
  int in[2], out[2];
  if (::pipe2(in, O_CLOEXEC) != 0)
    throw Error("reward command '" + command + "': pipe() failed: " + std::strerror(errno));
  if (::pipe2(out, O_CLOEXEC) != 0) {
    const int err = errno;
    ::close(in[0]);
    ::close(in[1]);
    throw Error("reward command '" + command + "': pipe() failed: " + std::strerror(err));
  }
  // Everything the child needs is prepared before fork(): between fork and exec it may
  // only make async-signal-safe calls (moetune is multi-threaded).
  const char* argv[] = {"sh", "-c", command_.c_str(), nullptr};
  const pid_t pid = ::fork();
  if (pid < 0) {
    const int err = errno;
    for (int fd : {in[0], in[1], out[0], out[1]}) ::close(fd);
    throw Error("reward command '" + command + "': fork() failed: " + std::strerror(err));
  }
  if (pid == 0) {
    ::setpgid(0, 0);  // its own process group: the destructor kills the whole pipeline
    struct sigaction dfl;
    std::memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    ::sigaction(SIGPIPE, &dfl, nullptr);
    sigset_t all;
    sigfillset(&all);
    ::sigprocmask(SIG_UNBLOCK, &all, nullptr);
    // dup2 onto itself keeps FD_CLOEXEC: clear it explicitly then.
    if (in[0] == 0) ::fcntl(0, F_SETFD, 0); else if (::dup2(in[0], 0) < 0) ::_exit(127);
    if (out[1] == 1) ::fcntl(1, F_SETFD, 0); else if (::dup2(out[1], 1) < 0) ::_exit(127);
    ::execv("/bin/sh", const_cast<char* const*>(argv));
    ::_exit(127);
  }
  ::setpgid(pid, pid);  // also from the parent, so a kill right away finds the group
  ::close(in[0]);
  ::close(out[1]);
  pid_ = pid;
  to_child_ = in[1];
  from_child_ = out[0];
  ::fcntl(to_child_, F_SETFL, ::fcntl(to_child_, F_GETFL) | O_NONBLOCK);
  ::fcntl(from_child_, F_SETFL, ::fcntl(from_child_, F_GETFL) | O_NONBLOCK);
}

RewardCommand::~RewardCommand() { stop(); }

RewardCommand::RewardCommand(RewardCommand&& o) noexcept
    : command_(std::move(o.command_)),
      timeout_s_(o.timeout_s_),
      pid_(std::exchange(o.pid_, -1)),
      to_child_(std::exchange(o.to_child_, -1)),
      from_child_(std::exchange(o.from_child_, -1)),
      pending_(std::move(o.pending_)),
      failed_(o.failed_) {}

RewardCommand& RewardCommand::operator=(RewardCommand&& o) noexcept {
  if (this != &o) {
    stop();
    command_ = std::move(o.command_);
    timeout_s_ = o.timeout_s_;
    pid_ = std::exchange(o.pid_, -1);
    to_child_ = std::exchange(o.to_child_, -1);
    from_child_ = std::exchange(o.from_child_, -1);
    pending_ = std::move(o.pending_);
    failed_ = o.failed_;
  }
  return *this;
}

namespace {
// Closes our pipe ends, gives the program `grace_s` to exit (it sees EOF on its stdin),
// then kills its process group and reaps it. Returns the wait status, or -1 if none.
int reap(pid_t& pid, int& to_child, int& from_child, double grace_s) {
  if (to_child >= 0) ::close(std::exchange(to_child, -1));
  if (from_child >= 0) ::close(std::exchange(from_child, -1));
  if (pid <= 0) return -1;
  int status = 0;
  pid_t r = 0;
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(grace_s);
  while ((r = ::waitpid(pid, &status, WNOHANG)) == 0 && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  if (r == 0) {
    ::kill(-pid, SIGKILL);
    ::kill(pid, SIGKILL);
    while ((r = ::waitpid(pid, &status, 0)) < 0 && errno == EINTR) {
    }
  }
  ::kill(-pid, SIGKILL);  // leftovers of its pipeline (the group id stays reserved while any live)
  pid = -1;
  return r == -1 ? -1 : status;
}
}  // namespace

void RewardCommand::stop() { reap(pid_, to_child_, from_child_, 0.2); }

void RewardCommand::fail(const std::string& what) {
  reap(pid_, to_child_, from_child_, 0.0);
  failed_ = true;
  pending_.clear();
  throw Error("reward command '" + command_ + "': " + what);
}

std::vector<double> RewardCommand::score(const std::vector<RewardInput>& inputs) {
  if (failed_ || pid_ <= 0)
    throw Error("reward command '" + command_ + "': not running (it failed earlier)");
  const size_t n = inputs.size();
  std::vector<double> scores;
  if (n == 0) return scores;
  scores.reserve(n);

  // Output nobody asked for yet: extra lines of the previous call.
  {
    pollfd p{from_child_, POLLIN, 0};
    if (!pending_.empty() || (::poll(&p, 1, 0) > 0 && (p.revents & POLLIN))) {
      char c;
      if (!pending_.empty() || ::read(from_child_, &c, 1) == 1)
        fail("wrote output before being asked (more lines than completions in the previous call); no answer "
             "expected before " + name_completion(inputs, 0));
    }
  }

  std::string out;
  for (const RewardInput& in : inputs) {
    json obj = in.row.is_object() ? in.row : json::object();
    obj["prompt"] = in.prompt;
    obj["completion"] = in.completion;
    obj["truncated"] = in.truncated;
    const auto ref = reference_answer(in.row);
    obj["answer"] = ref ? json(*ref) : json(nullptr);
    out += obj.dump(-1, ' ', false, json::error_handler_t::replace);  // invalid UTF-8 -> U+FFFD
    out += '\n';
  }

  using clock = std::chrono::steady_clock;
  const auto timeout = std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(timeout_s_));
  auto deadline = clock::now() + timeout;
  size_t written = 0;
  bool write_open = to_child_ >= 0;  // false once it closed its stdin (then its exit is awaited)
  char buf[65536];
  while (scores.size() < n || (write_open && written < out.size())) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock::now()).count() + 1;
    if (clock::now() >= deadline)
      fail("no answer within " + std::to_string(timeout_s_) + " s (rl.reward_timeout_s) for " +
           name_completion(inputs, scores.size()));
    pollfd fds[2] = {{from_child_, POLLIN, 0}, {to_child_, POLLOUT, 0}};
    const bool want_write = write_open && written < out.size();
    const int r = ::poll(fds, want_write ? 2 : 1, int(std::min<long long>(left, 1000)));
    if (r < 0) {
      if (errno == EINTR) continue;
      fail(std::string("poll() failed: ") + std::strerror(errno));
    }
    if (want_write && fds[1].revents) {
      if (fds[1].revents & (POLLERR | POLLHUP)) {
        write_open = false;  // it closed its stdin; its exit is reported by the read side
      } else {
        const ssize_t k = write_no_sigpipe(to_child_, out.data() + written, out.size() - written);
        if (k > 0) {
          written += size_t(k);
        } else if (k < 0 && errno == EPIPE) {
          write_open = false;
        } else if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
          fail(std::string("write to its stdin failed: ") + std::strerror(errno));
        }
      }
      if (!write_open) ::close(std::exchange(to_child_, -1));  // it closed its stdin
    }
    if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
      const ssize_t k = ::read(from_child_, buf, sizeof buf);
      if (k > 0) {
        pending_.append(buf, size_t(k));
        size_t nl;
        while ((nl = pending_.find('\n')) != std::string::npos) {
          const std::string line = pending_.substr(0, nl);
          pending_.erase(0, nl + 1);
          if (scores.size() == n)
            fail("wrote more lines than the " + std::to_string(n) + " completions it was given (extra line " +
                 json(first_chars(line)).dump(-1, ' ', false, json::error_handler_t::replace) + ")");
          const auto v = parse_score(line);
          if (!v)
            fail("answer line " + json(first_chars(line)).dump(-1, ' ', false, json::error_handler_t::replace) +
                 " for " + name_completion(inputs, scores.size()) + " is not a finite number");
          scores.push_back(*v);
          deadline = clock::now() + timeout;
        }
      } else if (k == 0) {
        const int status = reap(pid_, to_child_, from_child_, 2.0);
        fail((status == -1 ? std::string("closed its stdout") : describe_status(status)) + " after answering " +
             std::to_string(scores.size()) + " of " + std::to_string(n) + " completions; no answer for " +
             name_completion(inputs, scores.size()));
      } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
        fail(std::string("read from its stdout failed: ") + std::strerror(errno));
      }
    }
  }
  if (!trim(pending_).empty())
    fail("wrote more output than the " + std::to_string(n) + " answer lines (" +
         json(first_chars(pending_)).dump(-1, ' ', false, json::error_handler_t::replace) + ")");
  pending_.clear();
  return scores;
}

// ---- combination -----------------------------------------------------------------------

RewardModel::RewardModel(const RewardSpec& spec) : names_(spec.names) {
  if (names_.empty()) throw Error("rl.reward is empty: list at least one of math, exact, format, command");
  bool has_command = false;
  for (size_t i = 0; i < names_.size(); ++i) {
    const std::string& n = names_[i];
    if (n != "math" && n != "exact" && n != "format" && n != "command")
      throw Error("rl.reward[" + std::to_string(i) + "]: unknown reward '" + n +
                  "' (allowed: math, exact, format, command)");
    if (std::find(names_.begin(), names_.begin() + long(i), n) != names_.begin() + long(i))
      throw Error("rl.reward lists '" + n + "' twice");
    has_command = has_command || n == "command";
  }
  if (spec.weights.empty()) {
    weights_.assign(names_.size(), 1.0);
  } else {
    if (spec.weights.size() != names_.size())
      throw Error("rl.reward_weights has " + std::to_string(spec.weights.size()) + " weights but rl.reward has " +
                  std::to_string(names_.size()) + " rewards (one weight per reward, or none for 1 each)");
    for (size_t i = 0; i < spec.weights.size(); ++i)
      if (!std::isfinite(spec.weights[i]))
        throw Error("rl.reward_weights[" + std::to_string(i) + "] is not a finite number");
    weights_ = spec.weights;
  }
  if (has_command && spec.command.empty())
    throw Error("rl.reward lists 'command' but rl.reward_command is not set (the program to run)");
  if (!has_command && !spec.command.empty())
    throw Error("rl.reward_command is set but rl.reward does not list 'command' (add it to use the program)");
  if (!(spec.timeout_s > 0) || !std::isfinite(spec.timeout_s))
    throw Error("rl.reward_timeout_s must be a positive number of seconds, got " + std::to_string(spec.timeout_s));
  if (has_command) command_.emplace(spec.command, spec.timeout_s);
}

bool RewardModel::needs_answer() const {
  return std::any_of(names_.begin(), names_.end(), [](const std::string& n) { return reward_needs_answer(n); });
}

RewardScores RewardModel::score(const std::vector<RewardInput>& inputs) {
  RewardScores s;
  s.names = names_;
  s.total.assign(inputs.size(), 0.0);
  for (size_t f = 0; f < names_.size(); ++f) {
    std::vector<double> v;
    if (names_[f] == "command") {
      v = command_->score(inputs);
    } else {
      double (*fn)(const RewardInput&) =
          names_[f] == "math" ? reward_math : names_[f] == "exact" ? reward_exact : reward_format;
      v.reserve(inputs.size());
      for (const RewardInput& in : inputs) v.push_back(fn(in));
    }
    for (size_t i = 0; i < inputs.size(); ++i) s.total[i] += weights_[f] * v[i];
    s.per_function.push_back(std::move(v));
  }
  return s;
}

}  // namespace moetune
