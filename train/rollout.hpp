// What `moetune generate`, `moetune eval` and `moetune rl` share: a prompt file
// rendered with the model's tokenizer, rewards scored on rank 0 and shared with every
// rank, and the evaluation of a checkpoint on held-out prompts (greedy pass@1, pass@k).
#pragma once
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "dist/grid.hpp"
#include "moe/model.hpp"
#include "tokenizer/tokenizer.hpp"
#include "train/generate.hpp"
#include "train/reward.hpp"
#include "train/rl_data.hpp"

namespace moetune {

// The prompts of a file and their token ids (MODEL.md section 10 rendering).
struct PromptSet {
  std::string path;
  std::vector<PromptRow> rows;
  std::vector<std::vector<int32_t>> ids;
  int longest = 0;  // tokens of the longest prompt
};

// A plain-text prompt file: every non-empty line is one user prompt (no answers).
// Errors name path:line (invalid UTF-8) or "path: no prompts".
std::vector<PromptRow> read_prompt_text(const std::string& path);

// Reads and renders a prompt file: JSONL (read_prompt_jsonl), or plain text when the
// name ends in ".txt" (read_prompt_text). Throws moetune::Error naming path:line for a prompt
// whose tokens + max_new_tokens exceed max_positions (the model's context), and the
// read_prompt_jsonl errors (a missing answer when need_answer).
PromptSet load_prompts(const std::string& path, const Tokenizer& tok, bool need_answer, int max_new_tokens,
                       int max_positions);

// The stop ids of a tokenizer: <|end|> and <|eos|> (those it has).
std::vector<int32_t> stop_ids(const Tokenizer& tok);

// Scores completions (request i came from prompt prompt_of[i]) with `rewards` on world
// rank 0 and shares the scores with every rank. Collective: an error of the reward
// (a crashed or garbled reward program) is thrown on every rank with rank 0's message.
// `rewards` may be null on the other ranks.
RewardScores score_completions(const dist::Comm& world, RewardModel* rewards, const PromptSet& prompts,
                               const std::vector<int64_t>& prompt_of, const std::vector<Completion>& completions,
                               const Tokenizer& tok);

// The completion's text without its stop token.
std::string completion_text(const Completion& c, const Tokenizer& tok, const std::vector<int32_t>& stops);

// A completion counts as correct when the first reward function gives more than 0.5.
inline bool is_correct(const RewardScores& s, size_t i) { return s.per_function.at(0).at(i) > 0.5; }

// Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).
double pass_at_k(int n, int c, int k);

struct EvalResult {
  int prompts = 0;
  double pass1_greedy = 0;        // greedy decoding, fraction of prompts correct
  double mean_reward_greedy = 0;  // mean total reward of the greedy completions
  double mean_length_greedy = 0;  // mean completion tokens (greedy)
  double truncated_greedy = 0;    // fraction truncated (greedy)
  int samples = 0;                // n sampled completions per prompt (0 = none)
  double pass1_sampled = 0;       // mean over prompts of c/n
  double pass_k = 0;              // unbiased pass@n ... reported as pass@samples
  double mean_reward_sampled = 0;
  double gen_tokens_per_s = 0;    // generation speed over the whole evaluation
  double seconds = 0;
  nlohmann::json to_json() const;
  std::string table(const std::string& name) const;  // a Markdown row set for the log
};

// Greedy completions of every prompt (and `samples` sampled ones at `sampling` when
// > 0), scored with `rewards` (rank 0). Collective over grid.world.
template <class T>
EvalResult evaluate_prompts(Model<T>& model, const dist::ProcessGrid& grid, const PromptSet& prompts,
                            const Tokenizer& tok, RewardModel* rewards, const GenerationConfig& base, int samples);

// `moetune generate` and `moetune eval`: a checkpoint loaded on this rank's share of
// the experts (parallel.ep), its tokenizer, a prompt file. Collective over MPI_COMM_WORLD.
struct InferenceOptions {
  std::string ckpt, prompts;
  int ep = 1, threads = 0;
  GenerationConfig gen;  // stop ids come from the tokenizer
  int samples = 1;       // generate: completions per prompt; eval: sampled completions for pass@k (0 = none)
  bool progress = true;
};

// Writes one JSON line per completion to `out` (rank 0), in (prompt, sample) order:
// {"prompt_index", "sample_index", "prompt", "text", "token_ids", "logprobs", "finish_reason"
// ("stop" | "length"), "num_tokens"}, and prints a tokens/s line.
void run_generate(const InferenceOptions& opt, const std::string& out);

// Greedy pass@1 (+ pass@k from opt.samples samples) of the checkpoint on the prompts,
// scored with `spec`; printed as a table and one JSON object; written to out_json if set.
EvalResult run_eval(const InferenceOptions& opt, const RewardSpec& spec, const std::string& out_json);

}  // namespace moetune
