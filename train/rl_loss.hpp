// The GRPO-family RL objective (MODEL.md section 11): advantages from rewards, the
// aggregation weight of every loss token, and the loss head over a micro-batch's logits
// with its gradient (llm.c style: outputs, inputs, then sizes; shapes in comments).
// Names follow TRL's GRPOTrainer (epsilon, epsilon_high, beta, loss_type,
// importance_sampling_level, scale_rewards).
#pragma once
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace moetune {

struct RlLossConfig {
  std::string loss_type = "token_mean";             // | "seq_mean_token_mean" | "seq_mean_token_sum_norm"
  std::string importance_sampling_level = "token";  // | "sequence" (GSPO)
  double epsilon = 0.2, epsilon_high = 0.2;         // clip range [1 - epsilon, 1 + epsilon_high]
  double beta = 0.0;                                // k3 KL weight; 0 = no reference model
  double temperature = 1.0;                         // log-probs are log_softmax(z / tau) (tau = 0 -> 1)
  int max_new_tokens = 1;                           // the normaliser of seq_mean_token_sum_norm
};

// Throws moetune::Error naming rl.loss_type, rl.importance_sampling_level, rl.epsilon
// (not in [0, 1]), rl.epsilon_high (< 0), rl.beta (< 0), rl.temperature (< 0) or
// rl.max_new_tokens (< 1); non-finite numbers are rejected too.
void validate(const RlLossConfig& c);

// Advantages of B*G rewards in group order (completion i belongs to group i / G):
//   "group": (r_i - mean_group) / (std_group + 1e-4)
//   "batch": (r_i - mean_group) / (std_all + 1e-4)
//   "none" : r_i - mean_group                              (Dr. GRPO)
// std with Bessel's correction (torch.std); sums in index order. Errors name
// rl.num_generations (G < 1, G not dividing the count, G < 2 under "group") or
// rl.scale_rewards (unknown value, a single reward under "batch").
std::vector<double> compute_advantages(const std::vector<double>& rewards, int G, const std::string& scale_rewards);

// Aggregation weight of each loss token of completion i (loss_tokens (C)), for one
// optimizer step over these C completions (all ranks):
//   token_mean              1 / sum_j n_j
//   seq_mean_token_mean     1 / (C * n_i)
//   seq_mean_token_sum_norm 1 / (C * max_new_tokens)
// A completion with n_i = 0 gets 0; no tokens at all gives all zeros (loss 0, not NaN).
// Errors name rl.loss_type, rl.max_new_tokens; negative counts are rejected.
std::vector<double> completion_token_weights(const std::vector<int64_t>& loss_tokens, const std::string& loss_type,
                                             int max_new_tokens);

// The loss tokens of one micro-batch of N positions (Hugging Face convention: the
// logits of position n predict targets[n]). Only positions with targets >= 0 are read.
struct RlTokens {
  const int32_t* targets;   // (N) predicted token, -100 where there is no loss
  const double* lp_old;     // (N) log pi_old of the target
  const double* lp_ref;     // (N) log pi_ref of the target; nullptr when beta == 0
  const double* advantage;  // (N) advantage of the completion the position belongs to
  const double* weight;     // (N) aggregation weight (completion_token_weights)
  const int32_t* seq;       // (N) completion id, unique within the micro-batch (sequence level:
                            //     all loss positions of one id are one completion)
};

struct RlHeadStats {
  double loss = 0;         // sum_t weight_t * (pg_t + beta * kl_t)
  double pg_loss = 0;      // sum_t weight_t * pg_t
  double kl_sum = 0;       // sum_t kl_t (0 when beta == 0)
  double entropy_sum = 0;  // sum_t entropy of softmax(z_t / tau)
  double ratio_sum = 0;    // sum_t ratio_t
  double ratio_min = std::numeric_limits<double>::infinity();
  double ratio_max = -std::numeric_limits<double>::infinity();
  double lp_sum = 0;                          // sum_t lp_t
  int64_t tokens = 0;                         // loss tokens
  int64_t clipped_low = 0, clipped_high = 0;  // ratio < 1-eps with A < 0; ratio > 1+eps_high with A > 0
};

// Forward of the RL loss head over logits (N,V) and, if dlogits is non-null,
// dlogits (N,V) = d loss / d logits (overwritten; zero rows where there is no loss).
// Per loss token t of completion i, lp = log_softmax(z / tau)[target]:
//   ratio = exp(lp - lp_old)                        (importance_sampling_level "token")
//   ratio = exp(sum_{t in i}(lp - lp_old) / |o_i|)  ("sequence", |o_i| = loss tokens of i)
//   pg    = -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A)
//   kl    = exp(lp_ref - lp) - (lp_ref - lp) - 1    (only when beta > 0)
// The gradient flows through the unclipped branch when it is the minimum and is 0
// when the clipped branch is strictly smaller; d lp / d z = (onehot - softmax(z/tau)) / tau.
// lp_out (N, optional): lp at loss positions, NaN elsewhere. Double accumulation;
// per-position work is parallel and every sum runs in position order, so the result
// does not depend on the thread count. The config is assumed valid (validate).
template <class T>
RlHeadStats rl_loss_head(T* dlogits, const T* logits, int64_t N, int64_t V, const RlTokens& tok,
                         const RlLossConfig& c, double* lp_out = nullptr);

// lp (N) and, if entropy is non-null, entropy (N) of log_softmax(z / tau) at positions
// with targets >= 0 (NaN elsewhere); logits (N,V), targets (N). tau = 0 means 1. Used
// for pi_old, the reference model and checks; bit-identical to rl_loss_head's lp and to
// token_logprob (train/sampling.hpp).
template <class T>
void token_logprobs(double* lp, double* entropy, const T* logits, const int32_t* targets, int64_t N, int64_t V,
                    double temperature);

}  // namespace moetune
