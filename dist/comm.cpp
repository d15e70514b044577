// dist/comm.cpp — Comm: ownership of communicators and the typed collectives
// (see dist/comm.hpp). Each collective validates its arguments locally, then makes exactly
// one checked MPI call.
#include "dist/comm.hpp"

#include <algorithm>
#include <climits>
#include <functional>
#include <string>
#include <utility>

#include "dist/check.hpp"
#include "dist/int128.hpp"
#include "moe/error.hpp"

namespace moetune::dist {

namespace {

bool mpi_running() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

[[noreturn]] void fail(const char* call, const std::string& what) {
  throw Error(std::string(call) + ": " + what);
}

// A count or displacement in elements as MPI's int; larger than INT_MAX throws.
int to_mpi_int(std::int64_t v, const char* call, const std::string& what) {
  if (v < 0) fail(call, what + " is negative (" + std::to_string(v) + ")");
  if (v > INT_MAX) {
    fail(call, what + " = " + std::to_string(v) +
                   " elements exceeds INT_MAX = " + std::to_string(INT_MAX) +
                   " (MPI counts and displacements are int); split the exchange");
  }
  return static_cast<int>(v);
}

// counts (size) in elements -> int counts and displacements (prefix sums), all checked to
// fit in int. Returns the total.
std::int64_t counts_and_displs(const std::vector<std::int64_t>& counts, int size,
                               const char* call, const char* name, std::vector<int>& out_counts,
                               std::vector<int>& out_displs) {
  if (counts.size() != static_cast<std::size_t>(size)) {
    fail(call, std::string(name) + " has " + std::to_string(counts.size()) +
                   " entries, expected one per rank (" + std::to_string(size) + ")");
  }
  out_counts.resize(counts.size());
  out_displs.resize(counts.size());
  std::int64_t total = 0;
  // The entry's name is only built for an error (this runs on every exchange).
  const auto entry = [&](std::size_t r) { return std::string(name) + "[" + std::to_string(r) + "]"; };
  for (std::size_t r = 0; r < counts.size(); ++r) {
    if (counts[r] < 0 || counts[r] > INT_MAX) to_mpi_int(counts[r], call, entry(r));  // throws
    if (total > INT_MAX) to_mpi_int(total, call, "displacement of " + entry(r));     // throws
    out_counts[r] = static_cast<int>(counts[r]);
    out_displs[r] = static_cast<int>(total);
    total += counts[r];
  }
  return total;
}

void check_size(const char* call, const char* name, std::size_t got, std::int64_t expected,
                const std::string& why) {
  if (static_cast<std::int64_t>(got) != expected) {
    fail(call, std::string(name) + " has " + std::to_string(got) + " elements, expected " +
                   std::to_string(expected) + " (" + why + ")");
  }
}

}  // namespace

// ---- ownership ------------------------------------------------------------------------

Comm::Comm(MPI_Comm comm, bool owned) : comm_(comm), owned_(owned) {
  if (comm_ == MPI_COMM_NULL) {
    owned_ = false;
    return;
  }
  try {
    MOETUNE_MPI(MPI_Comm_rank, comm_, &rank_);
    MOETUNE_MPI(MPI_Comm_size, comm_, &size_);
  } catch (...) {
    if (owned_) MPI_Comm_free(&comm_);
    throw;
  }
}

Comm::~Comm() {
  // Never WORLD/SELF (not owned); nothing to free once MPI is finalised.
  if (owned_ && comm_ != MPI_COMM_NULL && mpi_running()) MPI_Comm_free(&comm_);
}

Comm::Comm(Comm&& other) noexcept
    : comm_(std::exchange(other.comm_, MPI_COMM_NULL)),
      owned_(std::exchange(other.owned_, false)),
      rank_(std::exchange(other.rank_, -1)),
      size_(std::exchange(other.size_, 0)) {}

Comm& Comm::operator=(Comm&& other) noexcept {
  if (this != &other) {
    Comm old(std::move(*this));  // frees what this owned
    comm_ = std::exchange(other.comm_, MPI_COMM_NULL);
    owned_ = std::exchange(other.owned_, false);
    rank_ = std::exchange(other.rank_, -1);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

Comm Comm::world() { return Comm(MPI_COMM_WORLD, false); }
Comm Comm::self() { return Comm(MPI_COMM_SELF, false); }

Comm Comm::split(int color, int key) const {
  require_valid("Comm::split");
  MPI_Comm out = MPI_COMM_NULL;
  MOETUNE_MPI(MPI_Comm_split, comm_, color, key, &out);
  return Comm(out, true);
}

Comm Comm::dup() const {
  require_valid("Comm::dup");
  MPI_Comm out = MPI_COMM_NULL;
  MOETUNE_MPI(MPI_Comm_dup, comm_, &out);
  return Comm(out, true);
}

void Comm::require_valid(const char* call) const {
  if (comm_ == MPI_COMM_NULL) fail(call, "called on a null communicator");
}

int Comm::rank() const {
  require_valid("Comm::rank");
  return rank_;
}

int Comm::size() const {
  require_valid("Comm::size");
  return size_;
}

// ---- collectives ----------------------------------------------------------------------

void Comm::barrier() const {
  require_valid("Comm::barrier (MPI_Barrier)");
  MOETUNE_MPI(MPI_Barrier, comm_);
}

namespace {

template <class T>
MPI_Op sum_op() {
  if constexpr (std::is_same_v<T, int128>) return int128_sum_op();
  else return MPI_SUM;
}

}  // namespace

template <MpiElement T>
void Comm::allreduce_sum(std::span<T> inout) const {
  constexpr const char* call = "Comm::allreduce_sum (MPI_Allreduce)";
  require_valid(call);
  const int n = to_mpi_int(static_cast<std::int64_t>(inout.size()), call, "inout.size()");
  MOETUNE_MPI(MPI_Allreduce, MPI_IN_PLACE, inout.data(), n, mpi_datatype<T>(), sum_op<T>(),
              comm_);
}

template <MpiOrderedElement T>
void Comm::allreduce_max(std::span<T> inout) const {
  constexpr const char* call = "Comm::allreduce_max (MPI_Allreduce)";
  require_valid(call);
  const int n = to_mpi_int(static_cast<std::int64_t>(inout.size()), call, "inout.size()");
  MOETUNE_MPI(MPI_Allreduce, MPI_IN_PLACE, inout.data(), n, mpi_datatype<T>(), MPI_MAX, comm_);
}

template <MpiOrderedElement T>
void Comm::allreduce_min(std::span<T> inout) const {
  constexpr const char* call = "Comm::allreduce_min (MPI_Allreduce)";
  require_valid(call);
  const int n = to_mpi_int(static_cast<std::int64_t>(inout.size()), call, "inout.size()");
  MOETUNE_MPI(MPI_Allreduce, MPI_IN_PLACE, inout.data(), n, mpi_datatype<T>(), MPI_MIN, comm_);
}

template <MpiElement T>
void Comm::broadcast(std::span<T> data, int root) const {
  constexpr const char* call = "Comm::broadcast (MPI_Bcast)";
  require_valid(call);
  if (root < 0 || root >= size_) {
    fail(call, "root " + std::to_string(root) + " is not a rank of this communicator (size " +
                   std::to_string(size_) + ")");
  }
  const int n = to_mpi_int(static_cast<std::int64_t>(data.size()), call, "data.size()");
  MOETUNE_MPI(MPI_Bcast, data.data(), n, mpi_datatype<T>(), root, comm_);
}

template <MpiElement T>
void Comm::allgather(std::span<const std::type_identity_t<T>> send, std::span<T> recv) const {
  constexpr const char* call = "Comm::allgather (MPI_Allgather)";
  require_valid(call);
  const int n = to_mpi_int(static_cast<std::int64_t>(send.size()), call, "send.size()");
  check_size(call, "recv", recv.size(), static_cast<std::int64_t>(size_) * n,
             "size() * send.size()");
  to_mpi_int(static_cast<std::int64_t>(size_) * n, call, "recv.size()");
  MOETUNE_MPI(MPI_Allgather, send.data(), n, mpi_datatype<T>(), recv.data(), n,
              mpi_datatype<T>(), comm_);
}

template <MpiElement T>
void Comm::allgatherv(std::span<const std::type_identity_t<T>> send, std::span<T> recv,
                      const std::vector<std::int64_t>& counts) const {
  constexpr const char* call = "Comm::allgatherv (MPI_Allgatherv)";
  require_valid(call);
  std::vector<int> c, d;
  const std::int64_t total = counts_and_displs(counts, size_, call, "counts", c, d);
  to_mpi_int(total, call, "sum of counts");
  check_size(call, "send", send.size(), counts[static_cast<std::size_t>(rank_)],
             "counts[rank()]");
  check_size(call, "recv", recv.size(), total, "sum of counts");
  MOETUNE_MPI(MPI_Allgatherv, send.data(), c[static_cast<std::size_t>(rank_)], mpi_datatype<T>(),
              recv.data(), c.data(), d.data(), mpi_datatype<T>(), comm_);
}

template <MpiElement T>
void Comm::allgatherv_in_place(std::span<T> buf, const std::vector<std::int64_t>& counts) const {
  constexpr const char* call = "Comm::allgatherv_in_place (MPI_Allgatherv)";
  require_valid(call);
  static thread_local std::vector<int> c, d;
  const std::int64_t total = counts_and_displs(counts, size_, call, "counts", c, d);
  check_size(call, "buf", buf.size(), total, "sum of counts");
  MOETUNE_MPI(MPI_Allgatherv, MPI_IN_PLACE, 0, mpi_datatype<T>(), buf.data(), c.data(), d.data(), mpi_datatype<T>(),
              comm_);
}

template <MpiElement T>
void Comm::alltoall(std::span<const std::type_identity_t<T>> send, std::span<T> recv) const {
  constexpr const char* call = "Comm::alltoall (MPI_Alltoall)";
  require_valid(call);
  if (send.size() % static_cast<std::size_t>(size_) != 0) {
    fail(call, "send has " + std::to_string(send.size()) +
                   " elements, not a multiple of size() = " + std::to_string(size_));
  }
  check_size(call, "recv", recv.size(), static_cast<std::int64_t>(send.size()),
             "equal to send.size()");
  const int block = to_mpi_int(static_cast<std::int64_t>(send.size()) / size_, call,
                               "block size send.size() / size()");
  to_mpi_int(static_cast<std::int64_t>(send.size()), call, "send.size()");
  MOETUNE_MPI(MPI_Alltoall, send.data(), block, mpi_datatype<T>(), recv.data(), block,
              mpi_datatype<T>(), comm_);
}

template <MpiElement T>
void Comm::alltoallv(std::span<const std::type_identity_t<T>> send,
                     const std::vector<std::int64_t>& send_counts, std::span<T> recv,
                     const std::vector<std::int64_t>& recv_counts) const {
  constexpr const char* call = "Comm::alltoallv (MPI_Alltoallv)";
  require_valid(call);
  std::vector<int> sc, sd, rc, rd;
  const std::int64_t send_total = counts_and_displs(send_counts, size_, call, "send_counts", sc, sd);
  const std::int64_t recv_total = counts_and_displs(recv_counts, size_, call, "recv_counts", rc, rd);
  check_size(call, "send", send.size(), send_total, "sum of send_counts");
  check_size(call, "recv", recv.size(), recv_total, "sum of recv_counts");
  MOETUNE_MPI(MPI_Alltoallv, send.data(), sc.data(), sd.data(), mpi_datatype<T>(), recv.data(),
              rc.data(), rd.data(), mpi_datatype<T>(), comm_);
}

template <MpiElement T>
void Comm::ialltoallv(std::span<const std::type_identity_t<T>> send, const std::vector<std::int64_t>& send_counts,
                      std::span<T> recv, const std::vector<std::int64_t>& recv_counts, Request& req) const {
  constexpr const char* call = "Comm::ialltoallv (MPI_Ialltoallv)";
  require_valid(call);
  if (req.pending()) fail(call, "the request is still pending (wait() for it first)");
  const std::int64_t send_total = counts_and_displs(send_counts, size_, call, "send_counts", req.sc_, req.sd_);
  const std::int64_t recv_total = counts_and_displs(recv_counts, size_, call, "recv_counts", req.rc_, req.rd_);
  check_size(call, "send", send.size(), send_total, "sum of send_counts");
  check_size(call, "recv", recv.size(), recv_total, "sum of recv_counts");
  MOETUNE_MPI(MPI_Ialltoallv, send.data(), req.sc_.data(), req.sd_.data(), mpi_datatype<T>(), recv.data(),
              req.rc_.data(), req.rd_.data(), mpi_datatype<T>(), comm_, &req.req_);
}

Request::~Request() {
  if (pending() && mpi_running()) MPI_Wait(&req_, MPI_STATUS_IGNORE);
}
Request::Request(Request&& other) noexcept
    : req_(std::exchange(other.req_, MPI_REQUEST_NULL)),
      sc_(std::move(other.sc_)),
      sd_(std::move(other.sd_)),
      rc_(std::move(other.rc_)),
      rd_(std::move(other.rd_)) {}
Request& Request::operator=(Request&& other) noexcept {
  if (this != &other) {
    if (pending() && mpi_running()) MPI_Wait(&req_, MPI_STATUS_IGNORE);
    req_ = std::exchange(other.req_, MPI_REQUEST_NULL);
    sc_ = std::move(other.sc_);
    sd_ = std::move(other.sd_);
    rc_ = std::move(other.rc_);
    rd_ = std::move(other.rd_);
  }
  return *this;
}
bool Request::test() {
  if (!pending()) return true;
  int done = 0;
  MOETUNE_MPI(MPI_Test, &req_, &done, MPI_STATUS_IGNORE);
  return done != 0;
}
void Request::wait() {
  if (!pending()) return;
  MOETUNE_MPI(MPI_Wait, &req_, MPI_STATUS_IGNORE);
}

template <MpiElement T>
void Comm::reduce_scatter_sum(std::span<const std::type_identity_t<T>> send, std::span<T> recv,
                              const std::vector<std::int64_t>& counts) const {
  constexpr const char* call = "Comm::reduce_scatter_sum (MPI_Reduce_scatter)";
  require_valid(call);
  std::vector<int> c, d;
  const std::int64_t total = counts_and_displs(counts, size_, call, "counts", c, d);
  to_mpi_int(total, call, "sum of counts");
  check_size(call, "send", send.size(), total, "sum of counts");
  check_size(call, "recv", recv.size(), counts[static_cast<std::size_t>(rank_)],
             "counts[rank()]");
  MOETUNE_MPI(MPI_Reduce_scatter, send.data(), recv.data(), c.data(), mpi_datatype<T>(),
              sum_op<T>(), comm_);
}

namespace {
// The two ways of summing the W blocks of a rank's reduce-scatter (rows: one pointer
// per rank, in rank order, each to len elements) into its own block, out, which may be
// one of the rows: exactly (int128 fixed point) or in rank order.
template <class T>
struct FixedSum {
  std::size_t bad = 0;
  void operator()(std::span<const T* const> rows, std::size_t len, T* out) { bad += sum_fixed_rows(rows, len, out); }
};
template <class T>
struct RankOrderSum {
  void operator()(std::span<const T* const> rows, std::size_t len, T* out) const {
    constexpr std::size_t kChunk = 1024;  // each chunk's rows all read before out is written
    T sum[kChunk];
    for (std::size_t i0 = 0; i0 < len; i0 += kChunk) {
      const std::size_t m = std::min(kChunk, len - i0);
      std::copy(rows[0] + i0, rows[0] + i0 + m, sum);
      for (std::size_t r = 1; r < rows.size(); ++r)
        for (std::size_t i = 0; i < m; ++i) sum[i] += rows[r][i0 + i];
      std::copy(sum, sum + m, out + i0);
    }
  }
};
}  // namespace

// Reduce-scatter by alltoallv: rank r receives block r (counts[r] elements) of every
// other rank's `in` and combine(rows, len, out) reduces the W blocks, its own read where
// it lies in `in` (MPI copies no block to itself). out may be in's own block (in place).
// The receive buffer (W - 1 blocks) is the calling thread's, reused from call to call.
template <class T, class Combine>
void Comm::block_reduce_scatter(std::span<const T> in, const std::vector<std::int64_t>& counts, T* out,
                                Combine&& combine) const {
  constexpr const char* call = "Comm::block_reduce_scatter (MPI_Alltoallv)";
  const auto W = static_cast<std::size_t>(size_), me = static_cast<std::size_t>(rank_);
  static thread_local std::vector<int> sc, sd, rc, rd;
  static thread_local std::vector<T> recv;
  static thread_local std::vector<const T*> rows;
  const std::int64_t total = counts_and_displs(counts, size_, call, "counts", sc, sd);
  check_size(call, "in", in.size(), total, "sum of counts");
  const auto len = static_cast<std::size_t>(counts[me]);
  to_mpi_int(std::int64_t((W - 1) * len), call, "receive buffer");
  rc.assign(W, int(len));
  rd.resize(W);
  rows.resize(W);
  recv.resize((W - 1) * len);
  for (std::size_t r = 0, k = 0; r < W; ++r) {
    if (r == me) continue;
    rd[r] = int(k * len);
    rows[r] = recv.data() + k * len;
    ++k;
  }
  sc[me] = 0;
  rc[me] = 0;
  rd[me] = 0;
  rows[me] = in.data() + sd[me];
  MOETUNE_MPI(MPI_Alltoallv, in.data(), sc.data(), sd.data(), mpi_datatype<T>(), recv.data(), rc.data(), rd.data(),
              mpi_datatype<T>(), comm_);
  combine(std::span<const T* const>(rows), len, out);
}

// block_reduce_scatter over equal blocks, each rank's sum written in place into its
// block of inout, then all-gathered in place; in pieces of at most 2^24 elements.
template <class T, class Combine>
void Comm::block_allreduce(std::span<T> inout, Combine&& combine) const {
  constexpr std::size_t kPiece = std::size_t(1) << 24;
  const auto W = static_cast<std::size_t>(size_), me = static_cast<std::size_t>(rank_);
  static thread_local std::vector<std::int64_t> block;
  block.resize(W);
  for (std::size_t p0 = 0; p0 < inout.size(); p0 += kPiece) {
    const std::size_t n = std::min(kPiece, inout.size() - p0);
    for (std::size_t r = 0; r < W; ++r) block[r] = std::int64_t(n * (r + 1) / W - n * r / W);
    const std::span<T> piece(inout.data() + p0, n);
    block_reduce_scatter(std::span<const T>(piece), block, piece.data() + n * me / W, combine);
    allgatherv_in_place(piece, block);
  }
}

template <MpiOrderedElement T>
void Comm::allreduce_sum_rank_order(std::span<T> inout) const {
  require_valid("Comm::allreduce_sum_rank_order");
  if (size_ == 1) return;
  block_allreduce(inout, RankOrderSum<T>{});
}

template <MpiOrderedElement T>
std::size_t Comm::allreduce_sum_fixed(std::span<T> inout) const {
  require_valid("Comm::allreduce_sum_fixed");
  const auto W = static_cast<std::size_t>(size_);
  if (W == 1) return round_trip_fixed(inout);
  FixedSum<T> sum;
  block_allreduce(inout, std::ref(sum));
  return sum.bad;
}

namespace {
// The local checks of reduce_scatter_sum_fixed / _rank_order, before any MPI call.
void check_reduce_scatter(const char* call, std::size_t in, std::size_t out, const std::vector<std::int64_t>& counts,
                          int size, int rank) {
  if (counts.size() != static_cast<std::size_t>(size))
    fail(call, "counts has " + std::to_string(counts.size()) + " entries, expected " + std::to_string(size));
  std::int64_t total = 0;
  for (const std::int64_t c : counts) {
    if (c < 0) fail(call, "a negative count (" + std::to_string(c) + ")");
    total += c;
  }
  check_size(call, "in", in, total, "sum of counts");
  check_size(call, "out", out, counts[static_cast<std::size_t>(rank)], "counts[rank()]");
}
}  // namespace

template <MpiOrderedElement T>
std::size_t Comm::reduce_scatter_sum_fixed(std::span<const std::type_identity_t<T>> in, std::span<T> out,
                                           const std::vector<std::int64_t>& counts) const {
  constexpr const char* call = "Comm::reduce_scatter_sum_fixed";
  require_valid(call);
  check_reduce_scatter(call, in.size(), out.size(), counts, size_, rank_);
  const auto W = static_cast<std::size_t>(size_);
  if (W == 1) {
    if (out.data() != in.data()) std::copy(in.begin(), in.end(), out.begin());
    return round_trip_fixed(out);
  }
  FixedSum<T> sum;
  block_reduce_scatter(in, counts, out.data(), std::ref(sum));
  return sum.bad;
}

template <MpiOrderedElement T>
void Comm::reduce_scatter_sum_rank_order(std::span<const std::type_identity_t<T>> in, std::span<T> out,
                                         const std::vector<std::int64_t>& counts) const {
  constexpr const char* call = "Comm::reduce_scatter_sum_rank_order";
  require_valid(call);
  check_reduce_scatter(call, in.size(), out.size(), counts, size_, rank_);
  if (size_ == 1) {
    if (out.data() != in.data()) std::copy(in.begin(), in.end(), out.begin());
    return;
  }
  block_reduce_scatter(in, counts, out.data(), RankOrderSum<T>{});
}

bool Comm::all_true(bool local) const {
  require_valid("Comm::all_true (MPI_Allreduce)");
  int value = local ? 1 : 0;
  MOETUNE_MPI(MPI_Allreduce, MPI_IN_PLACE, &value, 1, MPI_INT, MPI_LAND, comm_);
  return value != 0;
}

// ---- point-to-point -------------------------------------------------------------------

template <MpiElement T>
void Comm::send(std::span<const T> data, int dest, int tag) const {
  constexpr const char* call = "Comm::send (MPI_Send)";
  require_valid(call);
  const int n = to_mpi_int(static_cast<std::int64_t>(data.size()), call, "data.size()");
  MOETUNE_MPI(MPI_Send, data.data(), n, mpi_datatype<T>(), dest, tag, comm_);
}

namespace {

void check_received(const char* call, const MPI_Status& status, MPI_Datatype type,
                    std::size_t expected, int source) {
  int got = 0;
  MOETUNE_MPI(MPI_Get_count, &status, type, &got);
  if (got == MPI_UNDEFINED || static_cast<std::size_t>(got) != expected) {
    fail(call, "received " + (got == MPI_UNDEFINED ? std::string("a partial element count")
                                                   : std::to_string(got) + " elements") +
                   " from rank " + std::to_string(source) + ", expected " +
                   std::to_string(expected));
  }
}

}  // namespace

template <MpiElement T>
void Comm::recv(std::span<T> data, int source, int tag) const {
  constexpr const char* call = "Comm::recv (MPI_Recv)";
  require_valid(call);
  const int n = to_mpi_int(static_cast<std::int64_t>(data.size()), call, "data.size()");
  MPI_Status status;
  MOETUNE_MPI(MPI_Recv, data.data(), n, mpi_datatype<T>(), source, tag, comm_, &status);
  check_received(call, status, mpi_datatype<T>(), data.size(), source);
}

template <MpiElement T>
void Comm::sendrecv(std::span<const std::type_identity_t<T>> send_data, int dest,
                    std::span<T> recv_data, int source, int tag) const {
  constexpr const char* call = "Comm::sendrecv (MPI_Sendrecv)";
  require_valid(call);
  const int ns = to_mpi_int(static_cast<std::int64_t>(send_data.size()), call, "send_data.size()");
  const int nr = to_mpi_int(static_cast<std::int64_t>(recv_data.size()), call, "recv_data.size()");
  MPI_Status status;
  MOETUNE_MPI(MPI_Sendrecv, send_data.data(), ns, mpi_datatype<T>(), dest, tag, recv_data.data(),
              nr, mpi_datatype<T>(), source, tag, comm_, &status);
  check_received(call, status, mpi_datatype<T>(), recv_data.size(), source);
}

// ---- explicit instantiations ------------------------------------------------------------

#define MOETUNE_COMM_INSTANTIATE_ALL(T)                                                        \
  template void Comm::allreduce_sum<T>(std::span<T>) const;                                    \
  template void Comm::broadcast<T>(std::span<T>, int) const;                                   \
  template void Comm::allgather<T>(std::span<const T>, std::span<T>) const;                    \
  template void Comm::allgatherv<T>(std::span<const T>, std::span<T>,                          \
                                    const std::vector<std::int64_t>&) const;                   \
  template void Comm::allgatherv_in_place<T>(std::span<T>, const std::vector<std::int64_t>&) const; \
  template void Comm::alltoall<T>(std::span<const T>, std::span<T>) const;                     \
  template void Comm::alltoallv<T>(std::span<const T>, const std::vector<std::int64_t>&,       \
                                   std::span<T>, const std::vector<std::int64_t>&) const;      \
  template void Comm::ialltoallv<T>(std::span<const T>, const std::vector<std::int64_t>&,      \
                                    std::span<T>, const std::vector<std::int64_t>&, Request&) const; \
  template void Comm::reduce_scatter_sum<T>(std::span<const T>, std::span<T>,                  \
                                            const std::vector<std::int64_t>&) const;           \
  template void Comm::send<T>(std::span<const T>, int, int) const;                             \
  template void Comm::recv<T>(std::span<T>, int, int) const;                                   \
  template void Comm::sendrecv<T>(std::span<const T>, int, std::span<T>, int, int) const;

#define MOETUNE_COMM_INSTANTIATE_ORDERED(T)                                                    \
  template void Comm::allreduce_max<T>(std::span<T>) const;                                    \
  template void Comm::allreduce_min<T>(std::span<T>) const;

MOETUNE_COMM_INSTANTIATE_ALL(std::int32_t)
MOETUNE_COMM_INSTANTIATE_ALL(std::int64_t)
MOETUNE_COMM_INSTANTIATE_ALL(std::uint64_t)
MOETUNE_COMM_INSTANTIATE_ALL(float)
MOETUNE_COMM_INSTANTIATE_ALL(double)
MOETUNE_COMM_INSTANTIATE_ALL(int128)
MOETUNE_COMM_INSTANTIATE_ORDERED(std::int32_t)
MOETUNE_COMM_INSTANTIATE_ORDERED(std::int64_t)
MOETUNE_COMM_INSTANTIATE_ORDERED(std::uint64_t)
MOETUNE_COMM_INSTANTIATE_ORDERED(float)
MOETUNE_COMM_INSTANTIATE_ORDERED(double)
template void Comm::allreduce_sum_rank_order<float>(std::span<float>) const;
template void Comm::allreduce_sum_rank_order<double>(std::span<double>) const;
template std::size_t Comm::allreduce_sum_fixed<float>(std::span<float>) const;
template std::size_t Comm::allreduce_sum_fixed<double>(std::span<double>) const;
template std::size_t Comm::reduce_scatter_sum_fixed<float>(std::span<const float>, std::span<float>,
                                                           const std::vector<std::int64_t>&) const;
template std::size_t Comm::reduce_scatter_sum_fixed<double>(std::span<const double>, std::span<double>,
                                                            const std::vector<std::int64_t>&) const;
template void Comm::reduce_scatter_sum_rank_order<float>(std::span<const float>, std::span<float>,
                                                         const std::vector<std::int64_t>&) const;
template void Comm::reduce_scatter_sum_rank_order<double>(std::span<const double>, std::span<double>,
                                                          const std::vector<std::int64_t>&) const;

#undef MOETUNE_COMM_INSTANTIATE_ALL
#undef MOETUNE_COMM_INSTANTIATE_ORDERED

}  // namespace moetune::dist
