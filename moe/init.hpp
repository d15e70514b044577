// Counter-based initialisation (MODEL.md section 6): the value of element i of tensor
// `name` depends only on (seed, name, i), never on the number of ranks or the order
// in which tensors are created.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "moe/params.hpp"

namespace moetune {

// Standard normal N(0,1) for (seed, name, index): splitmix64 of a hash of the three,
// then Box-Muller on two 53-bit uniforms.
double counter_normal(uint64_t seed, const std::string& name, uint64_t index);
// The same, split so that the (seed, name) hash is computed once per tensor.
uint64_t counter_key(uint64_t seed, const std::string& name);
double counter_normal_keyed(uint64_t key, uint64_t index);

// Fills params (layout.total() elements) as MODEL.md section 6 says: matrices
// N(0, initializer_range^2), RMSNorm weights 1.
template <class T>
void init_params(const ParamLayout& layout, const ModelConfig& cfg, uint64_t seed, std::vector<T>& params);

// The default hash-routing table of model layer l (MODEL.md section 12), (V,K) row-major:
// row v holds K distinct experts, a partial Fisher-Yates shuffle of 0..E-1 whose k-th
// swap partner is k + counter_bits(key, v*K + k) % (E - k), key = counter_key(seed,
// tid2eid_name(l)). Depends only on (seed, l, V, K, E).
std::vector<int32_t> init_tid2eid(const ModelConfig& cfg, uint64_t seed, int l);
// 64 random bits for (key, index) (the generator under counter_normal_keyed).
uint64_t counter_bits(uint64_t key, uint64_t index);

}  // namespace moetune
