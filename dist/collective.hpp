// Collective error handling: a phase that every rank runs (configuration, layout
// checks, data loading, checkpoint loading) either succeeds everywhere or fails
// everywhere with the same message, so the job prints one clear error and every rank
// exits non-zero without anyone waiting in a collective that will never come.
#pragma once
#include <functional>
#include <string>

#include "dist/comm.hpp"
#include "moe/error.hpp"

namespace moetune::dist {

// Thrown on every rank by run_collectively; `rank` is the lowest rank that failed.
struct CollectiveError : Error {
  CollectiveError(const std::string& what, int rank) : Error(what), rank(rank) {}
  int rank;
};

// Collective over `comm`: runs `phase` on every rank; if it threw on any rank, every
// rank throws CollectiveError with the message of the lowest failing rank.
void run_collectively(const Comm& comm, const std::function<void()>& phase);

// The second half of run_collectively, for code that has already agreed (e.g. with
// all_true) that some rank failed: every rank calls it, each with its own message ("" if
// it did not fail), and every rank throws CollectiveError with the message of the lowest
// rank whose message is not empty.
[[noreturn]] void throw_first_error(const Comm& comm, const std::string& message);

}  // namespace moetune::dist
