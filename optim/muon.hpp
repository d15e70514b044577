// Muon (MODEL.md section 12): momentum SGD whose update of a matrix is orthogonalised
// by a Newton-Schulz iteration. Used with optim.name = "muon" for every rank-2 matrix
// except the embedding and the LM head; the other tensors keep AdamW (optim/optimizer.hpp
// dispatches per tensor).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "moe/params.hpp"

namespace moetune {

struct MuonConfig {
  double momentum = 0.95;     // mu, in [0, 1)
  double weight_decay = 0.1;  // decoupled: W *= 1 - lr_muon * wd
  double lr_ratio = 1.0;      // lr_muon(t) = lr_ratio * lr(t) of the schedule (optim.muon_lr / optim.lr)
};
// Throws moetune::Error naming the key (optim.muon_momentum, optim.muon_weight_decay,
// optim.muon_lr) when a value is out of range.
void validate(const MuonConfig& c);

// True for the tensors Muon updates: rank 2, not model.embed_tokens.weight, not
// lm_head.weight. This includes the router weight (mlp.gate.weight, (E, d)) and every
// routed expert's gate/up/down matrix (each its own matrix).
bool is_muon_tensor(const TensorInfo& t);

// The Newton-Schulz coefficients (a, b, c) of MODEL.md section 12: eight iterations of
// the quintic (3.4445, -4.7750, 2.0315), then two of (2, -1.5, 0.5).
constexpr int kMuonNsSteps = 10;

// In place: x (rows, cols) row-major <- NS(x). X = x / ||x||_F (x transposed first when
// rows > cols, and back at the end), then 10 times X = aX + b(XX^T)X + c(XX^T)^2 X.
// An all-zero x stays zero (the spec's division by ||x||_F = 0 is taken as 0, not NaN).
// Every element is a fixed-order sum (no dependence on the thread count); work is
// scratch space, resized as needed.
template <class T>
void newton_schulz(T* x, int64_t rows, int64_t cols, std::vector<T>& work);

// One Muon step of a (rows, cols) matrix: M = mu M + G; O = NS(mu M + G);
// O *= 0.18 sqrt(max(rows, cols)); W = W (1 - lr wd) - lr O, with lr = lr_ratio * lr_t.
// G is g * T(clip) (the gradient clipping coefficient, as AdamW::step applies it).
template <class T>
void muon_update(T* p, const T* g, T* momentum, int64_t rows, int64_t cols, const MuonConfig& cfg, double lr_t,
                 std::vector<T>& work, double clip = 1.0);

}  // namespace moetune
