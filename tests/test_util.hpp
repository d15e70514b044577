// Helpers shared by the tests: deterministic random fills, central finite
// differences in double precision, a relative-error measure, error messages, a
// per-test scratch directory, and a one-token-per-byte text encoder.
#pragma once
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "moe/batch.hpp"
#include "moe/error.hpp"
#include "tokenizer/text_encoder.hpp"

// EXPECT that `haystack` contains `needle`, printing the whole message if not.
#define EXPECT_CONTAINS(haystack, needle) \
  EXPECT_NE(std::string(haystack).find(needle), std::string::npos) << "message: " << (haystack)

namespace moetune::testing {

// What error_of returns when nothing was thrown.
inline const std::string kNoError = "(no error)";

// The message of the moetune::Error thrown by f(), or kNoError.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return kNoError;
}

// This test process's scratch directory (under the system temp directory, named after
// the pid), removed when the process exits.
inline const std::filesystem::path& scratch_root() {
  struct Root {
    std::filesystem::path path =
        std::filesystem::temp_directory_path() / ("moetune_test_" + std::to_string(::getpid()));
    ~Root() {
      std::error_code ec;
      std::filesystem::remove_all(path, ec);
    }
  };
  static const Root root;
  return root.path;
}

// A directory of the running test's own (suite_test), created if needed.
inline std::filesystem::path test_dir() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string name = std::string(info->test_suite_name()) + "_" + info->name();
  for (char& c : name)
    if (c == '/') c = '_';  // parameterised tests: "Variants/Suite"
  const auto dir = scratch_root() / name;
  std::filesystem::create_directories(dir);
  return dir;
}

// A path `name` in test_dir(); nothing is created.
inline std::string test_path(const std::string& name) { return (test_dir() / name).string(); }

// Writes `content` (bytes as they are) to test_path(name) and returns that path.
inline std::string write_file(const std::string& name, const std::string& content) {
  const std::string p = test_path(name);
  std::ofstream(p, std::ios::binary) << content;
  return p;
}

// The bytes of a file ("" if it cannot be read).
inline std::string read_text(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// One token per byte (0..255); specials 256..262 in the order pad, bos, eos, system,
// user, assistant, end.
struct ByteEncoder : TextEncoder {
  std::vector<int32_t> encode(const std::string& text) const override {
    std::vector<int32_t> ids;
    for (unsigned char c : text) ids.push_back(int32_t(c));
    return ids;
  }
  int32_t special_id(const std::string& name) const override {
    const char* names[] = {"<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"};
    for (int i = 0; i < 7; ++i)
      if (name == names[i]) return 256 + i;
    throw Error("ByteEncoder: unknown special token " + name);
  }
};

inline std::vector<double> randn(size_t n, uint64_t seed, double scale = 1.0) {
  std::mt19937_64 g(seed);
  std::normal_distribution<double> nd(0.0, scale);
  std::vector<double> v(n);
  for (auto& x : v) x = nd(g);
  return v;
}

// |a-b| / max(|a|, |b|, floor)
inline double rel_err(double a, double b, double floor = 1e-8) {
  return std::fabs(a - b) / std::max({std::fabs(a), std::fabs(b), floor});
}

// Central difference of f with respect to x[i] (x restored afterwards).
inline double fd(const std::function<double()>& f, double& xi, double h = 1e-6) {
  const double old = xi;
  xi = old + h;
  const double fp = f();
  xi = old - h;
  const double fm = f();
  xi = old;
  return (fp - fm) / (2 * h);
}

// Checks every element of x (or `max_checks` evenly spaced ones) against the analytic
// gradient g; returns the worst relative error. The floor of the denominator is
// 1e-5 * (1 + max|g|), so elements whose gradient is tiny compared with the rest of
// the tensor are compared in absolute terms (central differences with h = 1e-5 have
// an absolute error of about 1e-10 * |f|).
inline double check_grad(const std::function<double()>& f, std::vector<double>& x, const std::vector<double>& g,
                         size_t max_checks = 64, double h = 1e-5) {
  double gmax = 0;
  for (double v : g) gmax = std::max(gmax, std::fabs(v));
  const double floor = 1e-5 * (1.0 + gmax);
  double worst = 0;
  const size_t n = x.size();
  const size_t step = n <= max_checks ? 1 : n / max_checks;
  for (size_t i = 0; i < n; i += step) worst = std::max(worst, rel_err(fd(f, x[i], h), g[i], floor));
  return worst;
}

// A micro-batch of `rows` rows: random tokens, two documents in row 0 (packing),
// some ignored labels, and padding at the end of the last row.
inline MicroBatch make_batch(int rows, int seq_len, int vocab, uint64_t seed) {
  std::mt19937_64 g(seed);
  MicroBatch mb;
  mb.rows = rows;
  mb.seq_len = seq_len;
  const int64_t N = int64_t(rows) * seq_len;
  mb.input_ids.resize(N);
  mb.labels.resize(N);
  mb.doc_ids.resize(N);
  for (int64_t i = 0; i < N; ++i) {
    mb.input_ids[i] = int32_t(g() % vocab);
    mb.labels[i] = (g() % 7 == 0) ? kIgnoreIndex : mb.input_ids[i];
    const int r = int(i / seq_len), t = int(i % seq_len);
    mb.doc_ids[i] = (r == 0 && t >= seq_len / 2) ? 1 : 0;
    if (r == rows - 1 && t >= seq_len - 2) {  // padding
      mb.doc_ids[i] = 7;
      mb.labels[i] = kIgnoreIndex;
      mb.input_ids[i] = 0;
    }
  }
  return mb;
}

}  // namespace moetune::testing
