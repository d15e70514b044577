// tests/mpi/mpi_main.cpp — GoogleTest main for tests run under mpirun.
//
// Every rank runs every test. Rank 0 prints gtest's usual report; the other ranks print
// only their failed assertions, prefixed "[rank R]". After each test the ranks compare
// verdicts (rank 0 prints which ranks failed it), and at the end the verdict of the whole
// run is combined with Comm::all_true: the process exits non-zero on EVERY rank if ANY
// rank failed, so mpirun, and hence ctest, report the failure.
//
// Writing MPI tests: every rank must make the same collective calls in the same order.
// Prefer EXPECT_* (which continue) to ASSERT_* before a collective; an ASSERT that fails
// on one rank only leaves the others waiting (the ctest TIMEOUT then ends the run).
#include <gtest/gtest.h>

#include <cstdint>
#include <exception>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "dist/comm.hpp"
#include "dist/environment.hpp"

namespace {

using moetune::dist::Comm;

// "1 3" for the ranks whose flag is 0.
std::string failed_ranks(const std::vector<std::int32_t>& ok) {
  std::ostringstream s;
  for (std::size_t r = 0; r < ok.size(); ++r) {
    if (!ok[r]) s << (s.tellp() > 0 ? " " : "") << r;
  }
  return s.str();
}

// Ranks > 0 have no gtest printer: this shows their failures (to stderr, unbuffered).
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  // The test's name is kept here: UnitTest::current_test_info() may not be called from
  // OnTestPartResult (gtest holds its own mutex there).
  void OnTestStart(const ::testing::TestInfo& info) override {
    test_ = std::string(info.test_suite_name()) + "." + info.name();
  }
  void OnTestEnd(const ::testing::TestInfo&) override { test_.clear(); }
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::ostringstream s;
    s << "[rank " << rank_ << "] ";
    if (!test_.empty()) s << test_ << " ";
    s << (result.file_name() ? result.file_name() : "unknown file") << ":"
      << result.line_number() << ": Failure\n"
      << result.message() << "\n";
    std::cerr << s.str() << std::flush;
  }

 private:
  int rank_;
  std::string test_;
};

// After each test: gather every rank's verdict; rank 0 names the ranks that failed.
class TestVerdictSync : public ::testing::EmptyTestEventListener {
 public:
  void OnTestEnd(const ::testing::TestInfo& info) override {
    try {
      const Comm world = Comm::world();
      const std::int32_t mine = info.result()->Failed() ? 0 : 1;
      std::vector<std::int32_t> ok(static_cast<std::size_t>(world.size()));
      world.allgather<std::int32_t>(std::span<const std::int32_t>(&mine, 1), ok);
      const std::string failed = failed_ranks(ok);
      if (world.rank() == 0 && !failed.empty()) {
        std::cout << "[   MPI    ] " << info.test_suite_name() << "." << info.name()
                  << " failed on ranks: " << failed << std::endl;
      }
    } catch (const std::exception& e) {
      moetune::dist::abort_job(std::string("test verdict exchange failed: ") + e.what());
    }
  }
};

}  // namespace

int main(int argc, char** argv) {
  moetune::dist::Environment env(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  try {
    const Comm world = Comm::world();
    const int rank = world.rank();
    ::testing::TestEventListeners& listeners = ::testing::UnitTest::GetInstance()->listeners();
    if (rank != 0) {
      delete listeners.Release(listeners.default_result_printer());
      GTEST_FLAG_SET(output, "");  // only rank 0 writes --gtest_output files
      listeners.Append(new RankFailurePrinter(rank));
    }
    listeners.Append(new TestVerdictSync);

    const bool passed = RUN_ALL_TESTS() == 0;

    const bool all_passed = world.all_true(passed);
    const std::int32_t mine = passed ? 1 : 0;
    std::vector<std::int32_t> ok(static_cast<std::size_t>(world.size()));
    world.allgather<std::int32_t>(std::span<const std::int32_t>(&mine, 1), ok);
    if (rank == 0) {
      if (all_passed) {
        std::cout << "[   MPI    ] all " << world.size() << " ranks passed" << std::endl;
      } else {
        std::cout << "[   MPI    ] FAILED on ranks: " << failed_ranks(ok) << " (of "
                  << world.size() << ")" << std::endl;
      }
    }
    return all_passed ? 0 : 1;
  } catch (const std::exception& e) {
    moetune::dist::abort_job(std::string("MPI test main: ") + e.what());
  }
}
