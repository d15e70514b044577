// FLOPs per trained token (MODEL.md section 9) and a measured fp32 peak for MFU.
//
// The peak probe: each OpenMP thread repeatedly runs a kernel that keeps N independent
// vector accumulators in registers and updates each with acc = acc * mul + add as one
// fused multiply-add per iteration. N chains hide the FMA latency (4 cycles on current
// x86 cores with 2 FMA pipes needs >= 8 chains; we use 16 zmm or 12 ymm registers, the
// latter leaving room for the two constants in the 16 ymm registers of AVX2). The
// kernel is compiled three times in this one file with GCC function attributes
// (target("avx512f,fma"), target("avx2,fma"), and the build's default flags) and the
// widest one the CPU and OS support is chosen at run time with __builtin_cpu_supports,
// so a portable (-march=x86-64) build still measures the real peak. The generic kernel
// (other CPUs, or x86 without FMA) uses separate multiply and add under `omp simd`,
// still counted as 2 FLOPs per lane. Measure with an optimised build (Release).
#include "train/flops.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MOETUNE_X86_PROBE 1
#else
#define MOETUNE_X86_PROBE 0
#endif

namespace moetune {

int64_t active_matrix_params(const ModelConfig& c) {
  const int64_t d = c.d(), q = int64_t(c.H()) * c.hd(), kv = int64_t(c.Hkv()) * c.hd();
  const int64_t h = c.hc_mult;
  int64_t n = 0;
  const auto block = [&](int l) {  // one decoder block: model layer l or the MTP block
    if (c.v4_attention()) {
      // V4 (MODEL.md 12): q_a_proj (qr, d), q_b_proj (H*hd, qr), kv_proj (hd, d), o_a_proj
      // (G*r, H*hd/G: each output sees one group, G*r*H*hd/G = r*H*hd), o_b_proj (d, G*r).
      const int64_t qr = c.q_lora_rank, r = c.o_lora_rank, G = c.o_groups;
      n += qr * d + q * qr + int64_t(c.hd()) * d + r * q + d * G * r;
    } else {
      n += q * d + 2 * kv * d + d * q;  // q_proj (H*hd, d), k/v_proj (H_kv*hd, d), o_proj (d, H*hd)
    }
    if (!c.is_moe_layer(l)) {
      n += 3 * int64_t(c.intermediate_size) * d;  // gate/up (I, d), down (d, I)
    } else {
      n += int64_t(c.E()) * d;                            // router gate (E, d)
      n += 3 * int64_t(c.shared_width()) * d;             // shared experts (S*F, d) x 3
      n += int64_t(c.K()) * 3 * int64_t(c.F()) * d;       // K routed experts (F, d) x 3
    }
    if (c.hc()) n += 2 * (2 + h) * h * (h * d);  // mHC: attn_hc and ffn_hc fn ((2+n)n, n d)
  };
  for (int l = 0; l < c.num_hidden_layers; ++l) block(l);
  if (c.hc()) n += h * (h * d);    // mHC: hc_head fn (n, n d)
  n += int64_t(c.vocab_size) * d;  // lm_head (V, d), counted even when tied
  if (c.mtp()) {                   // MTP: e_proj, h_proj (d, d), its block, its hc_head, the shared head again
    n += 2 * d * d;
    block(ModelConfig::kMtpLayer);
    if (c.hc()) n += h * (h * d);
    n += int64_t(c.vocab_size) * d;
  }
  return n;
}

// The attention term 6 * L * H * hd * S_ctx: S_ctx = seq_len for causal attention over
// every earlier key (mean context S/2, 12 FLOPs per channel and key: QK^T and PV, forward
// and backward). A V4 sliding window W < S sees on average W - W^2/(2S) keys (the first
// W-1 queries see fewer), so S_ctx = 2W - W^2/S (= S at W = S).
double attention_context(const ModelConfig& c, int seq_len) {
  const double S = seq_len, W = c.v4_attention() ? c.sliding_window : 0;
  return W > 0 && W < S ? 2 * W - W * W / S : S;
}

double flops_per_token(const ModelConfig& c, int seq_len) {
  const int attention_layers = c.num_hidden_layers + (c.mtp() ? 1 : 0);
  return 6.0 * static_cast<double>(active_matrix_params(c)) +
         6.0 * attention_layers * double(c.H()) * double(c.hd()) * attention_context(c, seq_len);
}

double mfu(double flops_per_token, double tokens_per_second, double peak_flops) {
  if (!(peak_flops > 0.0)) return 0.0;
  return flops_per_token * tokens_per_second / peak_flops;
}

namespace {

// A probe kernel: runs `iters` iterations and returns a value that depends on every
// accumulator (so nothing can be optimised away). `seed` is a run-time value so the
// chains start from different, unknown values and cannot be merged or folded.
struct ProbeKernel {
  float (*run)(int64_t iters, float seed);
  double flops_per_iter;
  const char* name;
};

constexpr float kMul = 0.999999f, kAdd = 1e-6f;  // acc -> 1: stays finite and normal

#if MOETUNE_X86_PROBE
constexpr int kAcc512 = 16;  // 16 zmm accumulators x 16 lanes
__attribute__((target("avx512f,fma"))) float probe_avx512(int64_t iters, float seed) {
  const __m512 mul = _mm512_set1_ps(kMul), add = _mm512_set1_ps(kAdd);
  __m512 acc[kAcc512];
#pragma GCC unroll 16
  for (int a = 0; a < kAcc512; ++a) acc[a] = _mm512_set1_ps(seed + 0.01f * float(a));
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 16
    for (int a = 0; a < kAcc512; ++a) acc[a] = _mm512_fmadd_ps(acc[a], mul, add);
  }
  __m512 s = acc[0];
#pragma GCC unroll 16
  for (int a = 1; a < kAcc512; ++a) s = _mm512_add_ps(s, acc[a]);
  // (not _mm512_reduce_add_ps: GCC 12's version warns about an uninitialised temporary)
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, s);
  float r = 0.0f;
  for (float x : lanes) r += x;
  return r;
}

constexpr int kAcc256 = 12;  // 12 ymm accumulators x 8 lanes (+ 2 constants <= 16 registers)
__attribute__((target("avx2,fma"))) float probe_avx2(int64_t iters, float seed) {
  const __m256 mul = _mm256_set1_ps(kMul), add = _mm256_set1_ps(kAdd);
  __m256 acc[kAcc256];
#pragma GCC unroll 12
  for (int a = 0; a < kAcc256; ++a) acc[a] = _mm256_set1_ps(seed + 0.01f * float(a));
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 12
    for (int a = 0; a < kAcc256; ++a) acc[a] = _mm256_fmadd_ps(acc[a], mul, add);
  }
  __m256 s = acc[0];
#pragma GCC unroll 12
  for (int a = 1; a < kAcc256; ++a) s = _mm256_add_ps(s, acc[a]);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, s);
  float r = 0.0f;
  for (float x : lanes) r += x;
  return r;
}
#endif

constexpr int kAccGen = 8, kLanesGen = 16;  // 8 chains of 16 lanes
float probe_generic(int64_t iters, float seed) {
  float acc[kAccGen][kLanesGen];
  for (int a = 0; a < kAccGen; ++a)
    for (int l = 0; l < kLanesGen; ++l) acc[a][l] = seed + 0.01f * float(a) + 0.001f * float(l);
  for (int64_t i = 0; i < iters; ++i)
    for (int a = 0; a < kAccGen; ++a) {
#pragma omp simd
      for (int l = 0; l < kLanesGen; ++l) acc[a][l] = acc[a][l] * kMul + kAdd;
    }
  float r = 0.0f;
  for (int a = 0; a < kAccGen; ++a)
    for (int l = 0; l < kLanesGen; ++l) r += acc[a][l];
  return r;
}

ProbeKernel pick_kernel() {
#if MOETUNE_X86_PROBE
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the AVX/AVX-512 state.
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma"))
    return {probe_avx512, 2.0 * kAcc512 * 16, "avx512f+fma"};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return {probe_avx2, 2.0 * kAcc256 * 8, "avx2+fma"};
#endif
  return {probe_generic, 2.0 * kAccGen * kLanesGen, "generic"};
}

}  // namespace

std::string peak_probe_isa() { return pick_kernel().name; }

double measure_peak_flops(int threads, double seconds) {
  const ProbeKernel k = pick_kernel();
  threads = std::max(1, threads);
  seconds = std::max(seconds, 1e-3);
  constexpr int64_t kIters = 1 << 14;  // one call: ~0.1-0.5 ms on a current core
  const double warmup = std::min(0.05, seconds / 4);
  double total_flops = 0.0, t_start = 0.0, t_end = 0.0;
  std::vector<float> sink(static_cast<size_t>(threads), 0.0f);
#pragma omp parallel num_threads(threads) reduction(+ : total_flops)
  {
    const int tid = omp_get_thread_num();
    const float seed = 0.5f + 0.001f * float(tid) + sink[static_cast<size_t>(tid)];
    float s = 0.0f;
    // Warm-up: let the core reach its (vector) clock before the timed part.
    for (const double w0 = omp_get_wtime(); omp_get_wtime() - w0 < warmup;) s += k.run(kIters, seed);
#pragma omp barrier
#pragma omp single
    t_start = omp_get_wtime();  // implicit barrier: every thread starts after this
    int64_t calls = 0;
    do {
      s += k.run(kIters, seed);
      ++calls;
    } while (omp_get_wtime() - t_start < seconds);
    total_flops += static_cast<double>(calls) * static_cast<double>(kIters) * k.flops_per_iter;
    sink[static_cast<size_t>(tid)] = s;
#pragma omp barrier
#pragma omp single
    t_end = omp_get_wtime();
  }
  // Keep the kernels' results observable.
  volatile float keep = 0.0f;
  for (float s : sink) keep = keep + s;
  const double elapsed = t_end - t_start;
  return elapsed > 0.0 ? total_flops / elapsed : 0.0;
}

std::string cpu_model_name() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) != 0) continue;
    const auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    auto begin = line.find_first_not_of(" \t", colon + 1);
    if (begin == std::string::npos) continue;
    auto end = line.find_last_not_of(" \t\r");
    return line.substr(begin, end - begin + 1);
  }
  return "unknown";
}

}  // namespace moetune
