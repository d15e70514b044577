// The attention core of training: ops::attention_forward and ops::attention_backward
// (declared, with the arithmetic they follow, in moe/ops.hpp), fused tile by tile.
//
// Each query tile of a document runs its products (scores, probabilities times values,
// and in the backward dV, dP, dQ, dK) straight on the GEMM's micro-kernel
// (kernels::panel_kernel) over operands packed once per tile into the calling thread's
// buffers, instead of six gemm_* calls per tile that each pack, tile and enter an
// OpenMP region: with the short documents of SFT and RL data (tens of tokens) those
// calls cost far more than their arithmetic (5 GFLOP/s on examples/small.json's shapes).
//
// The micro-kernel is the GEMM's, so each element is the GEMM's chain (an fma chain in
// increasing k from 0 per block of kGemmKc, then c = acc or c + acc), and the bits are
// those of the gemm_* calls it replaces. The only difference is which terms run: the
// micro-tiles wholly above the diagonal (scores of keys after every query of the tile's
// rows) are not computed, a row block's products over keys stop at the last key its
// rows see, and dV / dK of a key block start at the first query that sees it. Every
// term left out is an exact fma(0, x, acc) = acc (x finite) or a block that adds +0,
// so nothing changes for finite inputs: the KV-cache decode (attention_cached, which
// reduces over exactly the keys a query sees) still equals the full forward bit for bit.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernels/parallel.hpp"
#include "moe/ops.hpp"
#include "moe/scratch.hpp"

namespace moetune::ops {
namespace {

static_assert(kAttnTile <= kernels::kGemmKc, "dV and dK of a tile reduce over its queries in one GEMM block");

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The packed operands and products of one tile, per thread (they grow, never shrink).
template <class T>
struct TileBuffers {
  std::vector<T> qa, kt, s;       // Q (A panels), K (B panels of the scores), scores / probabilities
  std::vector<T> vn, pa;          // V (B panels over keys), one row block of P (A panel)
  std::vector<T> da, vt, dp;      // dO (A panels), V (B panels of dP), dP / dS
  std::vector<T> on, kn, qn, pt;  // dO, K, Q (B panels over rows), a key block of P^T or dS^T (A panel)
};
template <class T>
TileBuffers<T>& tile_buffers() {
  static thread_local TileBuffers<T> b;
  return b;
}

// The geometry of one query tile: queries [i0, i1) of a document starting at ds, keys
// [k0, i1) (k0 = attn_key_start), m queries, nk keys, ld the row stride of the tile's
// score buffers (nk rounded up to whole B panels).
struct Tile {
  int64_t ds, i0, i1, k0, m, nk, ld, window;
  Tile(int64_t ds_, int64_t i0_, int64_t de, int64_t window_, int nr)
      : ds(ds_), i0(i0_), i1(std::min(de, i0_ + kAttnTile)), k0(detail::attn_key_start(ds_, i0_, window_)),
        m(i1 - i0), nk(i1 - k0), ld(round_up(nk, nr)), window(window_) {}
  // A decode step: the one query at position `at` of a cache row (a document from 0),
  // with the keys of its tile in the full forward (from attn_key_start of the tile's
  // first query) up to itself.
  static Tile decode(int64_t at, int64_t window, int nr) {
    Tile t(0, at, at + 1, window, nr);
    t.k0 = detail::attn_key_start(0, at / kAttnTile * kAttnTile, window);
    t.nk = at + 1 - t.k0;
    t.ld = round_up(t.nk, nr);
    return t;
  }
  // Keys [first_key(r), seen(r)) of the tile are those query row r sees.
  int64_t first_key(int64_t r) const { return detail::attn_key_first(ds, i0 + r, window) - k0; }
  int64_t seen(int64_t r) const { return i0 + r - k0 + 1; }
};

// rows (<= ld apart, row stride ld) x K values into panels of w rows: panel p is K x w,
// k-major, at dst + p*w*K.
template <class T>
void pack_row_panels(const kernels::PanelKernel<T>& pk, T* dst, const T* src, int64_t ld, int64_t rows, int64_t K,
                     int w) {
  for (int64_t p = 0; p * w < rows; ++p)
    pk.pack_rows(dst + p * w * K, src + p * w * ld, ld, int(std::min<int64_t>(w, rows - p * w)), K, w);
}
// K rows x cols values (row stride ld) into panels of w columns: panel p is K x w at
// dst + p*w*K.
template <class T>
void pack_column_panels(const kernels::PanelKernel<T>& pk, T* dst, const T* src, int64_t ld, int64_t cols, int64_t K,
                        int w) {
  for (int64_t p = 0; p * w < cols; ++p)
    pk.pack_copy(dst + p * w * K, src + p * w, ld, int(std::min<int64_t>(w, cols - p * w)), K, w);
}

// C (m x n, ldc) (+)= Ap . Bp over K values, in the GEMM's blocks of kGemmKc.
template <class T>
void panel_product(const kernels::PanelKernel<T>& pk, int64_t K, const T* Ap, const T* Bp, T* C, int64_t ldc, int m,
                   int n, bool accumulate) {
  for (int64_t k0 = 0; k0 < K; k0 += kernels::kGemmKc)
    pk.tile(std::min(kernels::kGemmKc, K - k0), Ap + k0 * pk.mr, Bp + k0 * pk.nr, C, ldc, m, n,
            !accumulate && k0 == 0);
}

// out (t.m x t.ld) = rows (A panels over hd) . keys^T (B panels over hd), the micro-tiles
// that hold a key some row of their row block sees (the raw dot products, as gemm_nt).
template <class T>
void tile_scores(const kernels::PanelKernel<T>& pk, const Tile& t, int64_t hd, const T* rows, const T* keys, T* out) {
  const int mr = pk.mr, nr = pk.nr;
  for (int64_t r0 = 0; r0 < t.m; r0 += mr) {
    const int mm = int(std::min<int64_t>(mr, t.m - r0));
    const int64_t seen = t.seen(r0 + mm - 1);
    for (int64_t j0 = t.first_key(r0) / nr * nr; j0 < seen; j0 += nr)
      panel_product(pk, hd, rows + r0 * hd, keys + j0 * hd, out + r0 * t.ld + j0, t.ld, mm,
                    int(std::min<int64_t>(nr, t.nk - j0)), false);
  }
}

// C (t.m rows, ldc) (+)= P . X for P (t.m x t.nk, the tile's buffer) and X (t.nk x hd, B
// panels over keys): each row block over the keys up to the last one its rows see.
template <class T>
void tile_rows_times_keys(const kernels::PanelKernel<T>& pk, const Tile& t, int64_t hd, const T* P, const T* X,
                          T* pa, T* C, int64_t ldc, bool accumulate) {
  const int mr = pk.mr, nr = pk.nr;
  for (int64_t r0 = 0; r0 < t.m; r0 += mr) {
    const int mm = int(std::min<int64_t>(mr, t.m - r0));
    const int64_t seen = t.seen(r0 + mm - 1);
    pk.pack_rows(pa, P + r0 * t.ld, t.ld, mm, seen, mr);
    for (int64_t c0 = 0; c0 < hd; c0 += nr)
      panel_product(pk, seen, pa, X + c0 * t.nk, C + r0 * ldc + c0, ldc, mm, int(std::min<int64_t>(nr, hd - c0)),
                    accumulate);
  }
}

// C (t.nk key rows, ldc) += P^T . Y for P (t.m x t.nk) and Y (t.m x hd, B panels over the
// tile's rows): each key block over the rows from the first one that sees it.
template <class T>
void tile_keys_times_rows(const kernels::PanelKernel<T>& pk, const Tile& t, int64_t hd, const T* P, const T* Y,
                          T* pt, T* C, int64_t ldc) {
  const int mr = pk.mr, nr = pk.nr;
  for (int64_t j0 = 0; j0 < t.nk; j0 += mr) {
    const int mj = int(std::min<int64_t>(mr, t.nk - j0));
    const int64_t r_lo = std::max<int64_t>(0, t.k0 + j0 - t.i0), kq = t.m - r_lo;
    pk.pack_copy(pt, P + r_lo * t.ld + j0, t.ld, mj, kq, mr);
    for (int64_t c0 = 0; c0 < hd; c0 += nr)
      pk.tile(kq, pt, Y + c0 * t.m + r_lo * nr, C + j0 * ldc + c0, ldc, mj, int(std::min<int64_t>(nr, hd - c0)),
              false);
  }
}

// The largest tile of a call: most queries (m) and most keys (nk) of any tile.
struct TileBound {
  int64_t m = 1, nk = 1;
};
inline TileBound largest_tile(const int32_t* doc, int64_t B, int64_t S, int64_t window) {
  TileBound t;
  for (int64_t b = 0; b < B; ++b) {
    const int32_t* dr = doc + b * S;
    for (int64_t ds = 0, de; ds < S; ds = de) {
      de = detail::doc_end(dr, ds, S);
      for (int64_t i0 = ds; i0 < de; i0 += kAttnTile) {
        const int64_t i1 = std::min(de, i0 + kAttnTile);
        t.m = std::max(t.m, i1 - i0);
        t.nk = std::max(t.nk, i1 - detail::attn_key_start(ds, i0, window));
      }
    }
  }
  return t;
}

// This thread's tile buffers sized for tiles up to `t` (the sizes the loops below ask
// for grow with m and nk).
template <class T>
void reserve_tiles(const kernels::PanelKernel<T>& pk, TileBound t, int64_t hd, bool backward) {
  TileBuffers<T>& buf = tile_buffers<T>();
  const int64_t mr = pk.mr, nr = pk.nr, ld = round_up(t.nk, nr), mp = round_up(t.m, mr), hp = round_up(hd, nr);
  for (auto* v : {&buf.qa, &buf.da}) grow_scratch(*v, size_t(mp * hd));
  for (auto* v : {&buf.kt, &buf.vt}) grow_scratch(*v, size_t(ld * hd));
  for (auto* v : {&buf.s, &buf.dp}) grow_scratch(*v, size_t(t.m * ld));
  for (auto* v : {&buf.vn, &buf.kn}) grow_scratch(*v, size_t(hp * t.nk));
  grow_scratch(buf.pa, size_t(mr * t.nk));
  if (!backward) return;
  for (auto* v : {&buf.on, &buf.qn}) grow_scratch(*v, size_t(hp * t.m));
  grow_scratch(buf.pt, size_t(mr * t.m));
}

// body(x) for the tasks x < n over a team (dynamic: documents make tasks uneven). Every
// thread of the team first sizes its tile buffers for the call's largest tile, so that
// which thread draws which task never decides whether a warm call allocates.
template <class T, class Body>
void for_each_task(int64_t n, const kernels::PanelKernel<T>& pk, TileBound t, int64_t hd, bool backward,
                   Body&& body) {
  if (kernels::use_team(n > 1)) {
#pragma omp parallel
    {
      reserve_tiles<T>(pk, t, hd, backward);
#pragma omp for schedule(dynamic, 1)
      for (int64_t x = 0; x < n; ++x) body(x);
    }
  } else {
    reserve_tiles<T>(pk, t, hd, backward);
    for (int64_t x = 0; x < n; ++x) body(x);
  }
}

}  // namespace

template <class T>
void attention_forward(T* out, T* stats, const T* q, const T* k, const T* v, const int32_t* doc, int64_t B, int64_t S,
                       int64_t H, int64_t Hkv, int64_t hd, const T* sinks, int64_t window, int64_t ldq, int64_t ldk) {
  const int64_t os = H * hd, qs = ldq ? ldq : os, ks = ldk ? ldk : Hkv * hd, rep = H / Hkv;
  const T scale = T(1) / std::sqrt(T(hd));
  const kernels::PanelKernel<T> pk = kernels::panel_kernel<T>();
  const int mr = pk.mr, nr = pk.nr;
  for_each_task<T>(B * H, pk, largest_tile(doc, B, S, window), hd, false, [&](int64_t x) {
    const int64_t b = x / H, h = x % H;
    TileBuffers<T>& buf = tile_buffers<T>();
    const int64_t kh = h / rep;
    const T sink = detail::attn_sink(sinks, h);
    const int32_t* dr = doc + b * S;
    for (int64_t ds = 0, de; ds < S; ds = de) {
      de = detail::doc_end(dr, ds, S);
      for (int64_t i0 = ds; i0 < de; i0 += kAttnTile) {
        const Tile t(ds, i0, de, window, nr);
        const T* K = k + (b * S + t.k0) * ks + kh * hd;
        const T* V = v + (b * S + t.k0) * ks + kh * hd;
        T* qa = grow_scratch(buf.qa, size_t(round_up(t.m, mr) * hd));
        T* kt = grow_scratch(buf.kt, size_t(t.ld * hd));
        T* s = grow_scratch(buf.s, size_t(t.m * t.ld));
        T* vn = grow_scratch(buf.vn, size_t(round_up(hd, nr) * t.nk));
        T* pa = grow_scratch(buf.pa, size_t(mr * t.nk));
        pack_row_panels(pk, qa, q + (b * S + i0) * qs + h * hd, qs, t.m, hd, mr);
        pack_row_panels(pk, kt, K, ks, t.nk, hd, nr);
        tile_scores(pk, t, hd, qa, kt, s);
        for (int64_t r = 0; r < t.m; ++r) {
          const int64_t a = t.first_key(r);
          T* pr = s + r * t.ld;
          std::fill(pr, pr + a, T(0));
          attention_softmax_row(pr + a, t.seen(r) - a, t.nk - a, scale, stats + ((b * H + h) * S + i0 + r) * 2,
                                sink);
        }
        pack_column_panels(pk, vn, V, ks, hd, t.nk, nr);
        tile_rows_times_keys(pk, t, hd, s, vn, pa, out + (b * S + i0) * os + h * hd, os, false);
      }
    }
  });
}

template <class T>
void attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* stats, const T* q, const T* k, const T* v,
                        const int32_t* doc, int64_t B, int64_t S, int64_t H, int64_t Hkv, int64_t hd, const T* sinks,
                        T* dsinks, int64_t window, int64_t ldq, int64_t ldk) {
  const int64_t os = H * hd, qs = ldq ? ldq : os, ks = ldk ? ldk : Hkv * hd, rep = H / Hkv;
  const T scale = T(1) / std::sqrt(T(hd));
  const kernels::PanelKernel<T> pk = kernels::panel_kernel<T>();
  const int mr = pk.mr, nr = pk.nr;
  // d loss / d sink of each (row, head, query), (B,H,S): scratch of the calling thread,
  // bound to a reference because the loop's threads share it.
  static thread_local std::vector<T> sink_buf;
  std::vector<T>& dsink_q = sink_buf;
  if (sinks) dsink_q.assign(size_t(B * H * S), T(0));
  for_each_task<T>(B * Hkv, pk, largest_tile(doc, B, S, window), hd, true, [&](int64_t x) {
    const int64_t b = x / Hkv, kh = x % Hkv;
    TileBuffers<T>& buf = tile_buffers<T>();
    const int32_t* dr = doc + b * S;
    for (int64_t h = kh * rep; h < (kh + 1) * rep; ++h)
      for (int64_t ds = 0, de; ds < S; ds = de) {
        de = detail::doc_end(dr, ds, S);
        for (int64_t i0 = ds; i0 < de; i0 += kAttnTile) {
          const Tile t(ds, i0, de, window, nr);
          const int64_t kv0 = (b * S + t.k0) * ks + kh * hd;
          const T* Q = q + (b * S + i0) * qs + h * hd;
          const T* dO = dout + (b * S + i0) * os + h * hd;
          T* qa = grow_scratch(buf.qa, size_t(round_up(t.m, mr) * hd));
          T* kt = grow_scratch(buf.kt, size_t(t.ld * hd));
          T* p = grow_scratch(buf.s, size_t(t.m * t.ld));
          T* da = grow_scratch(buf.da, size_t(round_up(t.m, mr) * hd));
          T* vt = grow_scratch(buf.vt, size_t(t.ld * hd));
          T* g = grow_scratch(buf.dp, size_t(t.m * t.ld));
          T* on = grow_scratch(buf.on, size_t(round_up(hd, nr) * t.m));
          T* qn = grow_scratch(buf.qn, size_t(round_up(hd, nr) * t.m));
          T* kn = grow_scratch(buf.kn, size_t(round_up(hd, nr) * t.nk));
          T* pa = grow_scratch(buf.pa, size_t(mr * t.nk));
          T* pt = grow_scratch(buf.pt, size_t(mr * t.m));
          // The probabilities again, from the scores and the forward's stats.
          pack_row_panels(pk, qa, Q, qs, t.m, hd, mr);
          pack_row_panels(pk, kt, k + kv0, ks, t.nk, hd, nr);
          tile_scores(pk, t, hd, qa, kt, p);
          for (int64_t r = 0; r < t.m; ++r) {
            const int64_t a = t.first_key(r);
            T* pr = p + r * t.ld;
            std::fill(pr, pr + a, T(0));
            attention_probs_row(pr + a, t.seen(r) - a, t.nk - a, scale, stats + ((b * H + h) * S + i0 + r) * 2);
          }
          // dV += P^T dO.
          pack_column_panels(pk, on, dO, os, hd, t.m, nr);
          tile_keys_times_rows(pk, t, hd, p, on, pt, dv + kv0, ks);
          // dP = dO V^T, then dS = P * (dP - sum_j P dP) * scale, row by row.
          pack_row_panels(pk, da, dO, os, t.m, hd, mr);
          pack_row_panels(pk, vt, v + kv0, ks, t.nk, hd, nr);
          tile_scores(pk, t, hd, da, vt, g);
          for (int64_t r = 0; r < t.m; ++r) {
            const int64_t a = t.first_key(r), n = t.seen(r);
            const T* pr = p + r * t.ld;
            T* gr = g + r * t.ld;
            const T dot = row_sum<T>(n - a, [pr, gr, a](int64_t j) { return pr[a + j] * gr[a + j]; });
            std::fill(gr, gr + a, T(0));
            for (int64_t j = a; j < n; ++j) gr[j] = pr[j] * (gr[j] - dot) * scale;
            std::fill(gr + n, gr + t.nk, T(0));
            if (sinks) {  // the sink's probability, times (0 - dot): it carries no value
              const T* st = stats + ((b * H + h) * S + i0 + r) * 2;
              dsink_q[size_t((b * H + h) * S + i0 + r)] = -ops::exp(sinks[h] - st[0]) * st[1] * dot;
            }
          }
          // dQ += dS K, dK += dS^T Q.
          pack_column_panels(pk, kn, k + kv0, ks, hd, t.nk, nr);
          tile_rows_times_keys(pk, t, hd, g, kn, pa, dq + (b * S + i0) * qs + h * hd, qs, true);
          pack_column_panels(pk, qn, Q, qs, hd, t.m, nr);
          tile_keys_times_rows(pk, t, hd, g, qn, pt, dk + kv0, ks);
        }
      }
  });
  if (sinks)
    for (int64_t h = 0; h < H; ++h) {
      T acc = 0;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < S; ++i) acc += dsink_q[size_t((b * H + h) * S + i)];
      dsinks[h] += acc;
    }
}

template <class T>
void attention_cached(T* out, const T* q, const T* kc, const T* vc, const int32_t* row, const int32_t* pos, int64_t n,
                      int64_t cap, int64_t H, int64_t Hkv, int64_t hd, const T* sinks, int64_t window, int64_t ldq) {
  const int64_t os = H * hd, qs = ldq ? ldq : os, ks = Hkv * hd, rep = H / Hkv;
  const T scale = T(1) / std::sqrt(T(hd));
  const kernels::PanelKernel<T> pk = kernels::panel_kernel<T>();
  const int mr = pk.mr, nr = pk.nr;
  // The forward's tile code on a tile of one query: the same products in the same order,
  // so the same bits (Decode.KvCacheEqualsFullForward*).
  auto one = [&](int64_t i, int64_t h) {
    TileBuffers<T>& buf = tile_buffers<T>();
    const Tile t = Tile::decode(pos[i], window, nr);
    const int64_t kv0 = (int64_t(row[i]) * cap + t.k0) * ks + (h / rep) * hd;
    T* qa = grow_scratch(buf.qa, size_t(mr * hd));
    T* kt = grow_scratch(buf.kt, size_t(t.ld * hd));
    T* s = grow_scratch(buf.s, size_t(t.ld));
    T* vn = grow_scratch(buf.vn, size_t(round_up(hd, nr) * t.nk));
    T* pa = grow_scratch(buf.pa, size_t(mr * t.nk));
    pack_row_panels(pk, qa, q + i * qs + h * hd, qs, 1, hd, mr);
    pack_row_panels(pk, kt, kc + kv0, ks, t.nk, hd, nr);
    tile_scores(pk, t, hd, qa, kt, s);
    const int64_t a = t.first_key(0);
    T stat[2];
    std::fill(s, s + a, T(0));
    attention_softmax_row(s + a, t.nk - a, t.nk - a, scale, stat, detail::attn_sink(sinks, h));
    pack_column_panels(pk, vn, vc + kv0, ks, hd, t.nk, nr);
    tile_rows_times_keys(pk, t, hd, s, vn, pa, out + i * os + h * hd, os, false);
  };
  // One (query, head) is a few hundred FMAs: a team of threads pays only for many.
  if (n * H >= 64 && omp_get_level() == 0 && omp_get_max_threads() > 1) {
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t h = 0; h < H; ++h) one(i, h);
  } else {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t h = 0; h < H; ++h) one(i, h);
  }
}

#define MOETUNE_ATTENTION_INSTANTIATE(T)                                                                            \
  template void attention_forward<T>(T*, T*, const T*, const T*, const T*, const int32_t*, int64_t, int64_t,       \
                                     int64_t, int64_t, int64_t, const T*, int64_t, int64_t, int64_t);              \
  template void attention_backward<T>(T*, T*, T*, const T*, const T*, const T*, const T*, const T*, const int32_t*, \
                                      int64_t, int64_t, int64_t, int64_t, int64_t, const T*, T*, int64_t, int64_t,  \
                                      int64_t);                                                                    \
  template void attention_cached<T>(T*, const T*, const T*, const T*, const int32_t*, const int32_t*, int64_t, int64_t, \
                                    int64_t, int64_t, int64_t, const T*, int64_t, int64_t);
MOETUNE_ATTENTION_INSTANTIATE(float)
MOETUNE_ATTENTION_INSTANTIATE(double)
#undef MOETUNE_ATTENTION_INSTANTIATE

}  // namespace moetune::ops
