// Sampling the next token of a rollout from one position's logits (MODEL.md section 10):
// temperature, top-k, top-p, then a draw from a counter-based uniform, so a rollout is
// the same on any number of ranks and threads. Also the log-probability of a token
// under the temperature-scaled distribution (top-k/top-p are sampling filters only).
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

namespace moetune {

struct SamplingConfig {
  double temperature = 1.0;  // rl.temperature: 0 = greedy (argmax)
  int top_k = 0;             // rl.top_k: 0 keeps every token
  double top_p = 1.0;        // rl.top_p in (0, 1]: 1 keeps every token
};

// Throws moetune::Error naming rl.temperature (negative or not finite), rl.top_k (< 0)
// or rl.top_p (not in (0, 1]).
void validate(const SamplingConfig& c);

// Uniform in [0, 1) for the key (seed, step, global prompt index, sample index, position):
//   h = splitmix64(seed); h = splitmix64(h ^ step); h = splitmix64(h ^ prompt);
//   h = splitmix64(h ^ sample); h = splitmix64(h ^ position); u = (h >> 11) * 2^-53
// (signed parts reinterpreted as uint64; splitmix64 is the finaliser of moe/init.cpp:
// x += 0x9E3779B97F4A7C15, two xor-shift-multiply rounds, xor-shift 31). Each round is a
// bijection, so changing any one part of the key changes h. Depends on nothing else.
double sampling_uniform(uint64_t seed, int64_t step, int64_t prompt, int64_t sample, int64_t position);

// The next token from the logits z (V) of one position, in the order of section 10:
// 1. temperature 0: argmax (ties: lower id). Otherwise x = z / temperature (double).
// 2. top_k k > 0: keep the k largest x (ties: lower id).
// 3. sort the kept tokens by probability p = softmax(x) over the kept ones (descending,
//    ties: lower id); top_p < 1 keeps the shortest prefix whose cumulative p >= top_p
//    (at least one token).
// 4. renormalise over the kept prefix and return the first token of it whose cumulative
//    probability exceeds u (the last kept token if rounding leaves none).
// u in [0, 1) (sampling_uniform). `scratch` is reused between calls (no allocation once
// it has grown to V). The config is assumed valid (validate).
template <class T>
int32_t sample_token(const T* logits, int64_t V, const SamplingConfig& c, double u,
                     std::vector<std::pair<double, int32_t>>& scratch);

// log_softmax(z / temperature)[id] over the full vocabulary, in double; temperature 0
// is treated as 1. logits (V). Bit-identical to token_logprobs / rl_loss_head
// (train/rl_loss.hpp) on the same row.
template <class T>
double token_logprob(const T* logits, int64_t V, double temperature, int32_t id);

}  // namespace moetune
