// dist/int128.cpp — fixed-point conversions and the OpenMP loops that accumulate
// gradients into int128 buffers (see dist/int128.hpp for the number format).
#include "dist/int128.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>

#include "kernels/multiversion.hpp"
#include "moe/error.hpp"

namespace moetune::dist {

namespace {

constexpr double kRange = 0x1p26;  // 2^kFixedRangeExponent
static_assert(kFixedRangeExponent == 26 && kFixedFractionBits == 100);

std::string format_value(double v) {
  std::ostringstream s;
  s.precision(17);
  s << v;
  return s.str();
}

[[noreturn]] void throw_out_of_range(double v, const std::string& where) {
  throw Error("gradient value " + format_value(v) + where +
              " is out of the fixed-point range (|v| < 2^26 = 67108864); "
              "the int128 gradient sum cannot represent it");
}

// Non-finite sentinel: +inf and NaN saturate to the maximum, -inf to the minimum.
int128 saturate(double v) { return (std::isnan(v) || v > 0) ? kFixedMax : kFixedMin; }

// Precondition: v finite and |v| < 2^26, so v * 2^100 < 2^126 fits. Computes
// trunc(v * 2^100) without the slow double -> int128 library call: with
// x = v * 2^37 (exact), hi = trunc(x) and r = x - hi (exact, |r| < 1, same sign as x),
// v * 2^100 = hi * 2^63 + r * 2^63, and trunc of that is hi * 2^63 + trunc(r * 2^63)
// because both parts have the same sign. Two double -> int64 conversions.
inline int128 to_fixed_unchecked(double v) {
  const double x = v * 0x1p37;
  const double hi = std::trunc(x);
  const auto lo = static_cast<int64_t>((x - hi) * 0x1p63);
  return static_cast<int128>(static_cast<int64_t>(hi)) * (int128(1) << 63) + lo;
}

}  // namespace

int128 to_fixed(double v) {
  if (!std::isfinite(v)) return saturate(v);
  if (std::fabs(v) >= kRange) throw_out_of_range(v, "");
  return to_fixed_unchecked(v);
}

// 2^(s - 100) for s = 0..64: the exact scale of from_fixed's fast path.
struct Pow2Table {
  double p[65];
  Pow2Table() {
    for (int s = 0; s <= 64; ++s) p[s] = std::ldexp(1.0, s - kFixedFractionBits);
  }
};
const Pow2Table kPow2;

// Equal to std::ldexp(static_cast<double>(v), -100) for every v (tested), without the
// slow int128 -> double and ldexp library calls: the magnitude's top 64 bits m (shifted
// right by `shift`) with the discarded bits OR-ed into m's lowest bit as a sticky bit,
// so that the hardware's uint64 -> double rounding (to nearest even at bit 11 of m) is
// the correct rounding of the whole magnitude; then an exact scale by 2^(shift - 100).
double from_fixed(int128 v) {
  const bool neg = v < 0;
  const uint128 u = neg ? uint128(0) - static_cast<uint128>(v) : static_cast<uint128>(v);
  const auto hi = static_cast<uint64_t>(u >> 64);
  double r;
  if (hi == 0) {
    r = static_cast<double>(static_cast<uint64_t>(u)) * kPow2.p[0];
  } else {
    const int shift = 64 - __builtin_clzll(hi);  // 1..64: u >> shift fits in 64 bits
    uint64_t m = static_cast<uint64_t>(u >> shift);
    const uint128 rest = u & ((uint128(1) << shift) - 1);
    m |= uint64_t(rest != 0);
    r = static_cast<double>(m) * kPow2.p[shift];
  }
  return neg ? -r : r;
}

template <class T>
std::size_t add_fixed(std::span<int128> acc, std::span<const T> values) {
  if (acc.size() != values.size()) {
    throw Error("add_fixed: accumulator has " + std::to_string(acc.size()) +
                " elements but values has " + std::to_string(values.size()));
  }
  const std::int64_t n = static_cast<std::int64_t>(values.size());
  std::int64_t nonfinite = 0;
  std::int64_t first_bad = n;  // first out-of-range index (n = none)
#pragma omp parallel for schedule(static) reduction(+ : nonfinite) reduction(min : first_bad)
  for (std::int64_t i = 0; i < n; ++i) {
    const double v = static_cast<double>(values[i]);
    if (!std::isfinite(v)) {
      acc[i] = saturate(v);
      ++nonfinite;
    } else if (std::fabs(v) >= kRange) {
      if (i < first_bad) first_bad = i;  // exceptions may not leave an OpenMP region
    } else {
      acc[i] = fixed_add(acc[i], to_fixed_unchecked(v));
    }
  }
  if (first_bad < n) {
    throw_out_of_range(static_cast<double>(values[first_bad]),
                       " at index " + std::to_string(first_bad));
  }
  return static_cast<std::size_t>(nonfinite);
}

template <class T>
void load_fixed(std::span<T> out, std::span<const int128> acc) {
  if (out.size() != acc.size()) {
    throw Error("load_fixed: output has " + std::to_string(out.size()) +
                " elements but accumulator has " + std::to_string(acc.size()));
  }
  const std::int64_t n = static_cast<std::int64_t>(out.size());
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(from_fixed(acc[i]));
}

template <class T>
std::size_t round_trip_fixed(std::span<T> values) {
  // Below `exact`, to_fixed may truncate (see the header): those values take the slow path.
  constexpr double exact = std::is_same_v<T, float> ? 0x1p-77 : 0x1p-48;
  const std::int64_t n = static_cast<std::int64_t>(values.size());
  T* v = values.data();
  std::int64_t bad = 0;
  // Almost every value converts exactly (it is then its own round trip): a chunk whose
  // values all do is left alone after one vectorized check (in T: exact and kRange are
  // powers of 2, so the comparisons decide as they would in double). So does +0, which
  // comes back as from_fixed(0) = +0 (-0 comes back as +0: the slow path), so that the
  // zero gradients of the embedding rows and experts a step did not touch (most of a
  // large vocabulary's) take no scalar pass.
  using Bits = std::conditional_t<std::is_same_v<T, float>, std::uint32_t, std::uint64_t>;
  constexpr std::int64_t kChunk = 1024;
  const std::int64_t nchunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) reduction(+ : bad)
  for (std::int64_t c = 0; c < nchunks; ++c) {
    const std::int64_t b = c * kChunk, e = std::min(n, b + kChunk);
    int slow = 0;
    for (std::int64_t i = b; i < e; ++i) {
      const T a = std::fabs(v[i]);
      const int plus_zero = int(std::bit_cast<Bits>(v[i]) == 0);
      slow |= (1 - (int(a >= T(exact)) & int(a < T(kRange)))) & (1 - plus_zero);  // NaN fails both compares
    }
    if (slow == 0) continue;
    for (std::int64_t i = b; i < e; ++i) {
      const double x = static_cast<double>(v[i]);
      const double a = std::fabs(x);
      if (a >= exact && a < kRange) continue;  // NaN fails both compares
      if (std::bit_cast<Bits>(v[i]) == 0) continue;  // +0
      if (!std::isfinite(x)) {
        v[i] = static_cast<T>(from_fixed(saturate(x)));
        ++bad;
      } else if (a >= kRange) {
        v[i] = T(0);
        ++bad;
      } else {
        v[i] = static_cast<T>(from_fixed(to_fixed_unchecked(x)));
      }
    }
  }
  return static_cast<std::size_t>(bad);
}

namespace {
void check_sizes(const char* call, std::size_t n, std::size_t a, const char* an, std::size_t b, const char* bn) {
  if (a != n || b != n)
    throw Error(std::string(call) + ": " + an + " has " + std::to_string(a) + " elements and " + bn + " " +
                std::to_string(b) + ", expected " + std::to_string(n));
}

// add_leaf's fast pass over n <= kLeafChunk elements, built for the CPU's widest vectors
// (kernels/multiversion.hpp): partial[i] += values[i] where that is exact (the value
// converts exactly, TwoSum shows no rounding, |sum| < 2^26) and the element is still in
// double; ok[i] says where. Returns whether any element was left for the slow path.
constexpr std::int64_t kLeafChunk = 512;
template <class T>
MOETUNE_CPU_CLONES bool add_leaf_fast(double* partial, const std::uint8_t* in_fixed, const T* values, std::int64_t n,
                                      int* ok) {
  constexpr double exact = std::is_same_v<T, float> ? 0x1p-77 : 0x1p-48;
  int slow = 0;
#pragma omp simd reduction(| : slow)
  for (std::int64_t i = 0; i < n; ++i) {
    const double x = static_cast<double>(values[i]);
    const double a = std::fabs(x), p = partial[i];
    const double t = p + x;
    const double xv = t - p;  // TwoSum: t + err = p + x exactly
    const double err = (p - (t - xv)) + (x - xv);
    // Bitwise, not short-circuit: branch-free, so the loop vectorizes.
    const int good = (int(a >= exact) | int(a == 0.0)) & int(a < kRange) & int(err == 0.0) &
                     int(std::fabs(t) < kRange) & int(in_fixed[i] == 0);
    partial[i] = good ? t : p;
    ok[i] = good;
    slow |= 1 - good;
  }
  return slow != 0;
}
}  // namespace

template <class T>
std::size_t add_leaf(std::span<double> partial, std::span<std::uint8_t> in_fixed, std::span<int128> acc,
                     std::span<const T> values) {
  const std::size_t len = values.size();
  check_sizes("add_leaf", len, partial.size(), "partial", in_fixed.size(), "in_fixed");
  check_sizes("add_leaf", len, acc.size(), "acc", len, "values");
  const auto n = static_cast<std::int64_t>(len);
  const std::int64_t nchunks = (n + kLeafChunk - 1) / kLeafChunk;
  std::int64_t nonfinite = 0, first_bad = n;
#pragma omp parallel for schedule(static) reduction(+ : nonfinite) reduction(min : first_bad) if (n > 16384)
  for (std::int64_t c = 0; c < nchunks; ++c) {
    const std::int64_t i0 = c * kLeafChunk, m = std::min(kLeafChunk, n - i0);
    int ok[kLeafChunk];
    if (!add_leaf_fast(partial.data() + i0, in_fixed.data() + i0, values.data() + i0, m, ok)) continue;
    for (std::int64_t i = i0; i < i0 + m; ++i) {
      if (ok[i - i0]) continue;
      if (!in_fixed[size_t(i)]) {  // the exact double sum so far moves to int128
        acc[size_t(i)] = to_fixed_unchecked(partial[size_t(i)]);
        in_fixed[size_t(i)] = 1;
      }
      const double v = static_cast<double>(values[size_t(i)]);  // add_fixed's element
      if (!std::isfinite(v)) {
        acc[size_t(i)] = saturate(v);
        ++nonfinite;
      } else if (std::fabs(v) >= kRange) {
        first_bad = std::min(first_bad, i);
      } else {
        acc[size_t(i)] = fixed_add(acc[size_t(i)], to_fixed_unchecked(v));
      }
    }
  }
  if (first_bad < n) throw_out_of_range(static_cast<double>(values[size_t(first_bad)]), " at index " + std::to_string(first_bad));
  return static_cast<std::size_t>(nonfinite);
}

void fold_partials(std::span<int128> acc, std::span<const double> partial, std::span<const std::uint8_t> in_fixed) {
  check_sizes("fold_partials", acc.size(), partial.size(), "partial", in_fixed.size(), "in_fixed");
  const auto n = static_cast<std::int64_t>(acc.size());
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < n; ++i)
    if (!in_fixed[size_t(i)]) acc[size_t(i)] = to_fixed_unchecked(partial[size_t(i)]);
}

template <class T>
void load_partials(std::span<T> out, std::span<const double> partial, std::span<const std::uint8_t> in_fixed,
                   std::span<const int128> acc) {
  check_sizes("load_partials", out.size(), partial.size(), "partial", in_fixed.size(), "in_fixed");
  check_sizes("load_partials", out.size(), acc.size(), "acc", out.size(), "out");
  const auto n = static_cast<std::int64_t>(out.size());
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < n; ++i)
    out[size_t(i)] = in_fixed[size_t(i)] ? static_cast<T>(from_fixed(acc[size_t(i)])) : static_cast<T>(partial[size_t(i)]);
}

namespace {
// The fast path of sum_fixed_rows for elements [i0, i0 + n) (n <= kSumChunk), row by row
// over the chunk so that each pass vectorizes (built for the CPU's widest vectors,
// kernels/multiversion.hpp): out[i] = the plain double sum in row order, and fast[i] = 1
// where that sum is exact (every value converts exactly, no addition rounded, |sum| <
// 2^27), the same test as the element-at-a-time loop below. Returns whether any
// element failed it. out is the caller's chunk buffer (never a row).
constexpr std::int64_t kSumChunk = 512;
template <class T>
MOETUNE_CPU_CLONES bool sum_rows_fast(const T* const* rows, std::size_t W, std::int64_t i0, std::int64_t n, T* out,
                                      int* fast) {
  constexpr double exact = std::is_same_v<T, float> ? 0x1p-77 : 0x1p-48;
  double sum[kSumChunk];
  const T* x0 = rows[0] + i0;
#pragma omp simd
  for (std::int64_t i = 0; i < n; ++i) {
    const double x = static_cast<double>(x0[i]);
    const double a = std::fabs(x);
    sum[i] = x;
    fast[i] = (int(a >= exact) | int(a == 0.0)) & int(a < kRange);  // bitwise: the loop vectorizes
  }
  for (std::size_t r = 1; r < W; ++r) {
    const T* xr = rows[r] + i0;
#pragma omp simd
    for (std::int64_t i = 0; i < n; ++i) {
      const double x = static_cast<double>(xr[i]);
      const double a = std::fabs(x);
      const double t = sum[i] + x;
      const double xv = t - sum[i];  // TwoSum: t + err = sum + x exactly
      const double err = (sum[i] - (t - xv)) + (x - xv);
      fast[i] &= (int(a >= exact) | int(a == 0.0)) & int(a < kRange) & int(err == 0.0);
      sum[i] = t;
    }
  }
  int slow = 0;
#pragma omp simd reduction(| : slow)
  for (std::int64_t i = 0; i < n; ++i) {
    fast[i] &= int(std::fabs(sum[i]) < 0x1p27);
    out[i] = static_cast<T>(sum[i]);
    slow |= 1 - fast[i];
  }
  return slow != 0;
}
}  // namespace

template <class T>
std::size_t sum_fixed_rows(std::span<const T* const> rows, std::size_t len, T* out) {
  const std::size_t W = rows.size();
  if (W == 0) throw Error("sum_fixed_rows: no rows");
  const T* const* row = rows.data();
  const auto n = static_cast<std::int64_t>(len);
  const std::int64_t nchunks = (n + kSumChunk - 1) / kSumChunk;
  std::int64_t bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad) if (n > 16384)
  for (std::int64_t c = 0; c < nchunks; ++c) {
    const std::int64_t i0 = c * kSumChunk, m = std::min(kSumChunk, n - i0);
    // Fast path: each value converts exactly (zero too) and the double sum rounds nowhere,
    // so it is the exact sum, which from_fixed would return unchanged. (A true total of
    // 2^27 or more wraps in int128, see the header: the slow path reproduces that, so
    // that both paths give the same bits for every input.) The chunk's sums go to a
    // buffer first and to out only when every row of the chunk has been read: out may
    // be one of the rows.
    int fast[kSumChunk];
    T sums[kSumChunk];
    if (sum_rows_fast(row, W, i0, m, sums, fast)) {
      for (std::int64_t i = i0; i < i0 + m; ++i) {
        if (fast[i - i0]) continue;
        int128 acc = 0;
        for (std::size_t r = 0; r < W; ++r) {
          const double x = static_cast<double>(row[r][i]);
          if (!std::isfinite(x)) {
            acc = fixed_add(acc, saturate(x));
            ++bad;
          } else if (std::fabs(x) >= kRange) {
            ++bad;  // add_fixed adds nothing for it
          } else {
            acc = fixed_add(acc, to_fixed_unchecked(x));
          }
        }
        sums[i - i0] = static_cast<T>(from_fixed(acc));
      }
    }
    std::copy(sums, sums + m, out + i0);
  }
  return static_cast<std::size_t>(bad);
}

template std::size_t add_fixed<float>(std::span<int128>, std::span<const float>);
template std::size_t add_fixed<double>(std::span<int128>, std::span<const double>);
template void load_fixed<float>(std::span<float>, std::span<const int128>);
template void load_fixed<double>(std::span<double>, std::span<const int128>);
template std::size_t round_trip_fixed<float>(std::span<float>);
template std::size_t sum_fixed_rows<float>(std::span<const float* const>, std::size_t, float*);
template std::size_t sum_fixed_rows<double>(std::span<const double* const>, std::size_t, double*);
template std::size_t round_trip_fixed<double>(std::span<double>);
template std::size_t add_leaf<float>(std::span<double>, std::span<std::uint8_t>, std::span<int128>,
                                     std::span<const float>);
template std::size_t add_leaf<double>(std::span<double>, std::span<std::uint8_t>, std::span<int128>,
                                      std::span<const double>);
template void load_partials<float>(std::span<float>, std::span<const double>, std::span<const std::uint8_t>,
                                   std::span<const int128>);
template void load_partials<double>(std::span<double>, std::span<const double>, std::span<const std::uint8_t>,
                                    std::span<const int128>);

}  // namespace moetune::dist
