#include "train/generate.hpp"

#include <chrono>
#include <cstring>

#include "moe/error.hpp"

namespace moetune {
namespace {

// Completions <-> one int32 stream (for the all-gather): per completion
// [n, truncated, tokens (n), logprob bits (n), layers, then per layer: m, idx (m), kept (m)].
void pack(const Completion& c, std::vector<int32_t>& out) {
  const int32_t n = int32_t(c.tokens.size());
  out.push_back(n);
  out.push_back(c.truncated ? 1 : 0);
  out.insert(out.end(), c.tokens.begin(), c.tokens.end());
  for (float lp : c.logprobs) {
    int32_t bits;
    std::memcpy(&bits, &lp, sizeof bits);
    out.push_back(bits);
  }
  out.push_back(int32_t(c.routing.idx.size()));
  for (size_t j = 0; j < c.routing.idx.size(); ++j) {
    out.push_back(int32_t(c.routing.idx[j].size()));
    out.insert(out.end(), c.routing.idx[j].begin(), c.routing.idx[j].end());
    out.insert(out.end(), c.routing.kept[j].begin(), c.routing.kept[j].end());
  }
}

Completion unpack(const int32_t*& p) {
  Completion c;
  const int32_t n = *p++;
  c.truncated = *p++ != 0;
  c.tokens.assign(p, p + n);
  p += n;
  c.logprobs.resize(n);
  for (int32_t i = 0; i < n; ++i) std::memcpy(&c.logprobs[i], p++, sizeof(float));
  const int32_t layers = *p++;
  c.routing.idx.resize(layers);
  c.routing.kept.resize(layers);
  for (int32_t j = 0; j < layers; ++j) {
    const int32_t m = *p++;
    c.routing.idx[j].assign(p, p + m);
    p += m;
    c.routing.kept[j].assign(p, p + m);
    p += m;
  }
  return c;
}

// Appends the selections of the tokens [from, from + count) of an extend call to row's trace.
void append_routing(RoutingTrace& dst, const RoutingTrace& rec, int64_t from, int64_t count, int K) {
  if (dst.idx.size() != rec.idx.size()) {
    dst.idx.resize(rec.idx.size());
    dst.kept.resize(rec.idx.size());
  }
  for (size_t j = 0; j < rec.idx.size(); ++j) {
    if (rec.idx[j].empty()) continue;  // a MoE layer extend() does not run (the MTP block's)
    dst.idx[j].insert(dst.idx[j].end(), rec.idx[j].begin() + from * K, rec.idx[j].begin() + (from + count) * K);
    dst.kept[j].insert(dst.kept[j].end(), rec.kept[j].begin() + from * K, rec.kept[j].begin() + (from + count) * K);
  }
}

// Decodes one chunk (possibly empty) in lockstep with the other ranks of the EP group.
template <class T>
void decode_chunk(Model<T>& model, const dist::ProcessGrid& grid, const GenRequest* reqs, int n,
                  const GenerationConfig& gc, Completion* out, GenerationStats& st) {
  const ModelConfig& cfg = model.config();
  const int64_t V = cfg.vocab_size;
  const int K = cfg.K();
  int longest = 0;
  for (int i = 0; i < n; ++i) longest = std::max(longest, int(reqs[i].prompt.size()));
  KvCache<T> kv;
  model.kv_init(kv, n, longest + gc.max_new_tokens);
  std::vector<T> logits;
  RoutingTrace rec;
  RoutingTrace* recp = gc.record_routing ? &rec : nullptr;
  std::vector<int32_t> row, tok;
  std::vector<uint8_t> live(n, 1);
  std::vector<std::pair<double, int32_t>> scratch;
  // Prefill: every prompt of the chunk in one call.
  for (int i = 0; i < n; ++i)
    for (int32_t t : reqs[i].prompt) {
      row.push_back(i);
      tok.push_back(t);
    }
  model.extend(kv, row.data(), tok.data(), int64_t(tok.size()), logits, recp);
  ++st.decode_steps;
  if (recp) {
    int64_t at = 0;
    for (int i = 0; i < n; ++i) {
      append_routing(out[i].routing, rec, at, int64_t(reqs[i].prompt.size()), K);
      at += int64_t(reqs[i].prompt.size());
    }
  }
  std::vector<int> rows_of_logits(n);  // logits row j belongs to chunk row rows_of_logits[j]
  for (int i = 0; i < n; ++i) rows_of_logits[i] = i;
  int n_logits = n;
  for (;;) {
    // Sample the next token of every row that produced logits.
    row.clear();
    tok.clear();
    for (int j = 0; j < n_logits; ++j) {
      const int i = rows_of_logits[j];
      const T* z = logits.data() + int64_t(j) * V;
      Completion& c = out[i];
      const int64_t position = int64_t(c.tokens.size());
      const double u = sampling_uniform(gc.seed, gc.step, reqs[i].prompt_index, reqs[i].sample_index, position);
      const int32_t next = sample_token(z, V, gc.sampling, u, scratch);
      c.tokens.push_back(next);
      c.logprobs.push_back(float(token_logprob(z, V, gc.sampling.temperature, next)));
      bool stop = false;
      for (int32_t s : gc.stop_ids) stop = stop || next == s;
      if (stop) {
        live[i] = 0;
      } else if (int(c.tokens.size()) >= gc.max_new_tokens) {
        c.truncated = true;
        live[i] = 0;
      } else {
        row.push_back(i);
        tok.push_back(next);
      }
    }
    const bool mine = !row.empty();
    // Lockstep: the group goes on while any of its ranks has a live row.
    const bool any = grid.ep > 1 ? !grid.ep_comm.all_true(!mine) : mine;
    if (!any) break;
    model.extend(kv, row.data(), tok.data(), int64_t(tok.size()), logits, recp);
    ++st.decode_steps;
    if (recp)
      for (size_t j = 0; j < row.size(); ++j) append_routing(out[row[j]].routing, rec, int64_t(j), 1, K);
    n_logits = int(row.size());
    for (int j = 0; j < n_logits; ++j) rows_of_logits[j] = row[j];
  }
}

}  // namespace

template <class T>
std::vector<Completion> generate(Model<T>& model, const dist::ProcessGrid& grid, const std::vector<GenRequest>& reqs,
                                 const GenerationConfig& gc, GenerationStats* stats) {
  const auto t0 = std::chrono::steady_clock::now();
  const ModelConfig& cfg = model.config();
  if (gc.max_new_tokens < 1) throw Error("key 'rl.max_new_tokens': must be at least 1");
  if (gc.batch_size < 1) throw Error("key 'rl.generation_batch_size': must be at least 1");
  for (size_t i = 0; i < reqs.size(); ++i) {
    if (reqs[i].prompt.empty()) throw Error("generate: request " + std::to_string(i) + " has an empty prompt");
    if (int64_t(reqs[i].prompt.size()) + gc.max_new_tokens > cfg.max_position_embeddings)
      throw Error("prompt " + std::to_string(reqs[i].prompt_index) + ": " + std::to_string(reqs[i].prompt.size()) +
                  " tokens + rl.max_new_tokens " + std::to_string(gc.max_new_tokens) +
                  " exceed the model's context (max_position_embeddings " +
                  std::to_string(cfg.max_position_embeddings) + ")");
  }
  const int W = grid.world_size;
  const int64_t total = int64_t(reqs.size());
  const int64_t chunks = (total + gc.batch_size - 1) / gc.batch_size;
  const int64_t per_rank = (chunks + W - 1) / W;
  GenerationStats st;
  std::vector<Completion> mine;
  const int64_t first_chunk = int64_t(grid.world_rank) * per_rank;
  for (int64_t c = first_chunk; c < first_chunk + per_rank; ++c) {
    const int64_t b = std::min(total, c * gc.batch_size), e = std::min(total, b + gc.batch_size);
    const int n = int(std::max<int64_t>(0, e - b));
    std::vector<Completion> out(n);
    decode_chunk(model, grid, reqs.data() + b, n, gc, out.data(), st);
    for (auto& x : out) mine.push_back(std::move(x));
  }
  // Every rank gets every completion, in request order (rank order = chunk order).
  std::vector<int32_t> buf;
  for (const auto& c : mine) pack(c, buf);
  std::vector<int64_t> lens(W);
  const int64_t my_len = int64_t(buf.size());
  grid.world.allgather(std::span<const int64_t>(&my_len, 1), std::span<int64_t>(lens));
  int64_t all_len = 0;
  for (auto l : lens) all_len += l;
  std::vector<int32_t> all(all_len);
  grid.world.allgatherv(std::span<const int32_t>(buf), std::span<int32_t>(all), lens);
  std::vector<Completion> result;
  result.reserve(reqs.size());
  const int32_t* p = all.data();
  while (p < all.data() + all_len) result.push_back(unpack(p));
  if (int64_t(result.size()) != total) throw Error("generate: internal error: completions lost in the gather");
  for (const auto& c : result) st.new_tokens += int64_t(c.tokens.size());
  st.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (stats) *stats = st;
  return result;
}

template std::vector<Completion> generate<float>(Model<float>&, const dist::ProcessGrid&,
                                                 const std::vector<GenRequest>&, const GenerationConfig&,
                                                 GenerationStats*);
template std::vector<Completion> generate<double>(Model<double>&, const dist::ProcessGrid&,
                                                  const std::vector<GenRequest>&, const GenerationConfig&,
                                                  GenerationStats*);

}  // namespace moetune
