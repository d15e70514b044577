// dist/datatype.hpp — which C++ element types travel over MPI, and their MPI_Datatype.
//
//   int32_t -> MPI_INT32_T, int64_t -> MPI_INT64_T, uint64_t -> MPI_UINT64_T,
//   float -> MPI_FLOAT, double -> MPI_DOUBLE,
//   int128 -> MPI_Type_contiguous(16, MPI_BYTE) with its own commutative sum MPI_Op.
//
// The int128 datatype and op are created on first use and freed inside MPI_Finalize
// (an attribute on MPI_COMM_SELF whose delete callback frees them).
#pragma once
#include <mpi.h>

#include <concepts>
#include <cstdint>

#include "dist/int128.hpp"

namespace moetune::dist {

// Element types of every Comm collective.
template <class T>
concept MpiElement = std::same_as<T, std::int32_t> || std::same_as<T, std::int64_t> ||
                     std::same_as<T, std::uint64_t> || std::same_as<T, float> ||
                     std::same_as<T, double> || std::same_as<T, int128>;

// Element types with an ordering MPI knows (MPI_MAX / MPI_MIN): all but int128.
template <class T>
concept MpiOrderedElement = MpiElement<T> && !std::same_as<T, int128>;

// The 16-byte int128 datatype and its commutative exact (wrapping) sum op.
// Both require MPI to be initialised.
MPI_Datatype int128_datatype();
MPI_Op int128_sum_op();

// The MPI datatype of one T.
template <MpiElement T>
MPI_Datatype mpi_datatype() {
  if constexpr (std::same_as<T, std::int32_t>) return MPI_INT32_T;
  else if constexpr (std::same_as<T, std::int64_t>) return MPI_INT64_T;
  else if constexpr (std::same_as<T, std::uint64_t>) return MPI_UINT64_T;
  else if constexpr (std::same_as<T, float>) return MPI_FLOAT;
  else if constexpr (std::same_as<T, double>) return MPI_DOUBLE;
  else return int128_datatype();
}

}  // namespace moetune::dist
