// The DeepSeek-V3 gate (MODEL.md sections 2-3): scores, aux-loss-free biased
// selection, group-limited routing, top-K, weight normalisation and scaling,
// capacity drops, and the balance losses (switch aux, sequence-wise, z-loss) with
// their backward; plus DeepSeek-V4's sqrtsoftplus scores and hash routing (a fixed
// per-token selection, section 12). Pure functions over (N,E) buffers; no communication.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "moe/config.hpp"

namespace moetune {

// Routing decision for N tokens. Pair (t,k) = the k-th expert chosen by token t.
template <class T>
struct Routing {
  int64_t N = 0;
  int E = 0, K = 0;
  std::vector<T> scores;         // (N,E) s = softmax/sigmoid/sqrtsoftplus(logits)
  std::vector<int32_t> idx;      // (N,K) selected experts, in selection order
  std::vector<T> weight;         // (N,K) final combine weights (normalised, scaled)
  std::vector<uint8_t> kept;     // (N,K) 0 if dropped by capacity
  std::vector<int64_t> counts;   // (E) pairs routed to each expert, before drops (padding excluded)
  int64_t dropped = 0;
  // (N) 1 = a padding token: computed, but counted in no routing statistic (expert
  // counts, balance losses; MODEL.md section 11). Empty = no padding.
  std::vector<uint8_t> pad;
  bool counted(int64_t t) const { return pad.empty() || pad[size_t(t)] == 0; }
  int64_t counted_tokens() const {
    int64_t n = 0;
    for (int64_t t = 0; t < N; ++t) n += counted(t);
    return n;
  }
};

// softplus(x) = log(1 + e^x), without overflow for large |x|.
template <class T>
T softplus(T x) {
  return std::max(x, T(0)) + std::log1p(std::exp(-std::fabs(x)));
}

// s (E) = softmax(x), sigmoid(x) or sqrt(softplus(x)) of one token's router logits x (E).
template <class T>
void router_scores(T* s, const T* x, const ModelConfig& c) {
  const int E = c.E();
  if (c.sigmoid()) {
    for (int e = 0; e < E; ++e) s[e] = T(1) / (T(1) + std::exp(-x[e]));
  } else if (c.sqrtsoftplus()) {
    for (int e = 0; e < E; ++e) s[e] = std::sqrt(softplus(x[e]));
  } else {
    T mx = x[0];
    for (int e = 1; e < E; ++e) mx = std::max(mx, x[e]);
    T sum = 0;
    for (int e = 0; e < E; ++e) sum += (s[e] = std::exp(x[e] - mx));
    for (int e = 0; e < E; ++e) s[e] /= sum;
  }
}

// w (K) = s[id], normalised (norm_topk_prob) and scaled (routed_scaling_factor).
template <class T>
void router_weights(T* w, const T* s, const int32_t* id, const ModelConfig& c) {
  const int K = c.K();
  T wsum = 0;
  for (int k = 0; k < K; ++k) {
    w[k] = s[id[k]];
    wsum += w[k];
  }
  const T scale = T(c.routed_scaling_factor) / (c.norm_topk_prob ? wsum + T(1e-20) : T(1));
  for (int k = 0; k < K; ++k) w[k] *= scale;
}

// Per-token selection (greedy or noaux_tc with bias, optionally group-limited).
// logits (N,E); bias (E) fp32 (used only under noaux_tc). Fills r (all but `kept`).
template <class T>
void route_select(Routing<T>& r, const T* logits, const float* bias, const ModelConfig& c, int64_t N) {
  const int E = c.E(), K = c.K(), G = c.n_group, gs = E / G;
  r.N = N;
  r.E = E;
  r.K = K;
  r.scores.resize(N * E);
  r.idx.resize(N * K);
  r.weight.resize(N * K);
  r.kept.assign(N * K, 1);
  r.dropped = 0;
  r.pad.clear();
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < N; ++t) {
    // Per-thread scratch, reused from token to token and call to call (no allocation
    // in the steady state; std::stable_sort would take a temporary buffer).
    struct Scratch {
      std::vector<T> sel, gscore, v;
      std::vector<int> order, gorder;
      std::vector<uint8_t> keep;
    };
    static thread_local Scratch sc;
    T* s = r.scores.data() + t * E;
    router_scores(s, logits + t * E, c);
    auto& sel = sc.sel;
    sel.assign(s, s + E);
    if (c.noaux_tc())
      for (int e = 0; e < E; ++e) sel[e] += T(bias[e]);
    // The k best of indices 0..n-1 by key, descending; ties: the lower index first (what
    // a stable sort gives). Insertion into a list of k: O(n k), no allocation.
    auto top_desc = [](std::vector<int>& o, int n, int k, auto key) {
      o.resize(k);
      int len = 0;
      for (int i = 0; i < n; ++i) {
        if (len == k && !(key(i) > key(o[k - 1]))) continue;
        int j = len < k ? len++ : k - 1;
        while (j > 0 && key(i) > key(o[j - 1])) {
          o[j] = o[j - 1];
          --j;
        }
        o[j] = i;
      }
    };
    if (G > 1) {
      auto& gscore = sc.gscore;
      gscore.resize(G);
      for (int g = 0; g < G; ++g) {
        auto& v = sc.v;
        v.assign(sel.begin() + g * gs, sel.begin() + (g + 1) * gs);
        std::sort(v.begin(), v.end(), std::greater<T>());
        gscore[g] = c.noaux_tc() ? (gs >= 2 ? v[0] + v[1] : v[0]) : v[0];
      }
      top_desc(sc.gorder, G, c.topk_group, [&](int g) { return gscore[g]; });
      auto& keep = sc.keep;
      keep.assign(G, 0);
      for (int i = 0; i < c.topk_group; ++i) keep[sc.gorder[i]] = 1;
      for (int e = 0; e < E; ++e)
        if (!keep[e / gs]) sel[e] = -std::numeric_limits<T>::infinity();
    }
    auto& order = sc.order;
    top_desc(order, E, K, [&](int e) { return sel[e]; });
    int32_t* id = r.idx.data() + t * K;
    for (int k = 0; k < K; ++k) id[k] = order[k];
    router_weights(r.weight.data() + t * K, s, id, c);
  }
  r.counts.assign(E, 0);
  for (int64_t i = 0; i < N * K; ++i) r.counts[r.idx[i]]++;
}

// Routing replay (MODEL.md section 11, R2/R3): the selection (idx, kept; (N,K) each,
// after group limits and capacity) is given; scores and weights are recomputed live
// from the logits at those indices, so the gradient flows through the router as usual.
template <class T>
void route_replay(Routing<T>& r, const T* logits, const int32_t* idx, const uint8_t* kept, const ModelConfig& c,
                  int64_t N) {
  const int E = c.E(), K = c.K();
  r.N = N;
  r.E = E;
  r.K = K;
  r.scores.resize(N * E);
  r.idx.assign(idx, idx + N * K);
  r.weight.resize(N * K);
  r.kept.assign(kept, kept + N * K);
  r.pad.clear();
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < N; ++t) {
    router_scores(r.scores.data() + t * E, logits + t * E, c);
    router_weights(r.weight.data() + t * K, r.scores.data() + t * E, r.idx.data() + t * K, c);
  }
  r.counts.assign(E, 0);
  r.dropped = 0;
  for (int64_t i = 0; i < N * K; ++i) {
    if (r.idx[i] < 0 || r.idx[i] >= E) throw std::out_of_range("route_replay: expert index out of range");
    r.counts[r.idx[i]]++;
    r.dropped += r.kept[i] == 0;
  }
}

// Hash routing (MODEL.md section 12): token t of input id ids[t] takes the K experts of
// row ids[t] of tid2eid (V,K), in the table's order; no bias, no group limit. Scores and
// weights are live (as route_replay); counts are those of the table's selection.
// Capacity drops, if any, are applied afterwards by route_capacity as for a live layer.
template <class T>
void route_hash(Routing<T>& r, const T* logits, const int32_t* ids, const int32_t* tid2eid, const ModelConfig& c,
                int64_t N) {
  const int K = c.K();
  std::vector<int32_t> idx(N * K);
  for (int64_t t = 0; t < N; ++t) {
    if (ids[t] < 0 || ids[t] >= c.vocab_size) throw std::out_of_range("route_hash: token id out of range");
    std::copy_n(tid2eid + int64_t(ids[t]) * K, K, idx.data() + t * K);
  }
  const std::vector<uint8_t> kept(N * K, 1);
  route_replay(r, logits, idx.data(), kept.data(), c, N);
}

// Marks the padding tokens (pad (N), 1 = padding) of a routing and recounts the
// expert loads without them; the balance losses below skip them too.
template <class T>
void route_mask_padding(Routing<T>& r, const uint8_t* pad) {
  r.pad.assign(pad, pad + r.N);
  r.counts.assign(r.E, 0);
  for (int64_t t = 0; t < r.N; ++t)
    if (r.counted(t))
      for (int k = 0; k < r.K; ++k) r.counts[r.idx[t * r.K + k]]++;
}

// Capacity drops: each expert keeps at most ceil(c * N * K / E) pairs, those with the
// highest score s (ties: lower token index). capacity_factor 0 = dropless.
template <class T>
void route_capacity(Routing<T>& r, double capacity_factor) {
  if (capacity_factor <= 0) return;
  const int64_t cap = int64_t(std::ceil(capacity_factor * double(r.N) * r.K / r.E));
  std::vector<std::vector<int64_t>> pairs(r.E);  // flat pair index t*K+k, in token order
  for (int64_t i = 0; i < r.N * r.K; ++i) pairs[r.idx[i]].push_back(i);
  for (int e = 0; e < r.E; ++e) {
    auto& p = pairs[e];
    if (int64_t(p.size()) <= cap) continue;
    std::stable_sort(p.begin(), p.end(), [&](int64_t a, int64_t b) {
      return r.scores[(a / r.K) * r.E + e] > r.scores[(b / r.K) * r.E + e];
    });
    for (size_t j = cap; j < p.size(); ++j) r.kept[p[j]] = 0;
    r.dropped += int64_t(p.size()) - cap;
  }
}

// Balance-loss weights of one micro-batch: each is already divided by its global
// normaliser (MODEL.md section 3): aux/z by the number of micro-batches of the global
// batch, seq by its number of rows.
struct BalanceScales {
  double aux = 0;  // aux_loss_coeff / n_micro
  double seq = 0;  // seq_aux_loss_coeff / n_rows
  double z = 0;    // z_loss_coeff / n_micro
};
struct BalanceLosses {
  double aux = 0, seq = 0, z = 0;
};

// Coefficients g[t,i] = dL/dp[t,i] of the switch and sequence-wise losses, where
// p = s / sum_j s_j. Both losses are linear in p with f constant.
template <class T>
void balance_p_grad(std::vector<double>& g, const Routing<T>& r, const ModelConfig& c, int rows, int seq_len,
                    const BalanceScales& sc) {
  const int64_t N = r.N;
  const int E = r.E, K = r.K;
  g.assign(N * E, 0.0);
  // T_mb and T_s count the tokens that are not padding (all of them without padding).
  const int64_t Tc = r.counted_tokens();
  if (sc.aux > 0 && Tc > 0) {
    for (int e = 0; e < E; ++e) {
      const double f = double(r.counts[e]) / (double(Tc) * K);
      const double coef = sc.aux * E * f / double(Tc);
      for (int64_t t = 0; t < N; ++t)
        if (r.counted(t)) g[t * E + e] += coef;
    }
  }
  if (sc.seq > 0) {
    static thread_local std::vector<int64_t> n;  // scratch, reused
    for (int row = 0; row < rows; ++row) {
      const int64_t b = int64_t(row) * seq_len, e_ = int64_t(row + 1) * seq_len;
      n.assign(E, 0);
      int64_t Ts = 0;
      for (int64_t t = b; t < e_; ++t) {
        if (!r.counted(t)) continue;
        ++Ts;
        for (int k = 0; k < K; ++k) n[r.idx[t * K + k]]++;
      }
      if (Ts == 0) continue;
      for (int e = 0; e < E; ++e) {
        const double f = double(E) / (double(K) * Ts) * double(n[e]);
        const double coef = sc.seq * f / double(Ts);
        for (int64_t t = b; t < e_; ++t)
          if (r.counted(t)) g[t * E + e] += coef;
      }
    }
  }
}

// Values of the balance losses of one micro-batch (already scaled).
template <class T>
BalanceLosses balance_forward(const Routing<T>& r, const T* logits, const ModelConfig& c, int rows, int seq_len,
                              const BalanceScales& sc) {
  BalanceLosses out;
  const int64_t N = r.N;
  const int E = r.E;
  if (sc.aux > 0 || sc.seq > 0) {
    // Each loss is sum_{t,i} g[t,i] p[t,i] with g from balance_p_grad (f is constant).
    auto value = [&](const BalanceScales& only) {
      static thread_local std::vector<double> gg;  // scratch, reused
      balance_p_grad(gg, r, c, rows, seq_len, only);
      double v = 0;
      for (int64_t t = 0; t < N; ++t) {
        const T* s = r.scores.data() + t * E;
        double z = 0;
        for (int e = 0; e < E; ++e) z += double(s[e]);
        for (int e = 0; e < E; ++e) v += gg[t * E + e] * double(s[e]) / z;
      }
      return v;
    };
    if (sc.aux > 0) out.aux = value({sc.aux, 0, 0});
    if (sc.seq > 0) out.seq = value({0, sc.seq, 0});
  }
  if (sc.z > 0 && r.counted_tokens() > 0) {
    double acc = 0;
    for (int64_t t = 0; t < N; ++t) {
      if (!r.counted(t)) continue;
      const T* x = logits + t * E;
      double mx = double(x[0]);
      for (int e = 1; e < E; ++e) mx = std::max(mx, double(x[e]));
      double sum = 0;
      for (int e = 0; e < E; ++e) sum += std::exp(double(x[e]) - mx);
      const double lse = mx + std::log(sum);
      acc += lse * lse;
    }
    out.z = sc.z * acc / double(r.counted_tokens());
  }
  return out;
}

// dlogits (N,E) (overwritten) from dweight (N,K) = dL/d(final combine weight) and
// the balance losses. logits (N,E).
template <class T>
void router_backward(T* dlogits, const T* dweight, const T* logits, const Routing<T>& r, const ModelConfig& c,
                     int rows, int seq_len, const BalanceScales& sc) {
  const int64_t N = r.N;
  const int E = r.E, K = r.K;
  // Scratch of the calling thread, reused; bound to a reference here because the
  // parallel loop below reads it from every thread.
  static thread_local std::vector<double> gp_buf;
  std::vector<double>& gp = gp_buf;
  const bool balance = sc.aux > 0 || sc.seq > 0;
  if (balance) balance_p_grad(gp, r, c, rows, seq_len, sc);
  const double Tz = double(std::max<int64_t>(1, r.counted_tokens()));
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < N; ++t) {
    const T* s = r.scores.data() + t * E;
    const int32_t* id = r.idx.data() + t * K;
    static thread_local std::vector<T> ds_buf;  // per-thread scratch, reused
    ds_buf.assign(E, T(0));
    T* ds = ds_buf.data();
    // Through w_k = scale * s_k / (sum_sel s + 1e-20)  (or scale * s_k).
    const T rsf = T(c.routed_scaling_factor);
    if (c.norm_topk_prob) {
      T ssum = 0;
      for (int k = 0; k < K; ++k) ssum += s[id[k]];
      const T Z = ssum + T(1e-20);
      T dot = 0;  // sum_k dw_k * s_k
      for (int k = 0; k < K; ++k) dot += dweight[t * K + k] * s[id[k]];
      for (int k = 0; k < K; ++k) ds[id[k]] += rsf * (dweight[t * K + k] / Z - dot / (Z * Z));
    } else {
      for (int k = 0; k < K; ++k) ds[id[k]] += rsf * dweight[t * K + k];
    }
    if (balance) {  // through p = s / sum_j s_j
      T z = 0;
      for (int e = 0; e < E; ++e) z += s[e];
      T dot = 0;
      for (int e = 0; e < E; ++e) dot += T(gp[t * E + e]) * s[e];
      for (int e = 0; e < E; ++e) ds[e] += (T(gp[t * E + e]) - dot / z) / z;
    }
    T* dl = dlogits + t * E;
    if (c.sigmoid()) {
      for (int e = 0; e < E; ++e) dl[e] = ds[e] * s[e] * (T(1) - s[e]);
    } else if (c.sqrtsoftplus()) {
      // d sqrt(softplus(x)) / dx = sigmoid(x) / (2 s); s = 0 only where softplus underflows.
      const T* x = logits + t * E;
      for (int e = 0; e < E; ++e)
        dl[e] = s[e] > T(0) ? ds[e] / (T(1) + std::exp(-x[e])) / (T(2) * s[e]) : T(0);
    } else {
      T dot = 0;
      for (int e = 0; e < E; ++e) dot += ds[e] * s[e];
      for (int e = 0; e < E; ++e) dl[e] = s[e] * (ds[e] - dot);
    }
    if (sc.z > 0 && r.counted(t)) {
      const T* x = logits + t * E;
      T mx = x[0];
      for (int e = 1; e < E; ++e) mx = std::max(mx, x[e]);
      T sum = 0;
      for (int e = 0; e < E; ++e) sum += std::exp(x[e] - mx);
      const T lse = mx + std::log(sum);
      const T coef = T(2.0 * sc.z / Tz) * lse;
      for (int e = 0; e < E; ++e) dl[e] += coef * std::exp(x[e] - lse);
    }
  }
}

}  // namespace moetune
