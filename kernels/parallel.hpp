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

}  // namespace moetune::kernels
