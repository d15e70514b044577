#include "train/rollout.hpp"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <optional>

#include <omp.h>

#include "dist/collective.hpp"
#include "dist/parallel_trainer.hpp"
#include "io/checkpoint.hpp"
#include "io/fsutil.hpp"
#include "moe/error.hpp"

namespace moetune {

std::vector<PromptRow> read_prompt_text(const std::string& path) {
  const std::string bytes = fsutil::read_file(path);
  std::vector<PromptRow> rows;
  size_t at = 0;
  int line = 0;
  while (at < bytes.size()) {
    size_t end = bytes.find('\n', at);
    if (end == std::string::npos) end = bytes.size();
    std::string l = bytes.substr(at, end - at);
    ++line;
    at = end + 1;
    if (!l.empty() && l.back() == '\r') l.pop_back();
    if (l.find_first_not_of(" \t") == std::string::npos) continue;
    if (const int64_t bad = first_invalid_utf8(l); bad >= 0)
      throw Error(path + ":" + std::to_string(line) + ": not valid UTF-8 (byte " + std::to_string(bad + 1) + ")");
    PromptRow r;
    r.messages = {ChatMessage{"user", l}};
    r.row = {{"prompt", l}};
    r.line = line;
    rows.push_back(std::move(r));
  }
  if (rows.empty()) throw Error(path + ": no prompts");
  return rows;
}

PromptSet load_prompts(const std::string& path, const Tokenizer& tok, bool need_answer, int max_new_tokens,
                       int max_positions) {
  PromptSet ps;
  ps.path = path;
  const bool text = path.size() > 4 && path.compare(path.size() - 4, 4, ".txt") == 0;
  if (text && need_answer)
    throw Error(path + ": a plain-text prompt file has no answers, which the rewards need (use JSONL with \"answer\")");
  ps.rows = text ? read_prompt_text(path) : read_prompt_jsonl(path, need_answer);
  ps.ids.reserve(ps.rows.size());
  for (const auto& r : ps.rows) {
    std::vector<int32_t> ids;
    try {
      ids = render_prompt(r.messages, tok);
    } catch (const Error& e) {
      throw Error(path + ":" + std::to_string(r.line) + ": " + e.what());
    }
    if (int64_t(ids.size()) + max_new_tokens > max_positions)
      throw Error(path + ":" + std::to_string(r.line) + ": the prompt has " + std::to_string(ids.size()) +
                  " tokens; with rl.max_new_tokens = " + std::to_string(max_new_tokens) +
                  " it does not fit the model's context (model.max_position_embeddings = " +
                  std::to_string(max_positions) + ")");
    ps.longest = std::max(ps.longest, int(ids.size()));
    ps.ids.push_back(std::move(ids));
  }
  return ps;
}

std::vector<int32_t> stop_ids(const Tokenizer& tok) {
  std::vector<int32_t> s;
  for (const char* name : {"<|end|>", "<|eos|>"})
    if (tok.has_special(name)) s.push_back(tok.special_id(name));
  return s;
}

std::string completion_text(const Completion& c, const Tokenizer& tok, const std::vector<int32_t>& stops) {
  std::vector<int32_t> ids = c.tokens;
  if (!ids.empty() && !c.truncated)
    for (int32_t s : stops)
      if (ids.back() == s) {
        ids.pop_back();
        break;
      }
  // A special token inside the completion is decoded to its text; an id the model has
  // but the tokenizer does not (model.vocab_size > tokenizer) becomes U+FFFD.
  std::string out;
  std::vector<int32_t> run;
  for (int32_t id : ids) {
    if (id >= 0 && id < tok.vocab_size() && !tok.token(id).empty()) {
      run.push_back(id);
      continue;
    }
    out += tok.decode(run) + "\xEF\xBF\xBD";
    run.clear();
  }
  return out + tok.decode(run);
}

RewardScores score_completions(const dist::Comm& world, RewardModel* rewards, const PromptSet& prompts,
                               const std::vector<int64_t>& prompt_of, const std::vector<Completion>& completions,
                               const Tokenizer& tok) {
  const size_t n = completions.size();
  RewardScores sc;
  int F = 0;
  dist::run_collectively(world, [&] {
    if (world.rank() != 0) return;
    const auto stops = stop_ids(tok);
    std::vector<RewardInput> in(n);
    for (size_t i = 0; i < n; ++i) {
      const PromptRow& row = prompts.rows.at(size_t(prompt_of[i]));
      in[i].prompt = row.messages.empty() ? std::string() : row.messages.back().content;
      in[i].completion = completion_text(completions[i], tok, stops);
      in[i].truncated = completions[i].truncated;
      in[i].row = row.row;
    }
    sc = rewards->score(in);
    F = int(sc.names.size());
  });
  // Share: F, then per function values and totals.
  world.broadcast(std::span<int>(&F, 1), 0);
  std::vector<double> flat(size_t(F + 1) * n);
  if (world.rank() == 0) {
    for (int f = 0; f < F; ++f) std::copy(sc.per_function[f].begin(), sc.per_function[f].end(), flat.begin() + f * n);
    std::copy(sc.total.begin(), sc.total.end(), flat.begin() + size_t(F) * n);
  }
  world.broadcast(std::span<double>(flat), 0);
  if (world.rank() != 0) {
    sc.per_function.assign(F, std::vector<double>(n));
    for (int f = 0; f < F; ++f) std::copy(flat.begin() + f * n, flat.begin() + (f + 1) * n, sc.per_function[f].begin());
    sc.total.assign(flat.begin() + size_t(F) * n, flat.end());
  }
  return sc;
}

double pass_at_k(int n, int c, int k) {
  if (k > n || k < 1) throw Error("pass@k: k = " + std::to_string(k) + " needs 1 <= k <= n = " + std::to_string(n));
  if (n - c < k) return 1.0;
  // 1 - prod_{i=n-c+1}^{n} (1 - k / i)
  double prod = 1.0;
  for (int i = n - c + 1; i <= n; ++i) prod *= 1.0 - double(k) / double(i);
  return 1.0 - prod;
}

nlohmann::json EvalResult::to_json() const {
  nlohmann::json j = {{"prompts", prompts},
                      {"pass@1", pass1_greedy},
                      {"mean_reward", mean_reward_greedy},
                      {"mean_length", mean_length_greedy},
                      {"truncated", truncated_greedy},
                      {"gen_tokens_per_s", gen_tokens_per_s},
                      {"seconds", seconds}};
  if (samples > 0) {
    j["samples"] = samples;
    j["pass@1_sampled"] = pass1_sampled;
    j["pass@" + std::to_string(samples)] = pass_k;
    j["mean_reward_sampled"] = mean_reward_sampled;
  }
  return j;
}

std::string EvalResult::table(const std::string& name) const {
  char pk[32] = "-";
  if (samples > 0) std::snprintf(pk, sizeof pk, "%.1f%%", 100 * pass_k);
  char buf[256];
  std::snprintf(buf, sizeof buf, "| %-6s | %7.1f%% | %8s | %11.3f | %11.2f |", name.c_str(), 100 * pass1_greedy, pk,
                mean_reward_greedy, mean_length_greedy);
  return buf;
}

template <class T>
EvalResult evaluate_prompts(Model<T>& model, const dist::ProcessGrid& grid, const PromptSet& prompts,
                            const Tokenizer& tok, RewardModel* rewards, const GenerationConfig& base, int samples) {
  const auto t0 = std::chrono::steady_clock::now();
  EvalResult res;
  const int P = int(prompts.ids.size());
  res.prompts = P;
  int64_t gen_tokens = 0;
  double gen_s = 0;
  // Greedy pass@1.
  {
    GenerationConfig gc = base;
    gc.sampling = SamplingConfig{0.0, 0, 1.0};
    gc.record_routing = false;
    std::vector<GenRequest> reqs(P);
    std::vector<int64_t> of(P);
    for (int p = 0; p < P; ++p) {
      reqs[p] = {prompts.ids[p], p, 0};
      of[p] = p;
    }
    GenerationStats gs;
    const auto comps = generate(model, grid, reqs, gc, &gs);
    gen_tokens += gs.new_tokens;
    gen_s += gs.seconds;
    const RewardScores sc = score_completions(grid.world, rewards, prompts, of, comps, tok);
    for (int p = 0; p < P; ++p) {
      res.pass1_greedy += is_correct(sc, p) ? 1 : 0;
      res.mean_reward_greedy += sc.total[p];
      res.mean_length_greedy += double(comps[p].tokens.size());
      res.truncated_greedy += comps[p].truncated ? 1 : 0;
    }
    if (P > 0) {
      res.pass1_greedy /= P;
      res.mean_reward_greedy /= P;
      res.mean_length_greedy /= P;
      res.truncated_greedy /= P;
    }
  }
  if (samples > 0) {
    GenerationConfig gc = base;
    gc.record_routing = false;
    std::vector<GenRequest> reqs;
    std::vector<int64_t> of;
    for (int p = 0; p < P; ++p)
      for (int s = 0; s < samples; ++s) {
        reqs.push_back({prompts.ids[p], p, s});
        of.push_back(p);
      }
    GenerationStats gs;
    const auto comps = generate(model, grid, reqs, gc, &gs);
    gen_tokens += gs.new_tokens;
    gen_s += gs.seconds;
    const RewardScores sc = score_completions(grid.world, rewards, prompts, of, comps, tok);
    res.samples = samples;
    for (int p = 0; p < P; ++p) {
      int c = 0;
      for (int s = 0; s < samples; ++s) {
        const size_t i = size_t(p) * samples + s;
        c += is_correct(sc, i) ? 1 : 0;
        res.mean_reward_sampled += sc.total[i];
      }
      res.pass1_sampled += double(c) / samples;
      res.pass_k += pass_at_k(samples, c, samples);
    }
    if (P > 0) {
      res.pass1_sampled /= P;
      res.pass_k /= P;
      res.mean_reward_sampled /= double(P) * samples;
    }
  }
  res.gen_tokens_per_s = gen_s > 0 ? double(gen_tokens) / gen_s : 0;
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return res;
}

template EvalResult evaluate_prompts<float>(Model<float>&, const dist::ProcessGrid&, const PromptSet&,
                                            const Tokenizer&, RewardModel*, const GenerationConfig&, int);
template EvalResult evaluate_prompts<double>(Model<double>&, const dist::ProcessGrid&, const PromptSet&,
                                             const Tokenizer&, RewardModel*, const GenerationConfig&, int);

namespace {

// A checkpoint on this rank's experts, with its tokenizer.
struct Loaded {
  std::optional<dist::ProcessGrid> grid;
  std::unique_ptr<Model<float>> model;
  std::unique_ptr<dist::AllToAllExpertStage<float>> stage;
  std::optional<Tokenizer> tok;
  GenerationConfig gen;  // opt.gen with the tokenizer's stop ids
  PromptSet prompts;
};

// The checkpoint, its tokenizer and the prompts (answers required when need_answer).
void load_for_inference(Loaded& L, const InferenceOptions& opt, const dist::Comm& world, bool need_answer) {
  if (opt.threads > 0) omp_set_num_threads(opt.threads);
  ModelConfig cfg;
  dist::run_collectively(world, [&] { cfg = load_checkpoint_config(opt.ckpt); });
  dist::run_collectively(world, [&] { L.grid.emplace(dist::ProcessGrid::create(world, opt.ep, cfg)); });
  dist::run_collectively(world, [&] {
    L.model = std::make_unique<Model<float>>(cfg, L.grid->expert_begin, L.grid->expert_end);
    L.stage = dist::install_expert_stage(*L.grid, *L.model);
    load_model_weights(opt.ckpt, cfg, L.model->layout(), L.model->params(), L.model->expert_bias(),
                       &L.model->tid2eid());
    const std::string tj = opt.ckpt + "/tokenizer.json";
    L.tok = std::filesystem::exists(tj) ? Tokenizer::load(tj) : Tokenizer::byte_level();
    if (L.tok->vocab_size() > cfg.vocab_size)
      throw Error(tj + ": the tokenizer has more tokens than the model's vocab_size");
    L.gen = opt.gen;
    L.gen.stop_ids = stop_ids(*L.tok);
    validate(L.gen.sampling);
    L.prompts = load_prompts(opt.prompts, *L.tok, need_answer, L.gen.max_new_tokens, cfg.max_position_embeddings);
  });
}

}  // namespace

void run_generate(const InferenceOptions& opt, const std::string& out) {
  const dist::Comm world = dist::Comm::world();
  if (opt.samples < 1) throw Error("generate: --samples must be at least 1");
  Loaded L;
  load_for_inference(L, opt, world, false);
  const GenerationConfig& gc = L.gen;
  const PromptSet& ps = L.prompts;
  std::vector<GenRequest> reqs;
  for (size_t p = 0; p < ps.ids.size(); ++p)
    for (int s = 0; s < opt.samples; ++s) reqs.push_back({ps.ids[p], int64_t(p), s});
  GenerationStats st;
  const auto comps = generate(*L.model, *L.grid, reqs, gc, &st);
  if (world.rank() != 0) return;
  std::string text;
  for (size_t i = 0; i < comps.size(); ++i) {
    const auto& c = comps[i];
    const auto& row = ps.rows[size_t(reqs[i].prompt_index)];
    nlohmann::json j = {{"prompt_index", reqs[i].prompt_index},
                        {"sample_index", reqs[i].sample_index},
                        {"prompt", row.messages.empty() ? std::string() : row.messages.back().content},
                        {"text", completion_text(c, *L.tok, gc.stop_ids)},
                        {"token_ids", c.tokens},
                        {"logprobs", c.logprobs},
                        {"finish_reason", c.truncated ? "length" : "stop"},
                        {"num_tokens", c.tokens.size()}};
    text += j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  }
  fsutil::write_file_atomic(out, text);
  if (opt.progress)
    std::printf("generate: %zu completions of %zu prompts, %lld tokens in %.2f s (%.0f tokens/s, %d ranks, ep %d) "
                "-> %s\n",
                comps.size(), ps.ids.size(), (long long)st.new_tokens, st.seconds,
                st.seconds > 0 ? double(st.new_tokens) / st.seconds : 0.0, L.grid->world_size, L.grid->ep,
                out.c_str());
}

EvalResult run_eval(const InferenceOptions& opt, const RewardSpec& spec, const std::string& out_json) {
  const dist::Comm world = dist::Comm::world();
  bool need = false;
  for (const auto& n : spec.names) need = need || reward_needs_answer(n);
  Loaded L;
  load_for_inference(L, opt, world, need);
  const GenerationConfig& gc = L.gen;
  const PromptSet& ps = L.prompts;
  std::unique_ptr<RewardModel> rewards;
  dist::run_collectively(world, [&] {
    if (world.rank() == 0) rewards = std::make_unique<RewardModel>(spec);
  });
  const EvalResult r = evaluate_prompts(*L.model, *L.grid, ps, *L.tok, rewards.get(), gc, opt.samples);
  if (world.rank() == 0) {
    nlohmann::json j = r.to_json();
    j["checkpoint"] = opt.ckpt;
    j["prompts_file"] = opt.prompts;
    if (opt.progress) {
      std::printf("eval %s on %s (%d prompts, reward %s):\n", opt.ckpt.c_str(), opt.prompts.c_str(), r.prompts,
                  [&] {
                    std::string n;
                    for (const auto& x : spec.names) n += (n.empty() ? "" : ",") + x;
                    return n;
                  }()
                      .c_str());
      std::printf("| model  |  pass@1 | pass@%-3d | mean reward | mean length |\n", std::max(opt.samples, 1));
      std::printf("|--------|---------|----------|-------------|-------------|\n%s\n", r.table("ckpt").c_str());
    }
    std::printf("%s\n", j.dump().c_str());
    if (!out_json.empty()) fsutil::write_file_atomic(out_json, j.dump(2) + "\n");
  }
  return r;
}

}  // namespace moetune
