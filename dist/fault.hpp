// Fault injection for tests of supervision and atomic checkpoints. With
//   MOETUNE_FAULT="rank=R,step=S,when=after-step|in-save[,once=FILE]"
// rank R kills itself with SIGKILL after optimizer step S completes, or in the middle
// of writing step S's checkpoint (after its shard files, before the checkpoint is
// complete). With once=FILE the fault fires only if FILE does not exist, and creates
// it first, so a relaunched job runs through.
#pragma once
#include <cstdint>

namespace moetune::dist {

// `when` is "after-step" or "in-save".
void maybe_inject_fault(const char* when, int64_t step, int rank);

}  // namespace moetune::dist
