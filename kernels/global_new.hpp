// Replacing the global operator new / delete of a program, in one place. A program
// that wants it includes this header in exactly one of its .cpp files and writes
//   MOETUNE_REPLACE_GLOBAL_NEW(allocate)
// at namespace scope, where `allocate(n)` returns n bytes (or nullptr) to be freed with
// std::free. Users: the moetune executable (cli/aligned_new.cpp: large blocks on a cache
// line) and the test binary (tests/test_alloc.cpp: the same, counted).
#pragma once
#include <cstddef>
#include <cstdlib>
#include <new>

namespace moetune::kernels {

// n bytes from malloc, starting on a 64-byte cache line when n >= 4 KiB. glibc's malloc
// returns a large block 16 bytes past a line (its chunk header), so every activation,
// gradient and weight buffer of a step started there: each 64-byte AVX-512 load or store
// along their rows touched two lines, and blocks two threads wrote side by side (a head's
// block of a row in attention, a column tile of a GEMM) shared a line at each end. No
// value depends on where a buffer starts (every reduction has a fixed order), only the
// speed (docs/kernels.md "Aligned buffers"). Smaller blocks keep malloc's 16 bytes.
inline void* line_aligned_alloc(std::size_t n) {
  constexpr std::size_t kLine = 64, kAlignFrom = 4096;
  return n >= kAlignFrom ? std::aligned_alloc(kLine, (n + kLine - 1) / kLine * kLine) : std::malloc(n ? n : 1);
}

}  // namespace moetune::kernels

// GCC sees the std::free of a block from the replacement and warns about a mismatch
// that is not one; the pragma is for the one file that expands this.
#define MOETUNE_REPLACE_GLOBAL_NEW(allocate)                                                            \
  _Pragma("GCC diagnostic ignored \"-Wmismatched-new-delete\"") void* operator new(std::size_t n) {    \
    if (void* p = allocate(n)) return p;                                                                \
    throw std::bad_alloc();                                                                             \
  }                                                                                                     \
  void* operator new[](std::size_t n) { return operator new(n); }                                       \
  void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return allocate(n); }            \
  void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return allocate(n); }          \
  void operator delete(void* p) noexcept { std::free(p); }                                              \
  void operator delete[](void* p) noexcept { std::free(p); }                                            \
  void operator delete(void* p, std::size_t) noexcept { std::free(p); }                                 \
  void operator delete[](void* p, std::size_t) noexcept { std::free(p); }                               \
  void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }                       \
  void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
