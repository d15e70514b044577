#include "dist/fault.hpp"

#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace moetune::dist {

namespace {

// One fault spec "rank=R,step=S,when=W[,once=FILE]".
bool spec_matches(const std::string& spec, const char* when, int64_t step, int rank) {
  int64_t want_rank = -1, want_step = -1;
  std::string want_when = "after-step", once;
  std::stringstream ss(spec);
  std::string item;
  while (std::getline(ss, item, ',')) {
    const auto eq = item.find('=');
    if (eq == std::string::npos) continue;
    const std::string k = item.substr(0, eq), v = item.substr(eq + 1);
    if (k == "rank") want_rank = std::atoll(v.c_str());
    if (k == "step") want_step = std::atoll(v.c_str());
    if (k == "when") want_when = v;
    if (k == "once") once = v;
  }
  if (want_rank != rank || want_step != step || want_when != when) return false;
  if (!once.empty()) {
    if (std::filesystem::exists(once)) return false;
    std::ofstream(once) << "fired\n";
  }
  return true;
}

}  // namespace

bool fault_requested(const char* when, int64_t step, int rank) {
  const char* env = std::getenv("MOETUNE_FAULT");
  if (!env) return false;
  std::stringstream all(env);
  std::string spec;
  bool hit = false;
  while (std::getline(all, spec, ';')) hit = spec_matches(spec, when, step, rank) || hit;
  return hit;
}

void maybe_inject_fault(const char* when, int64_t step, int rank) {
  if (!fault_requested(when, step, rank)) return;
  std::fprintf(stderr, "moetune: MOETUNE_FAULT: killing rank %d at step %lld (%s)\n", rank,
               static_cast<long long>(step), when);
  std::fflush(stderr);
  ::kill(::getpid(), SIGKILL);
}

}  // namespace moetune::dist
