// The moetune executable's global operator new: blocks of 4 KiB and more start on a
// 64-byte cache line. glibc's malloc returns them 16 bytes past a line (its chunk
// header), so every activation, gradient and weight buffer of a step was misaligned:
// each 64-byte AVX-512 load or store of their rows touched two lines, and a row's
// blocks of one head (attention) or one column tile (GEMM) shared a line with the
// neighbouring block another thread wrote. No value depends on where a buffer starts
// (every reduction has a fixed order, kernels/gemm.hpp, docs/kernels.md), so the bits
// are the same; only the speed changes (docs/kernels.md "Aligned buffers").
// Smaller blocks keep malloc's alignment (16 bytes). Only this executable replaces the
// operators: the library does not, and the test binary counts allocations with its
// own (tests/test_alloc.cpp).
#include <cstdlib>
#include <new>

namespace {
constexpr std::size_t kLine = 64, kAlignFrom = 4096;

void* allocate(std::size_t n) {
  void* p = n >= kAlignFrom ? std::aligned_alloc(kLine, (n + kLine - 1) / kLine * kLine) : std::malloc(n ? n : 1);
  if (!p) throw std::bad_alloc();
  return p;
}
}  // namespace

void* operator new(std::size_t n) { return allocate(n); }
void* operator new[](std::size_t n) { return allocate(n); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return allocate(n);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t n, const std::nothrow_t& t) noexcept { return operator new(n, t); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
