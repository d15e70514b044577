// When a loop opens an OpenMP team. A parallel region costs libgomp about 1.4 us even
// for a team of one thread, and 2.5 us (with futex system calls) when it is nested in
// another region, also a team of one (measured on the dev VM; a plain call costs 3 ns).
// That was most of a KV-cache decode step while attention called the GEMM per (query,
// head) inside its own loop. So a loop runs on its own thread, without any OpenMP call,
// unless a team can help: more than one thread is allowed, this is not already inside a
// parallel region (the experts' one-per-thread loop, attention's per (row, head)), and
// the caller says the work is worth it.
#pragma once
#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace moetune::kernels {

inline bool use_team(bool worth = true) { return worth && omp_get_level() == 0 && omp_get_max_threads() > 1; }

// for (i = 0; i < n; ++i) body(i): over a team with a static schedule when use_team
// says so (and n > 1), else a plain loop on the calling thread. The iterations must be
// independent; which thread runs one never changes its result.
template <class Body>
void parallel_for(int64_t n, Body&& body, bool worth = true) {
  if (n > 1 && use_team(worth)) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) body(i);
  } else {
    for (int64_t i = 0; i < n; ++i) body(i);
  }
}

// body(b, len) for the fixed chunks [b, b + len) of [0, n), over a team when the range
// is large enough to pay for one (parallel_for decides). The zeroing of gradient and
// activation buffers ran on one thread while the others waited: a twentieth of a
// 2-thread step of examples/small.json. Who handles a chunk never changes a value.
template <class Body>
void parallel_chunks(int64_t n, Body&& body) {
  constexpr int64_t kChunk = int64_t(1) << 15;
  parallel_for(
      (n + kChunk - 1) / kChunk, [&](int64_t c) { body(c * kChunk, std::min(kChunk, n - c * kChunk)); },
      n >= 2 * kChunk);
}

// dst[0, n) = value.
template <class T>
void parallel_fill(T* dst, int64_t n, T value) {
  parallel_chunks(n, [&](int64_t b, int64_t len) { std::fill_n(dst + b, len, value); });
}

// dst[0, n) = src[0, n) (no overlap).
template <class T>
void parallel_copy(T* dst, const T* src, int64_t n) {
  parallel_chunks(n, [&](int64_t b, int64_t len) { std::copy_n(src + b, len, dst + b); });
}

// dst[0, n) += src[0, n) (no overlap), element by element: the same sums on any team.
template <class T>
void parallel_add(T* dst, const T* src, int64_t n) {
  parallel_chunks(n, [&](int64_t b, int64_t len) {
    T* d = dst + b;
    const T* s = src + b;
    for (int64_t i = 0; i < len; ++i) d[i] += s[i];
  });
}

}  // namespace moetune::kernels
