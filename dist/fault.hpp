// Fault injection for tests of supervision and atomic checkpoints. With
//   MOETUNE_FAULT="rank=R,step=S,when=after-step|in-save|nan[,once=FILE]"
// rank R kills itself with SIGKILL after optimizer step S completes, or in the middle
// of writing step S's checkpoint (after its shard files, before the checkpoint is
// complete), or (when=nan) makes its gradients of step S non-finite. Several specs
// may be given, separated by ';'. With once=FILE the fault fires only if FILE does not exist, and creates
// it first, so a relaunched job runs through.
#pragma once
#include <cstdint>

namespace moetune::dist {

// True if MOETUNE_FAULT names this (when, step, rank) (and, with once=FILE, FILE did
// not exist yet; it is created).
bool fault_requested(const char* when, int64_t step, int rank);
// `when` is "after-step" or "in-save": SIGKILL this process if requested.
void maybe_inject_fault(const char* when, int64_t step, int rank);

}  // namespace moetune::dist
