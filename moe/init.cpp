#include "moe/init.hpp"

#include <cmath>
#include <utility>

namespace moetune {
namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

uint64_t fnv1a64(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char ch : s) {
    h ^= ch;
    h *= 0x100000001b3ull;
  }
  return h;
}

double uniform53(uint64_t bits) { return double(bits >> 11) * (1.0 / 9007199254740992.0); }

}  // namespace

uint64_t counter_key(uint64_t seed, const std::string& name) { return splitmix64(seed ^ splitmix64(fnv1a64(name))); }

double counter_normal(uint64_t seed, const std::string& name, uint64_t index) {
  return counter_normal_keyed(counter_key(seed, name), index);
}

double counter_normal_keyed(uint64_t key, uint64_t index) {
  const uint64_t a = splitmix64(key ^ splitmix64(2 * index));
  const uint64_t b = splitmix64(key ^ splitmix64(2 * index + 1));
  const double u1 = 1.0 - uniform53(a);  // (0, 1]
  const double u2 = uniform53(b);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
}

uint64_t counter_bits(uint64_t key, uint64_t index) { return splitmix64(key ^ splitmix64(index)); }

std::vector<int32_t> init_tid2eid(const ModelConfig& cfg, uint64_t seed, int l) {
  const int64_t V = cfg.vocab_size;
  const int K = cfg.K(), E = cfg.E();
  const uint64_t key = counter_key(seed, ParamLayout::tid2eid_name(l));
  std::vector<int32_t> table(V * K), perm(E);
  for (int64_t v = 0; v < V; ++v) {
    for (int e = 0; e < E; ++e) perm[e] = e;
    for (int k = 0; k < K; ++k) {
      const uint64_t j = uint64_t(k) + counter_bits(key, uint64_t(v) * K + k) % uint64_t(E - k);
      std::swap(perm[k], perm[j]);
      table[v * K + k] = perm[k];
    }
  }
  return table;
}

template <class T>
void init_params(const ParamLayout& layout, const ModelConfig& cfg, uint64_t seed, std::vector<T>& params) {
  params.assign(layout.total(), T(0));
  for (const auto& t : layout.tensors()) {
    T* p = params.data() + t.offset;
    if (t.shape.size() == 1) {
      // RMSNorm weights and mHC scales 1; mHC biases (.base, .hc_base) 0, as
      // transformers' DeepseekV4PreTrainedModel._init_weights (fn: normal, below); V4
      // attention's sink logits (self_attn.sinks) start at 0.
      const bool zero = t.name.ends_with(".base") || t.name.ends_with(".hc_base") || t.name.ends_with(".sinks");
      for (size_t i = 0; i < t.numel; ++i) p[i] = T(zero ? 0 : 1);
      continue;
    }
    const uint64_t key = counter_key(seed, t.name);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < t.numel; ++i) p[i] = T(cfg.initializer_range * counter_normal_keyed(key, i));
  }
}

template void init_params<float>(const ParamLayout&, const ModelConfig&, uint64_t, std::vector<float>&);
template void init_params<double>(const ParamLayout&, const ModelConfig&, uint64_t, std::vector<double>&);

}  // namespace moetune
