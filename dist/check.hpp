// dist/check.hpp — every MPI call's return code goes through check_mpi: a non-success
// code becomes moetune::Error("MPI_Xxx failed on rank R: <MPI_Error_string>").
// This works because Environment sets MPI_ERRORS_RETURN on MPI_COMM_WORLD (inherited by
// every communicator split or duplicated from it), so MPI returns codes instead of
// aborting.
#pragma once

namespace moetune::dist {

// Throws moetune::Error if rc != MPI_SUCCESS; `call` is the MPI function's name.
// R is the rank in MPI_COMM_WORLD (-1 if MPI is not running).
void check_mpi(int rc, const char* call);

}  // namespace moetune::dist

// MOETUNE_MPI(MPI_Barrier, comm) == check_mpi(MPI_Barrier(comm), "MPI_Barrier").
#define MOETUNE_MPI(fn, ...) ::moetune::dist::check_mpi(fn(__VA_ARGS__), #fn)
