// Buffers that a step overwrites before it reads them (activation caches, the rows an
// expert-parallel rank receives, backward scratch), whose size moves from step to step
// (the rows of each expert and each rank follow the routing; RL batches vary in length).
// std::vector::resize is wrong for them three ways: it reallocates to exactly the new
// size once the vector has shrunk below it (a size that goes up and down reallocates
// again and again), it copies the stale contents into the new block, and a resize up
// within the capacity zero-fills the new elements. Each reallocation of a large buffer is
// fresh memory from the kernel, paid in page faults at first touch (expensive under a
// hypervisor: at ep = 2 on examples/d512.json a rank whose share of the rows reached a
// new high ran its experts at a third of their speed).
#pragma once
#include <cstddef>
#include <vector>

namespace moetune {

// Makes v hold at least n elements and returns its data. Grows only (a smaller n keeps
// the size and contents); past the capacity it reallocates with a quarter of headroom,
// dropping the old contents instead of copying them. New elements are zero.
template <class T>
T* grow_scratch(std::vector<T>& v, size_t n) {
  if (n > v.capacity()) {
    std::vector<T>().swap(v);  // free the old block first: no copy, no old + new peak
    v.reserve(n + n / 4);
  }
  if (n > v.size()) v.resize(n);
  return v.data();
}

}  // namespace moetune
