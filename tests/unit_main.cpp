// GoogleTest main of the single-process suite: MPI is initialised once (the trainer
// always runs on a process grid, here a one-rank job), then every test runs.
#include <gtest/gtest.h>

#include "dist/environment.hpp"

int main(int argc, char** argv) {
  moetune::dist::Environment env(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
