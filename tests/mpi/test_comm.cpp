// tests/mpi/test_comm.cpp — dist::Comm collectives, communicator ownership, argument
// checks, and the int128 fixed-point helpers. Run under mpirun at -np 1, 2, 3, 4
// (tests/mpi/CMakeLists.txt); every check uses rank-dependent data, and expected values
// are recomputed locally from the same formulas each rank used.
#include <gtest/gtest.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#include "dist/comm.hpp"
#include "dist/environment.hpp"
#include "dist/int128.hpp"
#include "moe/error.hpp"

namespace {

using moetune::Error;
using moetune::dist::Comm;
using moetune::dist::Request;
using moetune::dist::int128;
using moetune::dist::uint128;
namespace dist = moetune::dist;

std::string show(int128 v) {
  if (v == 0) return "0";
  const bool neg = v < 0;
  uint128 u = neg ? -static_cast<uint128>(v) : static_cast<uint128>(v);
  std::string s;
  while (u > 0) {
    s.insert(s.begin(), static_cast<char>('0' + static_cast<int>(u % 10)));
    u /= 10;
  }
  return neg ? "-" + s : s;
}
template <class T>
std::string show(T v) {
  return std::to_string(v);
}

// Exact equality with a readable message for every element type, int128 included.
#define EXPECT_SAME(got, want) EXPECT_TRUE((got) == (want)) << show(got) << " != " << show(want)

// Rank-dependent test values. For int128 the value x * 2^70 + x does not fit in int64,
// so a reduction that went through 64 bits would be caught. Floats get small integers
// (exact sums).
template <class T>
T val(std::int64_t x) {
  if constexpr (std::is_same_v<T, int128>) return static_cast<int128>(x) * (int128{1} << 70) + x;
  else return static_cast<T>(x);
}

// EXPECT that `f` throws moetune::Error whose message contains every one of `parts`.
template <class F>
void expect_error(F&& f, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "expected moetune::Error containing '" << *parts.begin() << "'";
  } catch (const Error& e) {
    const std::string what = e.what();
    for (const std::string& p : parts) {
      EXPECT_NE(what.find(p), std::string::npos) << "message '" << what << "' lacks '" << p << "'";
    }
  }
}

// ---- typed collectives over every element type ------------------------------------------

template <class T>
class CommTyped : public ::testing::Test {};
using AllTypes = ::testing::Types<std::int32_t, std::int64_t, std::uint64_t, float, double, int128>;
TYPED_TEST_SUITE(CommTyped, AllTypes);

template <class T>
class CommOrdered : public ::testing::Test {};
using OrderedTypes = ::testing::Types<std::int32_t, std::int64_t, std::uint64_t, float, double>;
TYPED_TEST_SUITE(CommOrdered, OrderedTypes);

TYPED_TEST(CommTyped, AllreduceSum) {
  using T = TypeParam;
  const Comm world = Comm::world();
  const int n = 5;
  std::vector<T> x(n);
  for (int i = 0; i < n; ++i) x[i] = val<T>(world.rank() * 10 + i + 1);
  world.allreduce_sum<T>(x);
  for (int i = 0; i < n; ++i) {
    T want{};
    for (int r = 0; r < world.size(); ++r) want += val<T>(r * 10 + i + 1);
    EXPECT_SAME(x[i], want);
  }
  std::vector<T> empty;  // zero elements: a valid no-op
  world.allreduce_sum<T>(empty);
}

TYPED_TEST(CommOrdered, AllreduceMaxMin) {
  using T = TypeParam;
  const Comm world = Comm::world();
  const int n = 6;
  auto f = [](int r, int i) { return val<T>((r * 37 + i * 11) % 17); };
  std::vector<T> mx(n), mn(n);
  for (int i = 0; i < n; ++i) mx[i] = mn[i] = f(world.rank(), i);
  world.allreduce_max<T>(mx);
  world.allreduce_min<T>(mn);
  for (int i = 0; i < n; ++i) {
    T want_max = f(0, i), want_min = f(0, i);
    for (int r = 1; r < world.size(); ++r) {
      want_max = std::max(want_max, f(r, i));
      want_min = std::min(want_min, f(r, i));
    }
    EXPECT_SAME(mx[i], want_max);
    EXPECT_SAME(mn[i], want_min);
  }
}

TYPED_TEST(CommTyped, BroadcastFromEveryRoot) {
  using T = TypeParam;
  const Comm world = Comm::world();
  for (int root = 0; root < world.size(); ++root) {
    std::vector<T> x(4);
    for (int i = 0; i < 4; ++i) x[i] = val<T>(world.rank() * 100 + i);
    world.broadcast<T>(x, root);
    for (int i = 0; i < 4; ++i) EXPECT_SAME(x[i], val<T>(root * 100 + i));
  }
}

TYPED_TEST(CommTyped, Allgather) {
  using T = TypeParam;
  const Comm world = Comm::world();
  std::vector<T> send(3), recv(3 * world.size());
  for (int i = 0; i < 3; ++i) send[i] = val<T>(world.rank() * 10 + i);
  world.allgather<T>(send, recv);
  for (int r = 0; r < world.size(); ++r)
    for (int i = 0; i < 3; ++i) EXPECT_SAME(recv[r * 3 + i], val<T>(r * 10 + i));
}

TYPED_TEST(CommTyped, AllgathervUnevenWithZeroCount) {
  using T = TypeParam;
  const Comm world = Comm::world();
  std::vector<std::int64_t> counts(world.size());
  for (int r = 0; r < world.size(); ++r) counts[r] = (r + 1) % 3;  // 1, 2, 0, 1: rank 2 sends nothing
  std::vector<T> send(counts[world.rank()]);
  for (std::size_t i = 0; i < send.size(); ++i) send[i] = val<T>(world.rank() * 10 + i);
  std::vector<T> recv(std::accumulate(counts.begin(), counts.end(), std::int64_t{0}));
  world.allgatherv<T>(send, recv, counts);
  std::size_t k = 0;
  for (int r = 0; r < world.size(); ++r)
    for (std::int64_t i = 0; i < counts[r]; ++i) EXPECT_SAME(recv[k++], val<T>(r * 10 + i));
  EXPECT_EQ(k, recv.size());
}

TYPED_TEST(CommTyped, AllgathervInPlaceUnevenWithZeroCount) {
  using T = TypeParam;
  const Comm world = Comm::world();
  std::vector<std::int64_t> counts(world.size());
  for (int r = 0; r < world.size(); ++r) counts[r] = (r + 1) % 3;
  std::vector<T> buf(std::accumulate(counts.begin(), counts.end(), std::int64_t{0}), val<T>(-1));
  std::size_t k = 0;  // this rank fills its own block only
  for (int r = 0; r < world.rank(); ++r) k += std::size_t(counts[r]);
  for (std::int64_t i = 0; i < counts[world.rank()]; ++i) buf[k + std::size_t(i)] = val<T>(world.rank() * 10 + i);
  world.allgatherv_in_place<T>(buf, counts);
  k = 0;
  for (int r = 0; r < world.size(); ++r)
    for (std::int64_t i = 0; i < counts[r]; ++i) EXPECT_SAME(buf[k++], val<T>(r * 10 + i));
  EXPECT_EQ(k, buf.size());
}

TYPED_TEST(CommTyped, AlltoallEqualBlocks) {
  using T = TypeParam;
  const Comm world = Comm::world();
  const int p = world.size(), me = world.rank(), b = 2;
  std::vector<T> send(p * b), recv(p * b);
  for (int d = 0; d < p; ++d)
    for (int j = 0; j < b; ++j) send[d * b + j] = val<T>(1000 * me + 10 * d + j);
  world.alltoall<T>(send, recv);
  for (int s = 0; s < p; ++s)
    for (int j = 0; j < b; ++j) EXPECT_SAME(recv[s * b + j], val<T>(1000 * s + 10 * me + j));
}

// Elements rank s sends to rank d. With 2+ ranks, rank 0 sends nothing and the last rank
// receives nothing; other pairs get 0..3 elements.
std::int64_t a2av_count(int s, int d, int p) {
  if (p == 1) return 3;
  if (s == 0 || d == p - 1) return 0;
  return (3 * s + d) % 4;
}

TYPED_TEST(CommTyped, AlltoallvUnevenAndZeroCounts) {
  using T = TypeParam;
  const Comm world = Comm::world();
  const int p = world.size(), me = world.rank();
  std::vector<std::int64_t> sc(p), rc(p);
  for (int r = 0; r < p; ++r) {
    sc[r] = a2av_count(me, r, p);
    rc[r] = a2av_count(r, me, p);
  }
  const std::int64_t ns = std::accumulate(sc.begin(), sc.end(), std::int64_t{0});
  const std::int64_t nr = std::accumulate(rc.begin(), rc.end(), std::int64_t{0});
  if (p > 1 && me == 0) {
    EXPECT_EQ(ns, 0);  // the rank that sends nothing
  }
  if (p > 1 && me == p - 1) {
    EXPECT_EQ(nr, 0);  // the rank that receives nothing
  }
  std::vector<T> send(ns);
  std::size_t k = 0;
  for (int d = 0; d < p; ++d)
    for (std::int64_t j = 0; j < sc[d]; ++j) send[k++] = val<T>(1000 * me + 100 * d + j);
  // Blocking, then nonblocking twice on one Request (it is reusable), with work between
  // the post and the wait as the all-to-all expert stage does.
  Request req;
  for (int round = 0; round < 3; ++round) {
    SCOPED_TRACE(round == 0 ? "alltoallv" : "ialltoallv");
    std::vector<T> recv(nr);
    if (round == 0) {
      world.alltoallv<T>(send, sc, recv, rc);
    } else {
      world.ialltoallv<T>(send, sc, recv, rc, req);
      volatile double work = 0;
      for (int i = 0; i < 100000; ++i) work = work + 1e-3 * i;
      req.wait();
      EXPECT_FALSE(req.pending());
    }
    k = 0;
    for (int s = 0; s < p; ++s)
      for (std::int64_t j = 0; j < rc[s]; ++j) EXPECT_SAME(recv[k++], val<T>(1000 * s + 100 * me + j));
  }
}

TYPED_TEST(CommTyped, ReduceScatterSum) {
  using T = TypeParam;
  const Comm world = Comm::world();
  const int p = world.size(), me = world.rank();
  std::vector<std::int64_t> counts(p);
  for (int r = 0; r < p; ++r) counts[r] = (r + 2) % 3;  // 2, 0, 1, 2: rank 1 gets nothing
  const std::int64_t total = std::accumulate(counts.begin(), counts.end(), std::int64_t{0});
  std::vector<T> send(total);
  for (std::int64_t i = 0; i < total; ++i) send[i] = val<T>(me * 7 + i + 1);
  std::vector<T> recv(counts[me]);
  world.reduce_scatter_sum<T>(send, recv, counts);
  const std::int64_t offset = std::accumulate(counts.begin(), counts.begin() + me, std::int64_t{0});
  for (std::int64_t j = 0; j < counts[me]; ++j) {
    T want{};
    for (int r = 0; r < p; ++r) want += val<T>(r * 7 + offset + j + 1);
    EXPECT_SAME(recv[j], want);
  }
}

TYPED_TEST(CommTyped, SendRecvRing) {
  using T = TypeParam;
  const Comm world = Comm::world();
  const int p = world.size(), me = world.rank();
  if (p == 1) GTEST_SKIP() << "a blocking ring needs 2+ ranks (SendrecvRing covers -np 1)";
  const int next = (me + 1) % p, prev = (me + p - 1) % p;
  std::vector<T> out(4), in(4);
  for (int i = 0; i < 4; ++i) out[i] = val<T>(me * 10 + i);
  // Even ranks send first, odd ranks receive first: no cycle of blocked senders.
  if (me % 2 == 0) {
    world.send<T>(out, next, 7);
    world.recv<T>(in, prev, 7);
  } else {
    world.recv<T>(in, prev, 7);
    world.send<T>(out, next, 7);
  }
  for (int i = 0; i < 4; ++i) EXPECT_SAME(in[i], val<T>(prev * 10 + i));
}

TYPED_TEST(CommTyped, SendrecvRing) {
  using T = TypeParam;
  const Comm world = Comm::world();
  const int p = world.size(), me = world.rank();
  const int next = (me + 1) % p, prev = (me + p - 1) % p;
  std::vector<T> out(3), in(3);
  for (int i = 0; i < 3; ++i) out[i] = val<T>(me * 10 + i + 5);
  world.sendrecv<T>(out, next, in, prev, 3);
  for (int i = 0; i < 3; ++i) EXPECT_SAME(in[i], val<T>(prev * 10 + i + 5));
}

// ---- values a 64-bit or floating-point reduction would get wrong ------------------------

TEST(CommInt128, SumBeyondInt64IsExact) {
  const Comm world = Comm::world();
  const int p = world.size(), me = world.rank();
  // Each contribution exceeds int64 by far, and the low bits must survive next to 2^120.
  auto f = [](int r, int i) -> int128 {
    return (int128{1} << 120) / (r + 2) * (i % 2 == 0 ? 1 : -1) + (int128{r} << 64) + r * 3 + i;
  };
  std::vector<int128> x(4);
  for (int i = 0; i < 4; ++i) x[i] = f(me, i);
  world.allreduce_sum<int128>(x);
  for (int i = 0; i < 4; ++i) {
    int128 want = 0;
    for (int r = 0; r < p; ++r) want += f(r, i);
    EXPECT_SAME(x[i], want);
  }
}

TEST(CommInt128, FixedPointSumIsExactWhereDoubleRounds) {
  // Values in rank order: 2^25 (rank 0), eight 2^-29 per rank, -2^25 (last rank).
  // 2^-29 is below half an ulp of 2^25, so a double sum in rank order loses every small
  // value; the fixed-point sum gives exactly 8 * size * 2^-29.
  const Comm world = Comm::world();
  const int p = world.size(), me = world.rank();
  auto values_of = [p](int r) {
    std::vector<double> v;
    if (r == 0) v.push_back(0x1p25);
    for (int k = 0; k < 8; ++k) v.push_back(0x1p-29);
    if (r == p - 1) v.push_back(-0x1p25);
    return v;
  };
  const std::vector<double> mine = values_of(me);
  // Each value in its own slot would need a gather; instead every rank sums its values into
  // one fixed-point slot, and the ranks' slots are reduced with the int128 op.
  std::vector<int128> acc(1, 0);
  for (double v : mine) {
    const std::vector<double> one{v};
    EXPECT_EQ(dist::add_fixed<double>(acc, one), 0u);
  }
  world.allreduce_sum<int128>(acc);
  const double exact = 8.0 * p * 0x1p-29;
  EXPECT_EQ(dist::from_fixed(acc[0]), exact);
  EXPECT_SAME(acc[0], static_cast<int128>(8 * p) << 71);  // 2^-29 * 2^100 = 2^71

  double in_rank_order = 0.0;
  for (int r = 0; r < p; ++r)
    for (double v : values_of(r)) in_rank_order += v;
  EXPECT_EQ(in_rank_order, 0.0);  // every small value was rounded away
  EXPECT_NE(in_rank_order, exact);
}

TEST(CommInt128, DistributedFixedSumMatchesSerialSumAtAnyRankCount) {
  // Every rank owns 257 values of mixed magnitude; the MPI sum must equal, bit for bit, the
  // serial fixed-point sum of all ranks' values (recomputed here from the same seeds),
  // whatever the rank count or MPI's reduction tree.
  const Comm world = Comm::world();
  const int p = world.size(), me = world.rank();
  if (p == 1) GTEST_SKIP() << "at -np 1 the all-reduce sum is the serial sum itself; run at -np 2+";
  const int n = 257;
  auto values_of = [n](int r) {
    std::mt19937_64 rng(1234 + r);
    std::uniform_real_distribution<double> mant(-1.0, 1.0);
    std::uniform_int_distribution<int> expo(-40, 20);
    std::vector<double> v(n);
    for (double& x : v) x = std::ldexp(mant(rng), expo(rng));
    return v;
  };
  std::vector<int128> acc(n, 0);
  EXPECT_EQ(dist::add_fixed<double>(acc, values_of(me)), 0u);
  world.allreduce_sum<int128>(acc);

  std::vector<int128> serial(n, 0);
  for (int r = 0; r < p; ++r) dist::add_fixed<double>(serial, values_of(r));
  for (int i = 0; i < n; ++i) EXPECT_SAME(acc[i], serial[i]);

  std::vector<double> out(n);
  dist::load_fixed<double>(out, acc);
  for (int i = 0; i < n; ++i) EXPECT_EQ(out[i], dist::from_fixed(serial[i]));
}

// Uneven blocks of n elements over p ranks: rank r's share grows with r, and the last
// rank gets none when p > 1 (ZeRO-1 shards can be empty).
std::vector<std::int64_t> uneven_counts(int n, int p) {
  std::vector<std::int64_t> counts(size_t(p), 0);
  const int parts = p > 1 ? (p - 1) * p / 2 : 1;
  std::int64_t given = 0;
  for (int r = 0; r < std::max(p - 1, 1); ++r) {
    counts[size_t(r)] = std::int64_t(n) * (r + 1) / parts;
    given += counts[size_t(r)];
  }
  counts[0] += n - given;
  return counts;
}

TEST(CommRankOrder, SumIsTheSerialSumInRankOrder) {
  // parallel.reduction = "fp32": the all-reduced value of every element is, bit for bit,
  // ((v_0 + v_1) + v_2) + ... in rank order, for lengths that do not divide by the rank
  // count, shorter than it, and empty.
  const Comm world = Comm::world();
  const int p = world.size(), me = world.rank();
  auto values_of = [](int r, int n) {
    std::mt19937_64 rng(99 + r);
    std::uniform_real_distribution<float> mant(-1.0f, 1.0f);
    std::uniform_int_distribution<int> expo(-20, 20);
    std::vector<float> v(n);
    for (float& x : v) x = std::ldexp(mant(rng), expo(rng));
    return v;
  };
  for (int n : {0, 1, 3, 1000, 4099}) {
    std::vector<float> x = values_of(me, n);
    world.allreduce_sum_rank_order<float>(x);
    std::vector<float> serial = values_of(0, n);
    for (int r = 1; r < p; ++r) {
      const std::vector<float> v = values_of(r, n);
      for (int i = 0; i < n; ++i) serial[i] += v[i];
    }
    ASSERT_EQ(x.size(), size_t(n));
    if (n > 0) {  // (memcmp of an empty vector's null data() is undefined behaviour)
      ASSERT_EQ(std::memcmp(x.data(), serial.data(), sizeof(float) * size_t(n)), 0) << "n = " << n << ", -np " << p;
    }
  }
  for (int n : {0, 1, 3, 1000, 4099}) {  // reduce_scatter_sum_rank_order: the block of the same sums
    const std::vector<float> x = values_of(me, n);
    std::vector<float> serial = values_of(0, n);
    for (int r = 1; r < p; ++r) {
      const std::vector<float> v = values_of(r, n);
      for (int i = 0; i < n; ++i) serial[i] += v[i];
    }
    const std::vector<std::int64_t> counts = uneven_counts(n, p);
    std::int64_t begin = 0;
    for (int r = 0; r < me; ++r) begin += counts[size_t(r)];
    std::vector<float> block(static_cast<size_t>(counts[size_t(me)]));
    world.reduce_scatter_sum_rank_order<float>(x, block, counts);
    if (!block.empty()) {
      ASSERT_EQ(std::memcmp(block.data(), serial.data() + begin, sizeof(float) * block.size()), 0)
          << "reduce-scatter, n = " << n << ", -np " << p;
    }
  }
  std::vector<double> d = {1.0 + me, 0.5};
  world.allreduce_sum_rank_order<double>(d);
  EXPECT_EQ(d[0], double(p) * (p + 1) / 2);
  EXPECT_EQ(d[1], 0.5 * p);
}

template <class T>
void check_fixed_allreduce_is_the_accumulator() {
  // The exact reduction of one leaf per rank: bit for bit add_fixed of every rank's
  // values, allreduce_sum<int128>, load_fixed, for values of every magnitude (many sums
  // that double arithmetic rounds, so both paths of sum_fixed_rows run), zeros, values
  // below the exact range, out of range and non-finite, and lengths that do not divide
  // by the rank count.
  const Comm world = Comm::world();
  const int p = world.size(), me = world.rank();
  auto values_of = [](int r, int n) {
    std::mt19937_64 rng(7 + r);
    std::uniform_real_distribution<double> mant(-1.0, 1.0);
    std::uniform_int_distribution<int> expo(-110, 27);
    std::vector<T> v(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) {
      const int kind = int(rng() % 64);
      v[size_t(i)] = kind == 0   ? T(0)
                     : kind == 1 ? std::numeric_limits<T>::infinity()
                     : kind == 2 ? -std::numeric_limits<T>::infinity()
                     : kind == 3 ? std::numeric_limits<T>::quiet_NaN()
                     : kind < 40 ? static_cast<T>(std::ldexp(mant(rng), int(rng() % 8) - 4))  // similar magnitudes
                                 : static_cast<T>(std::ldexp(mant(rng), expo(rng)));
    }
    return v;
  };
  for (int n : {0, 1, 3, 1000, 40001}) {
    std::vector<T> x = values_of(me, n);
    const size_t bad = world.allreduce_sum_fixed<T>(x);
    std::vector<int128> acc(size_t(n), 0);
    size_t want_bad = 0;
    for (int r = 0; r < p; ++r) {
      const std::vector<T> v = values_of(r, n);
      std::vector<int128> leaf(size_t(n), 0);
      try {
        dist::add_fixed<T>(leaf, v);
      } catch (const Error&) {
      }
      for (int i = 0; i < n; ++i) {
        acc[size_t(i)] = dist::fixed_add(acc[size_t(i)], leaf[size_t(i)]);
        want_bad += !std::isfinite(v[size_t(i)]) || std::fabs(v[size_t(i)]) >= T(0x1p26);
      }
    }
    std::vector<T> want(static_cast<size_t>(n));
    dist::load_fixed<T>(want, acc);
    ASSERT_EQ(x.size(), size_t(n));
    if (n > 0) {
      for (int i = 0; i < n; ++i)
        ASSERT_EQ(std::memcmp(&x[size_t(i)], &want[size_t(i)], sizeof(T)), 0)
            << "element " << i << " of " << n << ", -np " << p << ": " << x[size_t(i)] << " vs " << want[size_t(i)];
    }
    std::vector<std::int64_t> total{std::int64_t(bad)};
    world.allreduce_sum(std::span<std::int64_t>(total));
    EXPECT_EQ(size_t(total[0]), want_bad) << "n = " << n;  // every bad value counted once, by its block's rank

    // reduce_scatter_sum_fixed (ZeRO-1): each rank's block of the same exact sum, with
    // uneven blocks (rank r gets about (r + 1) parts, the last rank none when p > 1).
    const std::vector<T> mine_in = values_of(me, n);
    const std::vector<std::int64_t> counts = uneven_counts(n, p);
    std::int64_t begin = 0;
    for (int r = 0; r < me; ++r) begin += counts[size_t(r)];
    std::vector<T> block(static_cast<size_t>(counts[size_t(me)]));
    const size_t block_bad = world.reduce_scatter_sum_fixed<T>(mine_in, block, counts);
    for (size_t i = 0; i < block.size(); ++i)
      ASSERT_EQ(std::memcmp(&block[i], &want[size_t(begin) + i], sizeof(T)), 0)
          << "reduce-scatter element " << begin + std::int64_t(i) << " of " << n << ", -np " << p;
    total[0] = std::int64_t(block_bad);
    world.allreduce_sum(std::span<std::int64_t>(total));
    EXPECT_EQ(size_t(total[0]), want_bad) << "reduce-scatter, n = " << n;

    // The same in place (the trainer's ZeRO-1): out is this rank's own block of in; the
    // other blocks of in are left as they were.
    std::vector<T> inout = values_of(me, n);
    const size_t inplace_bad = world.reduce_scatter_sum_fixed<T>(
        inout, std::span<T>(inout.data() + begin, size_t(counts[size_t(me)])), counts);
    EXPECT_EQ(inplace_bad, block_bad) << "in place, n = " << n;
    for (int i = 0; i < n; ++i) {
      const bool own = i >= begin && i < begin + counts[size_t(me)];
      const T& expect = own ? want[size_t(i)] : mine_in[size_t(i)];
      ASSERT_EQ(std::memcmp(&inout[size_t(i)], &expect, sizeof(T)), 0)
          << (own ? "in-place sum" : "untouched") << " element " << i << " of " << n << ", -np " << p;
    }
  }
}

TEST(CommFixedSum, ExactSumOfOneLeafPerRankIsTheInt128Reduction) {
  check_fixed_allreduce_is_the_accumulator<float>();
  check_fixed_allreduce_is_the_accumulator<double>();
}

// ---- environment -----------------------------------------------------------------------

TEST(CommEnvironment, NestedEnvironmentDoesNotOwnMpi) {
  const Comm world = Comm::world();
  {
    const dist::Environment inner;  // MPI is already running (mpi_main's Environment)
    EXPECT_FALSE(inner.owns_mpi());
    EXPECT_GE(inner.thread_level(), MPI_THREAD_FUNNELED);
  }  // must not finalise MPI
  int finalized = 1;
  MPI_Finalized(&finalized);
  EXPECT_EQ(finalized, 0);
  EXPECT_EQ(dist::Environment::world_rank(), world.rank());
  EXPECT_EQ(dist::Environment::world_size(), world.size());
  world.barrier();
}

// ---- communicators: split, dup, ownership -----------------------------------------------

TEST(CommSplit, ByParityWithReversedKeys) {
  const Comm world = Comm::world();
  const int p = world.size(), me = world.rank();
  EXPECT_FALSE(world.owns());
  const Comm sub = world.split(me % 2, -me);  // key -rank: highest world rank first
  EXPECT_TRUE(sub.owns());
  std::vector<int> same;
  for (int r = p - 1; r >= 0; --r)
    if (r % 2 == me % 2) same.push_back(r);
  ASSERT_EQ(sub.size(), static_cast<int>(same.size()));  // same verdict on every rank
  EXPECT_EQ(sub.rank(), static_cast<int>(std::find(same.begin(), same.end(), me) - same.begin()));
  std::vector<std::int64_t> x{me, 1};
  sub.allreduce_sum<std::int64_t>(x);
  EXPECT_EQ(x[0], std::accumulate(same.begin(), same.end(), std::int64_t{0}));
  EXPECT_EQ(x[1], static_cast<std::int64_t>(same.size()));
}

TEST(CommSplit, UndefinedColorGivesNullComm) {
  const Comm world = Comm::world();
  const int me = world.rank();
  const Comm sub = world.split(me == 0 ? Comm::kUndefinedColor : 5, me);
  if (me == 0) {
    EXPECT_TRUE(sub.is_null());
    expect_error([&] { (void)sub.size(); }, {"Comm::size", "null communicator"});
  } else {
    EXPECT_FALSE(sub.is_null());
    EXPECT_EQ(sub.size(), world.size() - 1);
    EXPECT_EQ(sub.rank(), me - 1);
  }
}

// Counts communicators actually freed: MPI calls an attribute's delete callback when the
// communicator carrying it is freed (MPI_Comm_free).
int g_freed = 0;
int count_free(MPI_Comm, int, void*, void*) {
  ++g_freed;
  return MPI_SUCCESS;
}

TEST(CommOwnership, DupAndSplitAreFreedNoLeak) {
  const Comm world = Comm::world();
  int keyval = MPI_KEYVAL_INVALID;
  ASSERT_EQ(MPI_Comm_create_keyval(MPI_COMM_NULL_COPY_FN, count_free, &keyval, nullptr),
            MPI_SUCCESS);
  g_freed = 0;
  for (int i = 0; i < 100; ++i) {
    Comm d = world.dup();
    Comm s = world.split(world.rank() % 2, world.rank());
    EXPECT_EQ(MPI_Comm_set_attr(d.raw(), keyval, nullptr), MPI_SUCCESS);
    EXPECT_EQ(MPI_Comm_set_attr(s.raw(), keyval, nullptr), MPI_SUCCESS);
    EXPECT_EQ(d.size(), world.size());
    int cmp = MPI_UNEQUAL;
    MPI_Comm_compare(d.raw(), world.raw(), &cmp);
    EXPECT_EQ(cmp, MPI_CONGRUENT);  // same group, its own context
    // Moving must transfer ownership: exactly one free per communicator.
    Comm moved = std::move(d);
    EXPECT_TRUE(d.is_null());
    EXPECT_FALSE(d.owns());
    EXPECT_TRUE(moved.owns());
    s = std::move(moved);  // frees the old split, now owns the dup
    EXPECT_EQ(g_freed, 2 * i + 1);
  }
  EXPECT_EQ(g_freed, 200);
  // WORLD and SELF wrappers never free the predefined communicators.
  { const Comm w = Comm::world(), s = Comm::self(); }
  EXPECT_EQ(Comm::self().size(), 1);
  EXPECT_EQ(Comm::world().size(), world.size());
  MPI_Comm_free_keyval(&keyval);
}

TEST(CommVerdict, AllTrue) {
  const Comm world = Comm::world();
  const int p = world.size(), me = world.rank();
  EXPECT_TRUE(world.all_true(true));
  EXPECT_FALSE(world.all_true(me != p - 1));  // one rank (the last) says no
  EXPECT_FALSE(world.all_true(false));
  EXPECT_EQ(world.all_true(me != 0 || p == 1), p == 1 ? true : false);
}

// ---- argument errors: thrown before MPI, naming the call ---------------------------------

TEST(CommErrors, SizeMismatchesThrowBeforeMpi) {
  const Comm world = Comm::world();
  const int p = world.size();
  std::vector<double> a(3), b(3 * p + 1);
  expect_error([&] { world.allgather<double>(a, b); }, {"MPI_Allgather", "recv"});
  std::vector<double> c(p + 1), d(p);
  if (p > 1) {
    expect_error([&] { world.alltoall<double>(c, std::span<double>(c)); },
                 {"MPI_Alltoall", "multiple of size()"});
  }
  expect_error([&] { world.alltoall<double>(d, std::span<double>(b)); }, {"MPI_Alltoall", "recv"});

  std::vector<std::int64_t> ones(p, 1), short_counts(p + 1, 1);
  expect_error([&] { world.alltoallv<double>(d, short_counts, d, ones); },
               {"MPI_Alltoallv", "send_counts", "one per rank"});
  expect_error([&] { world.alltoallv<double>(c, ones, d, ones); },
               {"MPI_Alltoallv", "send has"});
  expect_error([&] { world.alltoallv<double>(d, ones, c, ones); },
               {"MPI_Alltoallv", "recv has"});
  std::vector<std::int64_t> negative(p, 1);
  negative[0] = -1;
  expect_error([&] { world.alltoallv<double>(d, negative, d, ones); },
               {"MPI_Alltoallv", "negative"});
  Request req;
  expect_error([&] { world.ialltoallv<double>(c, ones, d, ones, req); }, {"MPI_Ialltoallv", "send has"});
  expect_error([&] { world.ialltoallv<double>(d, ones, c, ones, req); }, {"MPI_Ialltoallv", "recv has"});
  EXPECT_FALSE(req.pending());
  {  // a request still pending cannot start another exchange
    std::vector<double> e(p), f(p);
    world.ialltoallv<double>(d, ones, e, ones, req);
    expect_error([&] { world.ialltoallv<double>(d, ones, f, ones, req); }, {"MPI_Ialltoallv", "still pending"});
    req.wait();
  }

  expect_error([&] { world.allgatherv<double>(a, d, ones); }, {"MPI_Allgatherv", "send"});
  expect_error([&] { world.allgatherv_in_place<double>(b, ones); }, {"allgatherv_in_place", "buf has"});
  expect_error([&] { world.reduce_scatter_sum<double>(c, a, ones); },
               {"MPI_Reduce_scatter", "send"});
  expect_error([&] { world.reduce_scatter_sum<double>(d, a, ones); },
               {"MPI_Reduce_scatter", "recv"});
  expect_error([&] { world.reduce_scatter_sum_fixed<double>(c, a, ones); },
               {"reduce_scatter_sum_fixed", "in has"});
  expect_error([&] { world.reduce_scatter_sum_fixed<double>(d, a, ones); },
               {"reduce_scatter_sum_fixed", "out has"});
  expect_error([&] { world.reduce_scatter_sum_rank_order<double>(d, a, short_counts); },
               {"reduce_scatter_sum_rank_order", "counts has"});
  expect_error([&] { world.reduce_scatter_sum_rank_order<double>(d, a, negative); },
               {"reduce_scatter_sum_rank_order", "negative"});
  expect_error([&] { world.broadcast<double>(a, p); }, {"MPI_Bcast", "root"});
  expect_error([&] { world.broadcast<double>(a, -1); }, {"MPI_Bcast", "root"});
  world.barrier();  // everyone is still in step
}

TEST(CommErrors, CountsBeyondIntMaxAreRejected) {
  const Comm world = Comm::world();
  const int p = world.size();
  std::vector<float> none;
  std::vector<std::int64_t> zeros(p, 0), huge(p, 0);
  huge[0] = std::int64_t{INT_MAX} + 1;
  expect_error([&] { world.alltoallv<float>(none, huge, none, zeros); },
               {"MPI_Alltoallv", "send_counts[0]", "exceeds INT_MAX"});
  // Each count fits but a prefix sum (the displacement of rank 2) does not.
  if (p > 2) {
    std::vector<std::int64_t> big(p, INT_MAX);
    expect_error([&] { world.alltoallv<float>(none, zeros, none, big); },
                 {"MPI_Alltoallv", "displacement", "exceeds INT_MAX"});
  }
  std::vector<std::int64_t> huge_gather(p, 0);
  huge_gather[p - 1] = std::int64_t{1} << 33;
  expect_error([&] { world.allgatherv<float>(none, none, huge_gather); },
               {"MPI_Allgatherv", "exceeds INT_MAX"});
}

TEST(CommErrors, MpiErrorCodeBecomesError) {
  // An invalid destination rank is caught by MPI itself (MPI_ERRORS_RETURN): the code must
  // come back as moetune::Error naming the MPI function and this rank.
  const Comm world = Comm::world();
  std::vector<std::int32_t> x(2, 1);
  expect_error([&] { world.send<std::int32_t>(x, world.size() + 3, 0); },
               {"MPI_Send failed on rank " + std::to_string(world.rank()), "rank"});
}

TEST(CommErrors, RecvOfWrongLength) {
  const Comm world = Comm::world();
  const int p = world.size(), me = world.rank();
  if (p == 1) GTEST_SKIP() << "needs 2 ranks";
  std::vector<std::int64_t> three{1, 2, 3}, five{1, 2, 3, 4, 5};
  if (me == 0) {
    world.send<std::int64_t>(three, 1, 11);
    world.send<std::int64_t>(five, 1, 12);
  } else if (me == 1) {
    std::vector<std::int64_t> buf5(5), buf3(3);
    expect_error([&] { world.recv<std::int64_t>(buf5, 0, 11); },
                 {"Comm::recv", "received 3 elements", "expected 5"});
    expect_error([&] { world.recv<std::int64_t>(buf3, 0, 12); }, {"MPI_Recv failed on rank 1"});
  }
  world.barrier();
}

// ---- fixed-point conversion --------------------------------------------------------------

TEST(FixedPoint, RoundTripExactInRange) {
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> mant(0.5, 1.0);  // full 53-bit mantissas
  std::uniform_int_distribution<int> expo(-47, 26);       // |v| in [2^-48, 2^26)
  for (int k = 0; k < 20000; ++k) {
    double v = std::ldexp(mant(rng), expo(rng));
    if (k % 2) v = -v;
    ASSERT_EQ(dist::from_fixed(dist::to_fixed(v)), v) << v;
  }
  // The boundaries themselves.
  // The boundaries: in [2^-48, 2^-47) a double's last mantissa bit is exactly 2^-100.
  const double lo = std::nextafter(0x1p-48, 1.0), hi = std::nextafter(0x1p26, 0.0);
  EXPECT_EQ(lo, 0x1p-48 + 0x1p-100);
  EXPECT_EQ(dist::from_fixed(dist::to_fixed(lo)), lo);
  EXPECT_EQ(dist::from_fixed(dist::to_fixed(-hi)), -hi);
  EXPECT_EQ(dist::from_fixed(dist::to_fixed(0x1p-47)), 0x1p-47);
  // float values are exact down to 2^-77 (last bit 2^-100).
  const float f = std::nextafter(0x1p-77f, 1.0f);
  EXPECT_EQ(static_cast<float>(dist::from_fixed(dist::to_fixed(f))), f);
}

// from_fixed's fast path (top 64 bits + sticky bit, hardware rounding) must be exactly the
// library conversion: correct rounding to nearest even of the int128, then * 2^-100.
TEST(FixedPoint, FromFixedEqualsTheLibraryConversion) {
  const auto reference = [](dist::int128 v) { return std::ldexp(static_cast<double>(v), -100); };
  std::vector<dist::int128> cases = {0, 1, -1, dist::kFixedMax, dist::kFixedMin, dist::kFixedMin + 1};
  // Ties and near-ties at every magnitude: m * 2^s with m = 2^53 + 1 (exact tie when shifted
  // out by one bit), plus or minus the lowest bit (sticky decides).
  for (int s = 0; s < 74; ++s)
    for (dist::int128 m : {(dist::int128(1) << 53) + 1, (dist::int128(1) << 54) + 1, (dist::int128(1) << 54) + 3,
                           (dist::int128(1) << 64) - 1, (dist::int128(1) << 63)}) {
      if (s > 0 && (m >> (126 - s)) != 0) continue;  // m * 2^s must fit below 2^126 (and be negatable)
      const dist::int128 x = m << s;
      for (dist::int128 d : {dist::int128(0), dist::int128(1), dist::int128(-1)}) {
        cases.push_back(x + d);
        cases.push_back(-(x + d));
      }
    }
  std::mt19937_64 rng(11);
  for (int k = 0; k < 200000; ++k) {
    const auto bits = static_cast<dist::uint128>(rng()) << 64 | rng();
    const int keep = int(rng() % 128) + 1;  // random magnitude
    auto v = static_cast<dist::int128>(keep == 128 ? bits : bits & ((dist::uint128(1) << keep) - 1));
    if (rng() & 1) v = -v;
    cases.push_back(v);
  }
  for (const auto v : cases) {
    const double a = dist::from_fixed(v), b = reference(v);
    ASSERT_EQ(std::memcmp(&a, &b, sizeof a), 0) << static_cast<double>(v) << ": " << a << " vs " << b;
  }
}

TEST(FixedPoint, BelowResolutionTruncatesTowardZero) {
  EXPECT_SAME(dist::to_fixed(0x1p-100), int128{1});
  EXPECT_SAME(dist::to_fixed(0x1p-101), int128{0});
  EXPECT_SAME(dist::to_fixed(1.75 * 0x1p-100), int128{1});
  EXPECT_SAME(dist::to_fixed(-1.75 * 0x1p-100), int128{-1});
  EXPECT_SAME(dist::to_fixed(1.0), int128{1} << 100);
  // Below 2^-48 the last mantissa bit falls under 2^-100: no longer exact.
  const double v = std::nextafter(0x1p-49, 1.0);  // 2^-49 + 2^-101
  EXPECT_NE(dist::from_fixed(dist::to_fixed(v)), v);
  EXPECT_LT(std::fabs(dist::from_fixed(dist::to_fixed(v))), std::fabs(v));
}

TEST(FixedPoint, OutOfRangeThrows) {
  for (double v : {0x1p26, -0x1p26, 1e300, -3e7 * 3}) {
    expect_error([&] { (void)dist::to_fixed(v); }, {"gradient value", "out of the fixed-point range"});
  }
  EXPECT_NO_THROW((void)dist::to_fixed(std::nextafter(0x1p26, 0.0)));
  std::vector<int128> acc(4, 0);
  const std::vector<float> vals{1.0f, 2.0f, 1e8f, 3.0f};
  expect_error([&] { dist::add_fixed<float>(acc, vals); }, {"at index 2", "out of the fixed-point range"});
  EXPECT_SAME(acc[0], dist::to_fixed(1.0));  // the other values were added
  EXPECT_SAME(acc[3], dist::to_fixed(3.0));
  EXPECT_SAME(acc[2], int128{0});
}

TEST(FixedPoint, NonFiniteSaturatesAndIsCounted) {
  const double inf = std::numeric_limits<double>::infinity();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  EXPECT_SAME(dist::to_fixed(nan), dist::kFixedMax);
  EXPECT_SAME(dist::to_fixed(inf), dist::kFixedMax);
  EXPECT_SAME(dist::to_fixed(-inf), dist::kFixedMin);
  EXPECT_SAME(dist::kFixedMin, -dist::kFixedMax - 1);
  std::vector<int128> acc(5, dist::to_fixed(0.5));
  const std::vector<double> vals{1.0, nan, -inf, 2.0, inf};
  EXPECT_EQ(dist::add_fixed<double>(acc, vals), 3u);
  EXPECT_SAME(acc[0], dist::to_fixed(1.5));
  EXPECT_SAME(acc[1], dist::kFixedMax);
  EXPECT_SAME(acc[2], dist::kFixedMin);
  EXPECT_SAME(acc[3], dist::to_fixed(2.5));
  EXPECT_SAME(acc[4], dist::kFixedMax);
  const std::vector<double> finite{1.0, 2.0, 3.0, 4.0, 5.0};
  EXPECT_EQ(dist::add_fixed<double>(acc, finite), 0u);
}

TEST(FixedPoint, SumIsOrderIndependentWhileDoubleSumIsNot) {
  // Hand-built: 2^25, eight 2^-29, -2^25. Forward the small values vanish; small ones first
  // they survive. The fixed-point sum is the same bits in every order.
  std::vector<double> v{0x1p25};
  for (int k = 0; k < 8; ++k) v.push_back(0x1p-29);
  v.push_back(-0x1p25);
  auto double_sum = [](const std::vector<double>& x) {
    double s = 0;
    for (double y : x) s += y;
    return s;
  };
  auto fixed_sum = [](const std::vector<double>& x) {
    std::vector<int128> acc(1, 0);
    for (double y : x) dist::add_fixed<double>(acc, std::vector<double>{y});
    return acc[0];
  };
  std::vector<double> small_first(v.begin() + 1, v.end() - 1);
  small_first.push_back(0x1p25);
  small_first.push_back(-0x1p25);
  EXPECT_EQ(double_sum(v), 0.0);
  EXPECT_EQ(double_sum(small_first), 0x1p-26);
  EXPECT_SAME(fixed_sum(v), fixed_sum(small_first));
  EXPECT_EQ(dist::from_fixed(fixed_sum(v)), 0x1p-26);

  // Random values of mixed magnitude in 30 shuffled orders.
  std::mt19937_64 rng(99);
  std::uniform_real_distribution<double> mant(-1.0, 1.0);
  std::uniform_int_distribution<int> expo(-30, 20);
  std::vector<double> r(2000);
  for (double& x : r) x = std::ldexp(mant(rng), expo(rng));
  std::set<double> double_sums;
  const int128 reference = fixed_sum(r);
  for (int k = 0; k < 30; ++k) {
    std::shuffle(r.begin(), r.end(), rng);
    double_sums.insert(double_sum(r));
    EXPECT_SAME(fixed_sum(r), reference);
  }
  EXPECT_GT(double_sums.size(), 1u);  // the double sum depends on the order
}

// round_trip_fixed must be bit for bit add_fixed into zeros followed by load_fixed, for
// every kind of value: in range, below the exact range, denormal, zero, out of range,
// non-finite, at every boundary.
template <class T>
void check_round_trip_equals_the_accumulator() {
  const T inf = std::numeric_limits<T>::infinity(), nan = std::numeric_limits<T>::quiet_NaN();
  const T exact = std::is_same_v<T, float> ? T(0x1p-77) : T(0x1p-48);
  std::vector<T> v{T(0), -T(0), T(1), T(-1), inf, -inf, nan, T(0x1p26), -T(0x1p26), T(1e30), T(0x1p-100),
                   T(0x1p-101), T(-1.75 * 0x1p-100), std::numeric_limits<T>::denorm_min(),
                   std::numeric_limits<T>::min(), exact, -exact};
  for (T b : {T(0x1p26), exact, T(0x1p-100)})
    for (T x : {std::nextafter(b, T(0)), std::nextafter(b, T(1e30))}) {
      v.push_back(x);
      v.push_back(-x);
    }
  // Whole chunks of +0 (the fast path's zeros), of -0 (which come back as +0) and of +0
  // mixed with values in range, as the untouched embedding rows of a step give.
  for (int k = 0; k < 2048; ++k) v.push_back(T(0));
  for (int k = 0; k < 2048; ++k) v.push_back(-T(0));
  for (int k = 0; k < 2048; ++k) v.push_back(k % 3 ? T(0) : T(0.25) * T(k));
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<double> mant(0.5, 1.0);
  std::uniform_int_distribution<int> expo(-130, 30);  // across the whole range and beyond
  for (int k = 0; k < 100000; ++k) {
    const T x = static_cast<T>(std::ldexp(mant(rng), expo(rng)));
    v.push_back(k % 2 ? -x : x);
  }
  std::vector<int128> acc(v.size(), 0);
  try {
    dist::add_fixed<T>(acc, v);  // throws (after the loop) for the values out of range
  } catch (const Error&) {
  }
  std::vector<T> want(v.size());
  dist::load_fixed<T>(want, acc);
  size_t out_of_range = 0, below = 0, nonfinite = 0;
  for (T x : v) {
    nonfinite += !std::isfinite(x);
    out_of_range += std::isfinite(x) && std::fabs(x) >= T(0x1p26);
    below += std::isfinite(x) && x != 0 && std::fabs(x) < exact;
  }
  ASSERT_GT(out_of_range, 10u);
  ASSERT_GT(below, 1000u);  // the slow path is exercised
  std::vector<T> got = v;
  EXPECT_EQ(dist::round_trip_fixed<T>(got), nonfinite + out_of_range);
  for (size_t i = 0; i < v.size(); ++i)
    ASSERT_EQ(std::memcmp(&got[i], &want[i], sizeof(T)), 0) << "value " << v[i] << ": " << got[i] << " vs " << want[i];
  // Idempotent on what it can sum: a value in range comes back as a fixed-point value.
  std::vector<T> again = got;
  dist::round_trip_fixed<T>(again);
  for (size_t i = 0; i < v.size(); ++i)
    if (std::isfinite(v[i]) && std::fabs(v[i]) < T(0x1p26)) {
      ASSERT_EQ(std::memcmp(&again[i], &got[i], sizeof(T)), 0) << v[i];
    }
}

TEST(FixedPoint, RoundTripIsTheAccumulatorOfOneLeaf) {
  check_round_trip_equals_the_accumulator<float>();
  check_round_trip_equals_the_accumulator<double>();
}

// sum_fixed_rows on hand-picked columns, against add_fixed of each row + load_fixed:
// sums the double fast path does exactly, sums it rounds, a total of 2^27 or more (which
// wraps in int128, and must wrap the same way), and a value out of range.
TEST(FixedPoint, SumOfRowsIsTheAccumulatorColumnByColumn) {
  const float big = 0x1.fp25f, tiny = 0x1p-60f;
  // Column j: rows[0][j], rows[1][j], rows[2][j].
  const std::vector<std::vector<float>> cols = {
      {1.0f, 2.0f, 3.0f},         {1.0f, 0x1p-30f, -1.0f},  {big, big, big},  {big, big, -big},
      {-big, -big, -big},         {tiny, 1.0f, tiny},       {1e8f, 1.0f, 0},  {0.1f, 0.2f, 0.3f},
      {0x1p24f, 1.0f, -0x1p24f}};
  const size_t W = 3, n = cols.size();
  std::vector<float> rows(W * n);
  for (size_t j = 0; j < n; ++j)
    for (size_t r = 0; r < W; ++r) rows[r * n + j] = cols[j][r];
  std::vector<int128> acc(n, 0);
  for (size_t r = 0; r < W; ++r) {
    try {
      dist::add_fixed<float>(acc, std::span<const float>(rows.data() + r * n, n));
    } catch (const Error&) {
    }
  }
  std::vector<float> want(n), got(n);
  dist::load_fixed<float>(want, acc);
  const std::vector<const float*> ptrs = {rows.data(), rows.data() + n, rows.data() + 2 * n};
  EXPECT_EQ(dist::sum_fixed_rows<float>(ptrs, n, got.data()), 1u);  // the 1e8
  for (size_t j = 0; j < n; ++j)
    EXPECT_EQ(std::memcmp(&got[j], &want[j], sizeof(float)), 0) << "column " << j << ": " << got[j] << " vs " << want[j];
  EXPECT_NE(want[2], 3.0f * big);  // the wrapped total really is another number
  // In place: the sum written over each of the rows in turn (the slow path must still
  // read that row's own values, not the fast path's rounded sums).
  for (size_t k = 0; k < W; ++k) {
    std::vector<float> copy = rows;
    const std::vector<const float*> p = {copy.data(), copy.data() + n, copy.data() + 2 * n};
    EXPECT_EQ(dist::sum_fixed_rows<float>(p, n, copy.data() + k * n), 1u);
    for (size_t j = 0; j < n; ++j)
      EXPECT_EQ(std::memcmp(&copy[k * n + j], &want[j], sizeof(float)), 0) << "in place over row " << k << ", column " << j;
  }
}

// add_leaf keeps each element's running sum in a double while that is exact and moves it
// to int128 otherwise; after fold_partials the accumulator must be bit for bit add_fixed's,
// and load_partials must give load_fixed's values, for leaves of every kind: similar
// magnitudes (the double path), magnitudes 2^50 apart (TwoSum sees the rounding), values
// below 2^-77 (they do not convert exactly), running sums that reach 2^26 (and wrap
// past 2^27 in int128), non-finite values (sentinels), and finite values out of range
// (add_fixed throws after its loop and adds nothing for them).
template <class T>
void check_add_leaf_is_add_fixed() {
  constexpr T exact = std::is_same_v<T, float> ? T(0x1p-77) : T(0x1p-48);
  const size_t n = 3000, leaves = 12;
  std::mt19937_64 rng(11);
  std::uniform_real_distribution<double> mant(-1.0, 1.0);
  std::vector<std::vector<T>> leaf(leaves, std::vector<T>(n));
  for (size_t l = 0; l < leaves; ++l)
    for (size_t i = 0; i < n; ++i) {
      const size_t kind = i % 10;
      // Kinds 0-4: similar magnitudes, with float's 24-bit mantissas also for T = double
      // (the gradients of a float run), so that their double sums are exact.
      T x = static_cast<T>(static_cast<float>(std::ldexp(mant(rng), int(rng() % 8) - 4)));
      if (kind == 5) x = static_cast<T>(static_cast<float>(std::ldexp(mant(rng), l % 2 ? -50 : 0)));
      if (kind == 6 && l == 3) x = static_cast<T>(exact / 4);
      if (kind == 7) x = static_cast<T>(std::ldexp(mant(rng) > 0 ? 1.0 : -1.0, 25));  // sums pass 2^26 and 2^27
      if (kind == 8 && l == 5 && i % 30 == 8) x = i % 60 == 8 ? std::numeric_limits<T>::quiet_NaN() : -std::numeric_limits<T>::infinity();
      if (kind == 9 && l == 7 && i % 40 == 9) x = T(0x1p27);  // out of range
      leaf[l][i] = x;
    }
  std::vector<int128> want_acc(n, 0), acc(n, 7);  // acc needs no zeroing
  std::vector<double> partial(n, 0.0);
  std::vector<std::uint8_t> in_fixed(n, 0);
  size_t want_bad = 0, got_bad = 0, throws_want = 0, throws_got = 0;
  for (size_t l = 0; l < leaves; ++l) {
    try {
      want_bad += dist::add_fixed<T>(want_acc, leaf[l]);
    } catch (const Error&) {
      ++throws_want;
    }
    try {
      got_bad += dist::add_leaf<T>(partial, in_fixed, acc, leaf[l]);
    } catch (const Error& e) {
      ++throws_got;
      EXPECT_NE(std::string(e.what()).find("out of the fixed-point range"), std::string::npos) << e.what();
    }
  }
  EXPECT_EQ(got_bad, want_bad);
  EXPECT_GT(want_bad, 0u);
  EXPECT_EQ(throws_got, throws_want);
  EXPECT_EQ(throws_want, 1u);
  size_t moved = 0;
  for (std::uint8_t f : in_fixed) moved += f;
  EXPECT_GT(moved, n / 10);      // the int128 path ran (kinds 5-9)
  EXPECT_LT(moved, n / 2);       // and the double path kept most elements
  std::vector<T> via_partials(n), want(n), got(n);
  dist::load_partials<T>(via_partials, partial, in_fixed, acc);
  dist::fold_partials(acc, partial, in_fixed);
  for (size_t i = 0; i < n; ++i)
    ASSERT_TRUE(acc[i] == want_acc[i]) << "element " << i << " (kind " << i % 10 << ")";
  dist::load_fixed<T>(want, want_acc);
  for (size_t i = 0; i < n; ++i)
    ASSERT_EQ(std::memcmp(&via_partials[i], &want[i], sizeof(T)), 0) << "element " << i << ": " << via_partials[i]
                                                                       << " vs " << want[i];
  EXPECT_THROW(dist::add_leaf<T>(std::span<double>(partial.data(), n - 1), in_fixed, acc, leaf[0]), Error);
  EXPECT_THROW(dist::fold_partials(acc, partial, std::span<const std::uint8_t>(in_fixed.data(), 1)), Error);
}

TEST(FixedPoint, AddLeafIsAddFixed) {
  check_add_leaf_is_add_fixed<float>();
  check_add_leaf_is_add_fixed<double>();
}

TEST(FixedPoint, LoadFixedAndSizeChecks) {
  const std::vector<float> vals{0.25f, -3.5f, 1e-6f};
  std::vector<int128> acc(3, 0);
  dist::add_fixed<float>(acc, vals);
  dist::add_fixed<float>(acc, vals);
  std::vector<float> out(3);
  dist::load_fixed<float>(out, acc);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(out[i], 2.0f * vals[i]);
  std::vector<float> wrong(2);
  expect_error([&] { dist::add_fixed<float>(acc, wrong); }, {"add_fixed"});
  expect_error([&] { dist::load_fixed<float>(wrong, acc); }, {"load_fixed"});
}

}  // namespace
