// dist/environment.cpp — MPI_Init_thread / MPI_Finalize as RAII, and abort_job.
#include "dist/environment.hpp"

#include <mpi.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>

#include "dist/check.hpp"

// LeakSanitizer builds: what Open MPI allocates inside MPI_Init_thread and MPI_Finalize
// (its components, MCA parameters, reduction-op tables) is never freed, by design, and
// Open MPI is built without frame pointers, so LSan cannot see those stacks to match a
// suppression. Those two calls run with leak tracking off; every other allocation, ours
// and Open MPI's, is checked (docs/hardening.md, "Sanitizers").
#if defined(__SANITIZE_ADDRESS__)
#define MOETUNE_LSAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MOETUNE_LSAN 1
#endif
#endif
#ifdef MOETUNE_LSAN
#include <dlfcn.h>
#include <sanitizer/lsan_interface.h>
#endif

namespace moetune::dist {

namespace {

// Leak tracking off for its lifetime (LeakSanitizer builds only).
struct UntrackedAllocations {
#ifdef MOETUNE_LSAN
  UntrackedAllocations() { __lsan_disable(); }
  ~UntrackedAllocations() { __lsan_enable(); }
#else
  UntrackedAllocations() {}  // user-provided: no unused-variable warning
#endif
};

bool mpi_running() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

}  // namespace

Environment::Environment(int* argc, char*** argv) {
  int initialized = 0;
  MOETUNE_MPI(MPI_Initialized, &initialized);
  if (initialized) {
    MOETUNE_MPI(MPI_Query_thread, &thread_level_);
  } else {
#ifdef MOETUNE_LSAN
    // Open MPI loads PMIx as a plugin and unloads it in MPI_Finalize, before the leak
    // check at exit, so a leak of PMIx's would be "<unknown module>" there. Pinned, it
    // keeps its name and tests/sanitizers/lsan.supp can name it (absent: no matter).
    dlopen("libpmix.so.2", RTLD_LAZY | RTLD_NODELETE);
#endif
    // A process started without mpirun (a singleton) would fork an Open MPI daemon
    // (orted) only to support MPI_Comm_spawn, which moetune never calls; that fork
    // failed once in CI under load ("Unable to start a daemon on the local node").
    // Unless the user set it, Open MPI is told not to start one. Under mpirun or another
    // launcher the singleton component is not used and the setting changes nothing.
    setenv("OMPI_MCA_ess_singleton_isolated", "1", 0);
    // An isolated singleton of Open MPI 4.1 names its session directory after job family
    // 0, so every such process on a machine creates, and at MPI_Finalize removes, the same
    // /tmp/ompi.<host>.<uid>/jf.0/1/0: one process's cleanup can delete the tree while
    // another creates it, and the other's MPI_Init fails ("orte_ess_init failed"; 2 of 240
    // starts of six concurrent loops here, and once in CI's bad-input corpus). A singleton
    // has no peer to share memory with and needs no session directory: none is made.
    // Processes started by a launcher (mpirun sets OMPI_COMM_WORLD_SIZE, PMIx PMIX_RANK)
    // keep theirs.
    if (!std::getenv("OMPI_COMM_WORLD_SIZE") && !std::getenv("PMIX_RANK") && !std::getenv("PMI_RANK"))
      setenv("OMPI_MCA_orte_create_session_dirs", "0", 0);
    const UntrackedAllocations open_mpi_internals;
    MOETUNE_MPI(MPI_Init_thread, argc, argv, MPI_THREAD_FUNNELED, &thread_level_);
    owns_ = true;
  }
  // From here on a failure must not leave MPI initialised without its finaliser.
  try {
    MOETUNE_MPI(MPI_Comm_set_errhandler, MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MOETUNE_MPI(MPI_Comm_set_errhandler, MPI_COMM_SELF, MPI_ERRORS_RETURN);
  } catch (...) {
    if (owns_) MPI_Finalize();
    throw;
  }
}

Environment::~Environment() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (owns_ && !finalized) {
    // Attribute callbacks on MPI_COMM_SELF run first inside MPI_Finalize: that is where
    // the int128 datatype and reduction op are freed (dist/datatype.cpp).
    const UntrackedAllocations open_mpi_internals;
    if (MPI_Finalize() != MPI_SUCCESS) std::fputs("warning: MPI_Finalize failed\n", stderr);
  }
}

int Environment::world_rank() {
  if (!mpi_running()) return 0;
  int rank = 0;
  MOETUNE_MPI(MPI_Comm_rank, MPI_COMM_WORLD, &rank);
  return rank;
}

int Environment::world_size() {
  if (!mpi_running()) return 1;
  int size = 1;
  MOETUNE_MPI(MPI_Comm_size, MPI_COMM_WORLD, &size);
  return size;
}

void abort_job(const std::string& message, int code) {
  const bool running = mpi_running();
  int rank = 0;
  if (running && MPI_Comm_rank(MPI_COMM_WORLD, &rank) != MPI_SUCCESS) rank = -1;
  std::cout.flush();
  std::fflush(stdout);
  // One write, so that the lines of ranks failing at the same moment do not interleave.
  const std::string line = "error: [rank " + std::to_string(rank) + "] " + message + "\n";
  std::fwrite(line.data(), 1, line.size(), stderr);
  std::fflush(stderr);
  if (running) MPI_Abort(MPI_COMM_WORLD, code);
  std::exit(code);  // MPI_Abort does not return; this is for the no-MPI case
}

}  // namespace moetune::dist
