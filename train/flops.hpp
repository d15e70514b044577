// Training FLOPs per token and the machine's peak FLOP/s, for MFU (MODEL.md section 9).
//   MFU = flops_per_token * tokens_per_second / peak_flops
// where peak_flops is what measure_peak_flops() reports for the threads in use
// (report that number and how it was obtained next to any MFU figure).
#pragma once
#include <cstdint>
#include <string>

#include "moe/config.hpp"

namespace moetune {

// N_active: matrix parameters one token touches. Per layer the attention q, k, v, o
// projections; a dense layer's gate/up/down; a MoE layer's router (E x d), shared
// experts (3 x S*F x d) and K routed experts (K x 3 x F x d); plus the LM head (V x d),
// counted even when tied to the embedding (MODEL.md 8.10). The embedding lookup and
// the RMSNorm weights are not matrix multiplications and are not counted. mHC (MODEL.md
// section 12) adds its projections fn: 2 x (2+n)n x n d per block and n x n d per head
// collapse; MTP adds e_proj and h_proj (2 d x d), its block (as a MoE layer, with its
// mHC connections), its head collapse and the LM head once more. The per-token mHC
// coefficient, Sinkhorn and stream-mixing arithmetic (O(n^2 d)) is not counted, like
// RMSNorm's.
int64_t active_matrix_params(const ModelConfig& cfg);

// Training FLOPs per token: 6 * N_active + 6 * L' * H * hd * S_ctx (forward 2N + 2
// attention score/value matmuls over a causal context, backward twice that), L' = L + 1
// with an MTP block. S_ctx = attention_context(): seq_len, or 2W - W^2/seq_len under a
// V4 sliding window W < seq_len. V4 attention's N_active counts q_a, q_b, kv, o_a (per
// group) and o_b (MODEL.md 12).
double attention_context(const ModelConfig& cfg, int seq_len);
double flops_per_token(const ModelConfig& cfg, int seq_len);

// Model FLOPs utilisation; 0 when peak_flops is not positive.
double mfu(double flops_per_token, double tokens_per_second, double peak_flops);

// Measured fp32 peak of `threads` cores: every thread runs independent chains of
// SIMD fused multiply-adds held in registers for about `seconds`; 2 FLOPs per FMA
// lane. The widest available kernel is chosen at run time (AVX-512F+FMA, AVX2+FMA,
// or a portable fallback), so a portable build still measures the real peak.
// Returns total FLOP/s over all threads.
double measure_peak_flops(int threads, double seconds = 0.3);

// Which probe kernel measure_peak_flops uses on this CPU: "avx512f+fma", "avx2+fma"
// or "generic".
std::string peak_probe_isa();

// "model name" of /proc/cpuinfo (first core), or "unknown".
std::string cpu_model_name();

}  // namespace moetune
