// MOETUNE_CPU_CLONES: compile an elementwise loop for AVX-512, AVX2 and the baseline
// (SSE2), the best one this CPU runs chosen once at load time (GCC function
// multiversioning, an ifunc), so the default portable build gets wide vectors in the
// loops the GEMM does not cover (SwiGLU, softmax rows, AdamW). The GEMM itself has its
// own per-ISA translation units (kernels/gemm.cpp).
//
// Same bits on every clone: the loops it marks are elementwise (or reduce in a written
// order GCC keeps), the build contracts no multiply-add (-ffp-contract=off) and
// reassociates nothing, so each clone evaluates the same IEEE operations on each
// element, only more of them at once.
//
// Only where it applies: GCC on x86-64 without -march flags of its own (a -march=native
// build is already compiled for its CPU). Clang (the fuzz build) and other targets get
// the plain function.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__AVX2__) && \
    !defined(MOETUNE_NO_CPU_CLONES)
#define MOETUNE_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MOETUNE_CPU_CLONES
#endif
