// dist/check.cpp — turns MPI return codes into moetune::Error (see dist/check.hpp).
#include "dist/check.hpp"

#include <mpi.h>

#include <string>

#include "moe/error.hpp"

namespace moetune::dist {

namespace {

int world_rank_or_minus_one() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  int rank = -1;
  if (initialized && !finalized && MPI_Comm_rank(MPI_COMM_WORLD, &rank) != MPI_SUCCESS) rank = -1;
  return rank;
}

}  // namespace

void check_mpi(int rc, const char* call) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  std::string message;
  if (MPI_Error_string(rc, text, &len) == MPI_SUCCESS) {
    message.assign(text, static_cast<std::size_t>(len));
  } else {
    message = "unknown MPI error code " + std::to_string(rc);
  }
  throw Error(std::string(call) + " failed on rank " + std::to_string(world_rank_or_minus_one()) +
              ": " + message);
}

}  // namespace moetune::dist
