// dist/environment.hpp — the MPI environment of a process (RAII) and the one way to stop
// a whole job from a single rank.
//
//   int main(int argc, char** argv) {
//     moetune::dist::Environment env(&argc, &argv);   // MPI_Init_thread(FUNNELED)
//     ...                                             // Comm::world() etc.
//   }                                                 // MPI_Finalize
//
// Thread level FUNNELED: OpenMP threads may run between MPI calls, but only the thread
// that created the Environment calls MPI.
#pragma once
#include <string>

namespace moetune::dist {

class Environment {
 public:
  // Initialises MPI with MPI_THREAD_FUNNELED unless it already is (then this object owns
  // nothing and its destructor does not finalise). Sets MPI_ERRORS_RETURN on
  // MPI_COMM_WORLD and MPI_COMM_SELF so that failures come back as codes, which
  // check_mpi (dist/check.hpp) turns into moetune::Error. argc/argv may be null.
  Environment(int* argc = nullptr, char*** argv = nullptr);
  // MPI_Finalize, if this object initialised MPI and MPI is not finalised yet.
  // Collective over MPI_COMM_WORLD (as MPI_Finalize is).
  ~Environment();
  Environment(const Environment&) = delete;
  Environment& operator=(const Environment&) = delete;

  // The thread level MPI provided (MPI_THREAD_SINGLE ... MPI_THREAD_MULTIPLE).
  int thread_level() const noexcept { return thread_level_; }
  // Whether this object called MPI_Init_thread (and so will call MPI_Finalize).
  bool owns_mpi() const noexcept { return owns_; }

  // Rank / size in MPI_COMM_WORLD; 0 / 1 when MPI is not initialised or already finalised.
  static int world_rank();
  static int world_size();

 private:
  bool owns_ = false;
  int thread_level_ = 0;
};

// Prints "error: [rank R] message" to stderr, flushes, and ends the whole job with
// MPI_Abort(MPI_COMM_WORLD, code), so a failure on one rank never leaves the others
// waiting in a collective. Without a running MPI it calls std::exit(code).
[[noreturn]] void abort_job(const std::string& message, int code = 1);

}  // namespace moetune::dist
