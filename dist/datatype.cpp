// dist/datatype.cpp — MPI datatypes of the element types, and the int128 type and sum op
// (created once, freed at MPI_Finalize).
#include "dist/datatype.hpp"

#include <cstring>

#include "dist/check.hpp"

namespace moetune::dist {

namespace {

static_assert(sizeof(int128) == 16);

struct Int128Handles {
  MPI_Datatype type = MPI_DATATYPE_NULL;
  MPI_Op sum = MPI_OP_NULL;
};

Int128Handles& int128_handles() {
  static Int128Handles handles;
  return handles;
}

// The user reduction: inout[i] = in[i] + inout[i] (mod 2^128). MPI's buffers need not be
// 16-byte aligned, hence memcpy. Integer addition is exact, so MPI may apply it in any
// order/tree and the result is the same bits: this is why the op can be commutative.
void int128_sum(void* in, void* inout, int* len, MPI_Datatype*) {
  auto* a = static_cast<const unsigned char*>(in);
  auto* b = static_cast<unsigned char*>(inout);
  for (int i = 0; i < *len; ++i, a += 16, b += 16) {
    int128 x, y;
    std::memcpy(&x, a, 16);
    std::memcpy(&y, b, 16);
    const int128 s = fixed_add(x, y);
    std::memcpy(b, &s, 16);
  }
}

// Delete callback of the MPI_COMM_SELF attribute: runs at the start of MPI_Finalize.
int free_int128_handles(MPI_Comm, int, void*, void*) {
  Int128Handles& h = int128_handles();
  int rc = MPI_SUCCESS;
  if (h.sum != MPI_OP_NULL && MPI_Op_free(&h.sum) != MPI_SUCCESS) rc = MPI_ERR_OTHER;
  if (h.type != MPI_DATATYPE_NULL && MPI_Type_free(&h.type) != MPI_SUCCESS) rc = MPI_ERR_OTHER;
  h = Int128Handles{};
  return rc;
}

// Lazily creates the datatype and op. Thread level FUNNELED: only one thread calls MPI.
Int128Handles& ensure_int128() {
  Int128Handles& h = int128_handles();
  if (h.type != MPI_DATATYPE_NULL) return h;
  MPI_Datatype type = MPI_DATATYPE_NULL;
  MOETUNE_MPI(MPI_Type_contiguous, 16, MPI_BYTE, &type);
  MOETUNE_MPI(MPI_Type_commit, &type);
  MPI_Op op = MPI_OP_NULL;
  MOETUNE_MPI(MPI_Op_create, &int128_sum, /*commute=*/1, &op);
  h.type = type;
  h.sum = op;
  int keyval = MPI_KEYVAL_INVALID;
  MOETUNE_MPI(MPI_Comm_create_keyval, MPI_COMM_NULL_COPY_FN, &free_int128_handles, &keyval,
              nullptr);
  MOETUNE_MPI(MPI_Comm_set_attr, MPI_COMM_SELF, keyval, nullptr);
  MOETUNE_MPI(MPI_Comm_free_keyval, &keyval);  // the attribute keeps the callback alive
  return h;
}

}  // namespace

MPI_Datatype int128_datatype() { return ensure_int128().type; }
MPI_Op int128_sum_op() { return ensure_int128().sum; }

}  // namespace moetune::dist
