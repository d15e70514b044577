// dist/int128.hpp — 128-bit fixed-point numbers for exact, order-independent gradient
// sums across ranks.
//
// A gradient value v (float or double) is stored as the integer round_toward_zero(v * 2^100)
// in a signed 128-bit integer. Integer addition is exact and associative, so the sum of
// the same fixed-point values is bit-identical whatever the order in which they are added:
// the MPI reduction (Comm::allreduce_sum<int128>, dist/comm.hpp) may combine ranks in any
// tree and the result does not change with the number of ranks. Floating-point sums do
// not have this property (demonstrated in tests/mpi/test_comm.cpp).
//
// Range and precision:
//   - |v| < 2^26 is accepted; |v| >= 2^26 (finite) throws moetune::Error.
//   - Resolution is 2^-100. A double in [2^e, 2^(e+1)) has its last mantissa bit at
//     2^(e-52), a float at 2^(e-23); so every double with |v| >= 2^-48 and every float
//     with |v| >= 2^-77 converts exactly, and from_fixed(to_fixed(v)) == v for
//     2^-48 <= |v| < 2^26 (in particular for the 2^-47 <= |v| < 2^26 of the design).
//     Smaller values are truncated toward zero at 2^-100.
//   - Additions wrap modulo 2^128 (they are done in unsigned arithmetic, never signed
//     overflow UB). Because wrapping addition is still associative, a total is exact
//     whenever the TRUE total lies in (-2^127, 2^127), i.e. |sum of values| < 2^27, even if
//     a partial sum wrapped on the way.
//
// Non-finite values (NaN, +-inf) are never UB: to_fixed saturates them to the sentinels
// kFixedMax (+inf and NaN) and kFixedMin (-inf), and add_fixed returns how many it met.
// A fixed-point buffer that received a non-finite value holds meaningless numbers in those
// slots; the caller (the trainer) must combine the count across ranks (Comm::all_true)
// and skip the optimizer step.
#pragma once
#include <cstddef>
#include <cstdint>
#include <span>

namespace moetune::dist {

__extension__ using int128 = __int128;            // GCC/Clang extension, silenced for -Wpedantic
__extension__ using uint128 = unsigned __int128;  // wrapping arithmetic for sums

inline constexpr int kFixedFractionBits = 100;    // value = integer * 2^-100
inline constexpr int kFixedRangeExponent = 26;    // accepted: |v| < 2^26
inline constexpr int128 kFixedMax = static_cast<int128>((static_cast<uint128>(1) << 127) - 1);
inline constexpr int128 kFixedMin = -kFixedMax - 1;

// Wrapping 128-bit addition (a + b mod 2^128): exact, associative, commutative, no UB.
inline int128 fixed_add(int128 a, int128 b) noexcept {
  return static_cast<int128>(static_cast<uint128>(a) + static_cast<uint128>(b));
}

// v * 2^100 rounded toward zero. Finite |v| >= 2^26 throws moetune::Error("gradient value
// ... out of the fixed-point range ..."). NaN and +inf give kFixedMax, -inf gives kFixedMin.
int128 to_fixed(double v);

// (double)v * 2^-100: v rounded to the nearest double, then scaled exactly.
double from_fixed(int128 v);

// acc[i] = acc[i] + to_fixed(values[i]) for all i (wrapping add), OpenMP parallel.
// acc (n), values (n); sizes must match (moetune::Error otherwise).
// Returns the number of non-finite values met; their slots are set to the sentinel
// (kFixedMax / kFixedMin) instead of being added. A finite value out of range throws
// moetune::Error naming its index after the loop; acc then has every other value added.
// Instantiated for T = float and T = double.
template <class T>
std::size_t add_fixed(std::span<int128> acc, std::span<const T> values);

// out[i] = T(from_fixed(acc[i])), OpenMP parallel. out (n), acc (n); sizes must match.
// Instantiated for T = float and T = double.
template <class T>
void load_fixed(std::span<T> out, std::span<const int128> acc);

// values[i] = T(from_fixed(to_fixed(values[i]))) in place, OpenMP parallel: what
// add_fixed into a zero accumulator followed by load_fixed gives, without the 16 bytes
// per element of the accumulator (the trainer uses it when every element has exactly
// one leaf: one rank, one micro-batch). Bit for bit the same as that pair, also for the
// values it cannot sum: a non-finite value becomes from_fixed of its sentinel, a finite
// value out of range becomes 0 (add_fixed leaves its slot at zero). Returns how many
// values were non-finite or out of range (add_fixed counts the first and throws for the
// second; here both are counted, so the caller treats them alike). The common case
// costs one compare: a float with 2^-77 <= |v| < 2^26 (a double with 2^-48 <= |v|)
// converts exactly and comes back unchanged.
template <class T>
std::size_t round_trip_fixed(std::span<T> values);

// The int128 accumulator of many leaves per element, made cheap (the exact gradient sum
// of several micro-batches per rank): each element's running sum stays in a double,
// partial[i], for as long as it is exact there (every leaf so far converts exactly, no
// addition rounded, |partial| < 2^26), and moves to acc[i] in int128 (in_fixed[i] = 1)
// the first time it would not be. Either way the running sum is the exact sum of the
// leaves' fixed-point values, so after fold_partials acc holds bit for bit what add_fixed
// of every leaf into a zero accumulator holds. Start from partial = 0 and in_fixed = 0;
// acc needs no zeroing (an element's slot is written when it moves). add_leaf returns
// the non-finite values met and throws, after the loop, for a finite value out of range,
// as add_fixed does. The common case is one vectorized pass in double per leaf instead
// of add_fixed's int128 conversion per element.
template <class T>
std::size_t add_leaf(std::span<double> partial, std::span<std::uint8_t> in_fixed, std::span<int128> acc,
                     std::span<const T> values);
// acc[i] = to_fixed(partial[i]) (exact) where in_fixed[i] == 0: the accumulator add_fixed
// would hold.
void fold_partials(std::span<int128> acc, std::span<const double> partial, std::span<const std::uint8_t> in_fixed);
// out[i] = T(from_fixed(the element's sum)): T(partial[i]) where in_fixed[i] == 0 (exact, so
// from_fixed would return it unchanged), else T(from_fixed(acc[i])); what fold_partials
// then load_fixed give.
template <class T>
void load_partials(std::span<T> out, std::span<const double> partial, std::span<const std::uint8_t> in_fixed,
                   std::span<const int128> acc);
// out[i] = T(from_fixed(sum over rows r of to_fixed(rows[r][i]))) for i < len: the exact
// sum of rows.size() (>= 1) leaves of one element each, what add_fixed of each row into a
// zero accumulator followed by load_fixed gives, bit for bit, also for a value it cannot
// sum (a non-finite value adds its sentinel, a finite value out of range adds 0).
// Returns how many such values it met. OpenMP parallel. A sum that double arithmetic
// does exactly (every value 0 or 2^-77 <= |v| < 2^26 for float, 2^-48 for double, and no
// partial sum rounded, checked with Knuth's TwoSum) is taken from the double sum, which
// is then the same number; every other element is summed in int128. out may be one of
// the rows (the sum in place); it must not overlap any row otherwise.
template <class T>
std::size_t sum_fixed_rows(std::span<const T* const> rows, std::size_t len, T* out);

}  // namespace moetune::dist
