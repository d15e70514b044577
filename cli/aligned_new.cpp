// The moetune executable's global operator new: blocks of 4 KiB and more start on a
// 64-byte cache line (kernels::line_aligned_alloc says why). Only this executable (and
// the test binary, tests/test_alloc.cpp) replaces the operators; the library does not.
#include "kernels/global_new.hpp"

MOETUNE_REPLACE_GLOBAL_NEW(moetune::kernels::line_aligned_alloc)
