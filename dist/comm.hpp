// dist/comm.hpp — a move-only MPI communicator with typed collectives over spans.
//
//   Environment env(&argc, &argv);
//   Comm world = Comm::world();                       // non-owning MPI_COMM_WORLD
//   Comm half = world.split(world.rank() % 2, world.rank());   // owning, freed in ~Comm
//   std::vector<dist::int128> g(n);  ...;
//   half.allreduce_sum<dist::int128>(g);              // exact, order-independent sum
//
// Element types T: int32_t, int64_t, uint64_t, float, double, int128 (dist/datatype.hpp).
// Counts and sizes are in elements. Every MPI return code is checked (dist/check.hpp):
// failures throw moetune::Error("MPI_Xxx failed on rank R: ..."). Argument errors that
// can be seen locally (wrong span lengths, counts that do not fit MPI's int) throw
// moetune::Error naming the call BEFORE any MPI call is made, so when every rank makes the
// same mistake every rank throws and nobody is left waiting.
//
// COLLECTIVE means: every rank of the communicator must call it, in the same order as the
// other collectives, with matching arguments (same root, same total sizes). A rank that
// skips a collective (e.g. because it threw) leaves the others waiting: use abort_job
// (dist/environment.hpp) when one rank cannot continue.
#pragma once
#include <mpi.h>

#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "dist/datatype.hpp"
#include "dist/int128.hpp"

namespace moetune::dist {

// A nonblocking collective in flight (Comm::ialltoallv). wait() completes it and checks
// MPI's return code; the destructor waits for one still pending (without throwing).
// The buffers given to the call must stay alive and untouched until it completes.
// Reusable: its count arrays are kept from call to call, so a steady loop of
// post / wait allocates nothing here. Move-only.
class Request {
 public:
  Request() = default;
  ~Request();
  Request(Request&& other) noexcept;
  Request& operator=(Request&& other) noexcept;
  Request(const Request&) = delete;
  Request& operator=(const Request&) = delete;
  bool pending() const noexcept { return req_ != MPI_REQUEST_NULL; }
  void wait();
  // Lets MPI progress the exchange (MPI_Test) without blocking; true once complete.
  bool test();

 private:
  friend class Comm;
  MPI_Request req_ = MPI_REQUEST_NULL;
  std::vector<int> sc_, sd_, rc_, rd_;  // counts and displacements: MPI reads them until completion
};

class Comm {
 public:
  // A null communicator (what a moved-from Comm or split(MPI_UNDEFINED, ...) gives).
  Comm() noexcept = default;
  ~Comm();
  Comm(Comm&& other) noexcept;
  Comm& operator=(Comm&& other) noexcept;
  Comm(const Comm&) = delete;
  Comm& operator=(const Comm&) = delete;

  // Non-owning wrappers of MPI_COMM_WORLD / MPI_COMM_SELF (never freed).
  static Comm world();
  static Comm self();

  // COLLECTIVE. Ranks with the same color form a new communicator, ordered by key (then
  // by rank here). color == kUndefinedColor gives this rank a null Comm. Owning.
  static constexpr int kUndefinedColor = MPI_UNDEFINED;
  Comm split(int color, int key) const;
  // COLLECTIVE. A new owning communicator with the same group (its own message space).
  Comm dup() const;

  bool is_null() const noexcept { return comm_ == MPI_COMM_NULL; }
  bool owns() const noexcept { return owned_; }
  int rank() const;  // throws moetune::Error on a null Comm
  int size() const;  // throws moetune::Error on a null Comm
  MPI_Comm raw() const noexcept { return comm_; }

  // COLLECTIVE. Waits for every rank.
  void barrier() const;

  // COLLECTIVE, in place: inout[i] = sum over ranks of inout[i]. All ranks pass the same
  // length. For int128 the sum is exact (wrapping, dist/int128.hpp), hence bit-identical
  // whatever order/tree MPI uses: moetune's deterministic gradient reduction.
  template <MpiElement T>
  void allreduce_sum(std::span<T> inout) const;
  // COLLECTIVE, in place: element-wise max / min over ranks (not for int128).
  template <MpiOrderedElement T>
  void allreduce_max(std::span<T> inout) const;
  template <MpiOrderedElement T>
  void allreduce_min(std::span<T> inout) const;

  // COLLECTIVE: data on every rank becomes data of rank `root`. Same length on all ranks.
  template <MpiElement T>
  void broadcast(std::span<T> data, int root) const;

  // COLLECTIVE: recv = concatenation over ranks r of rank r's send (all of the same
  // length). recv (size() * send.size()).
  template <MpiElement T>
  void allgather(std::span<const std::type_identity_t<T>> send, std::span<T> recv) const;

  // COLLECTIVE: recv = concatenation over ranks r of rank r's send, of counts[r]
  // elements. counts (size()), the same on every rank; send (counts[rank()]),
  // recv (sum counts).
  template <MpiElement T>
  void allgatherv(std::span<const std::type_identity_t<T>> send, std::span<T> recv,
                  const std::vector<std::int64_t>& counts) const;

  // COLLECTIVE, in place (MPI_IN_PLACE): buf (sum counts) is cut into blocks of counts[r]
  // elements in rank order; each rank's block r = rank() is sent to every other rank,
  // where it overwrites block r. counts (size()), the same on every rank.
  template <MpiElement T>
  void allgatherv_in_place(std::span<T> buf, const std::vector<std::int64_t>& counts) const;

  // COLLECTIVE: equal blocks. send (size() * B) holds block d for rank d; recv (size() * B)
  // receives block s from rank s. send.size() % size() == 0, recv.size() == send.size().
  template <MpiElement T>
  void alltoall(std::span<const std::type_identity_t<T>> send, std::span<T> recv) const;

  // COLLECTIVE: uneven blocks. send_counts[d] elements go to rank d, taken in rank order
  // from send (sum send_counts); recv_counts[s] elements arrive from rank s, stored in
  // rank order in recv (sum recv_counts). Displacements are the prefix sums. Rank s's
  // send_counts[d] must equal rank d's recv_counts[s]. Zero counts are fine. Counts and
  // their sums must fit in int (MPI's counts): larger throws moetune::Error.
  template <MpiElement T>
  void alltoallv(std::span<const std::type_identity_t<T>> send,
                 const std::vector<std::int64_t>& send_counts, std::span<T> recv,
                 const std::vector<std::int64_t>& recv_counts) const;

  // COLLECTIVE, nonblocking: alltoallv started (MPI_Ialltoallv); req.wait() completes it.
  // The same arguments, checks and results as alltoallv. `req` must not be pending.
  template <MpiElement T>
  void ialltoallv(std::span<const std::type_identity_t<T>> send, const std::vector<std::int64_t>& send_counts,
                  std::span<T> recv, const std::vector<std::int64_t>& recv_counts, Request& req) const;

  // COLLECTIVE (MPI_Reduce_scatter): the element-wise sum over ranks of send
  // (sum counts) is split into blocks of counts[r] elements; rank r gets block r in recv
  // (counts[rank()]). counts (size()), the same on every rank. int128: exact sum.
  template <MpiElement T>
  void reduce_scatter_sum(std::span<const std::type_identity_t<T>> send, std::span<T> recv,
                          const std::vector<std::int64_t>& counts) const;

  // COLLECTIVE, in place, float / double: inout[i] = ((v_0 + v_1) + v_2) + ... + v_{W-1}
  // over the ranks' values in rank order, the same bits on every rank and from run to
  // run (MPI_Allreduce's order is its own). A reduce-scatter then an all-gather: rank r
  // sums block r of every rank's buffer (alltoallv), then the blocks are all-gathered;
  // the buffer goes in pieces of at most 2^24 elements. parallel.reduction = "fp32".
  template <MpiOrderedElement T>
  void allreduce_sum_rank_order(std::span<T> inout) const;

  // COLLECTIVE, in place, float / double: inout[i] = the exact sum of the ranks' values
  // in int128 fixed point (dist/int128.hpp sum_fixed_rows), bit for bit what add_fixed
  // of each rank's value, allreduce_sum<int128> and load_fixed give, whatever the rank
  // count; the same reduce-scatter + all-gather as above, so 4 bytes per element go
  // each way instead of an all-reduce of 16. Returns how many non-finite or out-of-range
  // values this rank met in the block it summed (combine the verdict over ranks).
  // The exact gradient reduction when each rank holds one leaf per element.
  template <MpiOrderedElement T>
  std::size_t allreduce_sum_fixed(std::span<T> inout) const;

  // COLLECTIVE, float / double: out = block rank() of the sum over ranks of `in`, as
  // allreduce_sum_fixed (exact) or allreduce_sum_rank_order (rank order) computes it,
  // without the all-gather: `in` (sum counts) is cut into blocks of counts[r] elements
  // in rank order, out (counts[rank()]); counts (size()), the same on every rank. out
  // may be in's own block (the counts[rank()] elements at its offset: the sum in place)
  // but must not overlap `in` otherwise. The gradient reduction of ZeRO-1, where a rank
  // needs the sum of its own shard only.
  // reduce_scatter_sum_fixed returns the non-finite or out-of-range values met in this
  // rank's block (combine the verdict over ranks).
  template <MpiOrderedElement T>
  std::size_t reduce_scatter_sum_fixed(std::span<const std::type_identity_t<T>> in, std::span<T> out,
                                       const std::vector<std::int64_t>& counts) const;
  template <MpiOrderedElement T>
  void reduce_scatter_sum_rank_order(std::span<const std::type_identity_t<T>> in, std::span<T> out,
                                     const std::vector<std::int64_t>& counts) const;

  // COLLECTIVE: logical AND of `local` over ranks (a verdict combiner: "did every rank
  // succeed?").
  bool all_true(bool local) const;

  // Point-to-point, blocking. recv requires a message of exactly data.size() elements
  // (shorter or longer throws moetune::Error). dest/source are ranks of this communicator.
  template <MpiElement T>
  void send(std::span<const T> data, int dest, int tag) const;
  template <MpiElement T>
  void send(std::span<T> data, int dest, int tag) const {
    send(std::span<const T>(data), dest, tag);
  }
  template <MpiElement T>
  void recv(std::span<T> data, int source, int tag) const;
  // Send to dest and receive from source in one deadlock-free step (rings, shifts).
  template <MpiElement T>
  void sendrecv(std::span<const std::type_identity_t<T>> send_data, int dest,
                std::span<T> recv_data, int source, int tag) const;

 private:
  Comm(MPI_Comm comm, bool owned);
  void require_valid(const char* call) const;
  // The reduce-scatter of the allreduce_sum_* / reduce_scatter_sum_* pairs, and the
  // reduce-scatter + all-gather of allreduce_sum_* (dist/comm.cpp). No block is copied
  // to its own rank: a rank sums its own block where it lies, in place if asked.
  template <class T, class Combine>
  void block_reduce_scatter(std::span<const T> in, const std::vector<std::int64_t>& counts, T* out,
                            Combine&& combine) const;
  template <class T, class Combine>
  void block_allreduce(std::span<T> inout, Combine&& combine) const;

  MPI_Comm comm_ = MPI_COMM_NULL;
  bool owned_ = false;
  int rank_ = -1;
  int size_ = 0;
};

}  // namespace moetune::dist
