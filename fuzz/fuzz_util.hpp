// What the fuzz harnesses share: a per-process scratch directory for parsers that
// read a path, and the contract check. Every harness feeds its input to a real
// parser; moetune::Error is the expected answer to bad input and is swallowed.
// Anything else (a crash, a sanitizer report, another exception escaping) is a bug
// in the parser, reported by libFuzzer (or by replay_main in the GCC build).
#pragma once
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "moe/error.hpp"

namespace moetune::fuzz {

// <$TMPDIR or /tmp>/moetune-fuzz-XXXXXX, created once per process and removed at exit.
inline const std::string& scratch_dir() {
  static const std::string dir = [] {
    const char* tmp = std::getenv("TMPDIR");
    std::string templ = std::string(tmp && *tmp ? tmp : "/tmp") + "/moetune-fuzz-XXXXXX";
    if (!::mkdtemp(templ.data())) {
      std::perror(("fuzz: mkdtemp " + templ).c_str());
      std::abort();
    }
    static std::string removed_at_exit;
    removed_at_exit = templ;
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(removed_at_exit, ec);
    });
    return templ;
  }();
  return dir;
}

// scratch_dir()/name, a directory created on first use (for parsers that take a directory).
inline std::string scratch_subdir(const std::string& name) {
  const std::string d = scratch_dir() + "/" + name;
  std::filesystem::create_directories(d);
  return d;
}

// Writes the bytes to `path` (truncating it) and returns the path.
inline std::string write_file(const std::string& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  out.close();
  if (!out) {
    std::fprintf(stderr, "fuzz: cannot write %s\n", path.c_str());
    std::abort();
  }
  return path;
}

// Writes the input to scratch_dir()/name and returns the path.
inline std::string write_input(const std::string& name, const uint8_t* data, size_t size) {
  return write_file(scratch_dir() + "/" + name, std::string_view(reinterpret_cast<const char*>(data), size));
}

// Runs fn(); a moetune::Error (a clean rejection) is fine. Other exceptions escape on
// purpose: libFuzzer reports them as an uncaught exception. MOETUNE_FUZZ_VERBOSE=1
// prints every rejection (to check what a corpus file exercises).
template <class F>
void parse_or_reject(F&& fn) {
  static const bool verbose = std::getenv("MOETUNE_FUZZ_VERBOSE") != nullptr;
  try {
    fn();
    if (verbose) std::fprintf(stderr, "  accepted\n");
  } catch (const moetune::Error& e) {
    if (verbose) std::fprintf(stderr, "  rejected: %s\n", e.what());
  }
}

// An invariant of a successful parse failed: a bug.
[[noreturn]] inline void invariant_failed(const std::string& what) {
  std::fprintf(stderr, "fuzz: invariant violated: %s\n", what.c_str());
  std::abort();
}

// The input split at its first NUL byte: (before, after). JSON never contains a raw NUL,
// so harnesses use the part after it for extra arguments (e.g. --set overrides).
inline std::pair<std::string_view, std::string_view> split_at_nul(const uint8_t* data, size_t size) {
  const std::string_view all(reinterpret_cast<const char*>(data), size);
  const size_t nul = all.find('\0');
  if (nul == std::string_view::npos) return {all, {}};
  return {all.substr(0, nul), all.substr(nul + 1)};
}

// Calls f(line) for every line of `text` (the override lines after the NUL byte).
template <class F>
void for_each_line(std::string_view text, F&& f) {
  size_t at = 0;
  while (at < text.size()) {
    size_t end = text.find('\n', at);
    if (end == std::string_view::npos) end = text.size();
    f(std::string(text.substr(at, end - at)));
    at = end + 1;
  }
}

// A config that loaded (ModelConfig or RunConfig) must reload unchanged from its own
// to_json(): that is how checkpoints and trainer_state.json store it.
template <class Config>
void check_round_trip(const Config& c, const char* what) {
  const nlohmann::json j = c.to_json();
  Config back;
  try {
    back = Config::from_json(j, "round trip");
  } catch (const Error& e) {
    invariant_failed(std::string("a valid ") + what + " does not reload from its own to_json(): " + e.what());
  }
  if (back.to_json() != j) invariant_failed(std::string("to_json() -> from_json() changed the ") + what + ": " + j.dump());
}

}  // namespace moetune::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);
