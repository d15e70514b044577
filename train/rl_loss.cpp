#include "train/rl_loss.hpp"

#include <algorithm>
#include <cmath>
#include <unordered_map>

#include "moe/error.hpp"
#include "train/log_softmax_row.hpp"

namespace moetune {
namespace {

const double kNaN = std::numeric_limits<double>::quiet_NaN();

bool finite_nonneg(double x) { return std::isfinite(x) && x >= 0; }

}  // namespace

void validate(const RlLossConfig& c) {
  if (c.loss_type != "token_mean" && c.loss_type != "seq_mean_token_mean" && c.loss_type != "seq_mean_token_sum_norm")
    throw Error("rl.loss_type must be \"token_mean\", \"seq_mean_token_mean\" or \"seq_mean_token_sum_norm\", got \"" +
                c.loss_type + "\"");
  if (c.importance_sampling_level != "token" && c.importance_sampling_level != "sequence")
    throw Error("rl.importance_sampling_level must be \"token\" or \"sequence\", got \"" +
                c.importance_sampling_level + "\"");
  if (!finite_nonneg(c.epsilon) || c.epsilon > 1)
    throw Error("rl.epsilon must be in [0, 1], got " + std::to_string(c.epsilon));
  if (!finite_nonneg(c.epsilon_high))
    throw Error("rl.epsilon_high must be a finite number >= 0, got " + std::to_string(c.epsilon_high));
  if (!finite_nonneg(c.beta)) throw Error("rl.beta must be a finite number >= 0, got " + std::to_string(c.beta));
  if (!finite_nonneg(c.temperature))
    throw Error("rl.temperature must be a finite number >= 0, got " + std::to_string(c.temperature));
  if (c.max_new_tokens < 1) throw Error("rl.max_new_tokens must be >= 1, got " + std::to_string(c.max_new_tokens));
}

std::vector<double> compute_advantages(const std::vector<double>& rewards, int G, const std::string& scale_rewards) {
  if (scale_rewards != "group" && scale_rewards != "batch" && scale_rewards != "none")
    throw Error("rl.scale_rewards must be \"group\", \"batch\" or \"none\", got \"" + scale_rewards + "\"");
  if (G < 1) throw Error("rl.num_generations must be >= 1, got " + std::to_string(G));
  const size_t n = rewards.size();
  if (n % size_t(G) != 0)
    throw Error("rl.num_generations = " + std::to_string(G) + " does not divide the " + std::to_string(n) +
                " rewards");
  if (scale_rewards == "group" && G < 2)
    throw Error("rl.scale_rewards = \"group\" needs rl.num_generations >= 2 (a group std of one reward), got " +
                std::to_string(G));
  if (scale_rewards == "batch" && n == 1)
    throw Error("rl.scale_rewards = \"batch\" needs at least 2 completions per step (a std of one reward)");
  // Bessel-corrected std of v[begin, end) around its own mean.
  auto stddev = [&](size_t begin, size_t end) {
    double mean = 0;
    for (size_t i = begin; i < end; ++i) mean += rewards[i];
    mean /= double(end - begin);
    double ss = 0;
    for (size_t i = begin; i < end; ++i) ss += (rewards[i] - mean) * (rewards[i] - mean);
    return std::sqrt(ss / double(end - begin - 1));
  };
  const double batch_std = scale_rewards == "batch" ? stddev(0, n) : 0.0;
  std::vector<double> adv(n);
  for (size_t g0 = 0; g0 < n; g0 += size_t(G)) {
    double mean = 0;
    for (size_t i = g0; i < g0 + size_t(G); ++i) mean += rewards[i];
    mean /= double(G);
    double denom = 1.0;
    if (scale_rewards == "group") denom = stddev(g0, g0 + size_t(G)) + 1e-4;
    if (scale_rewards == "batch") denom = batch_std + 1e-4;
    for (size_t i = g0; i < g0 + size_t(G); ++i)
      adv[i] = scale_rewards == "none" ? rewards[i] - mean : (rewards[i] - mean) / denom;
  }
  return adv;
}

std::vector<double> completion_token_weights(const std::vector<int64_t>& loss_tokens, const std::string& loss_type,
                                             int max_new_tokens) {
  if (loss_type != "token_mean" && loss_type != "seq_mean_token_mean" && loss_type != "seq_mean_token_sum_norm")
    throw Error("rl.loss_type must be \"token_mean\", \"seq_mean_token_mean\" or \"seq_mean_token_sum_norm\", got \"" +
                loss_type + "\"");
  if (loss_type == "seq_mean_token_sum_norm" && max_new_tokens < 1)
    throw Error("rl.max_new_tokens must be >= 1 for seq_mean_token_sum_norm, got " + std::to_string(max_new_tokens));
  const double C = double(loss_tokens.size());
  int64_t total = 0;
  for (int64_t n : loss_tokens) {
    if (n < 0) throw Error("completion_token_weights: negative loss token count " + std::to_string(n));
    total += n;
  }
  std::vector<double> w(loss_tokens.size(), 0.0);
  for (size_t i = 0; i < loss_tokens.size(); ++i) {
    const int64_t n = loss_tokens[i];
    if (n == 0) continue;
    if (loss_type == "token_mean") {
      w[i] = 1.0 / double(total);
    } else if (loss_type == "seq_mean_token_mean") {
      w[i] = 1.0 / (C * double(n));
    } else {
      w[i] = 1.0 / (C * double(max_new_tokens));
    }
  }
  return w;
}

template <class T>
void token_logprobs(double* lp, double* entropy, const T* logits, const int32_t* targets, int64_t N, int64_t V,
                    double temperature) {
  const double tau = detail::logprob_temperature(temperature);
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    if (targets[n] < 0) {
      lp[n] = kNaN;
      if (entropy) entropy[n] = kNaN;
      continue;
    }
    const T* z = logits + n * V;
    const double lse = detail::row_logsumexp(z, V, tau);
    lp[n] = double(z[targets[n]]) / tau - lse;
    if (entropy) entropy[n] = detail::row_entropy(z, V, tau, lse);
  }
}

template <class T>
RlHeadStats rl_loss_head(T* dlogits, const T* logits, int64_t N, int64_t V, const RlTokens& tok,
                         const RlLossConfig& c, double* lp_out) {
  const double tau = detail::logprob_temperature(c.temperature);
  const bool sequence = c.importance_sampling_level == "sequence";
  const bool kl_on = c.beta > 0;
  if (kl_on && !tok.lp_ref) throw Error("rl_loss_head: rl.beta > 0 needs the reference log-probabilities");
  for (int64_t n = 0; n < N; ++n)
    if (tok.targets[n] >= V) throw Error("rl_loss_head: target " + std::to_string(tok.targets[n]) + " >= vocab");

  // 1. Per position: logsumexp, lp and entropy (parallel, each row on its own).
  std::vector<double> lse(size_t(N), kNaN), lp(size_t(N), kNaN), ent(size_t(N), kNaN);
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    if (tok.targets[n] < 0) continue;
    const T* z = logits + n * V;
    lse[n] = detail::row_logsumexp(z, V, tau);
    lp[n] = double(z[tok.targets[n]]) / tau - lse[n];
    ent[n] = detail::row_entropy(z, V, tau, lse[n]);
  }

  // 2. Sequence level: mean log-ratio of each completion, in position order.
  std::unordered_map<int32_t, size_t> slot;  // completion id -> index into the sums
  std::vector<double> seq_logratio;
  std::vector<int64_t> seq_len;
  std::vector<size_t> pos_slot(sequence ? size_t(N) : 0);
  if (sequence) {
    for (int64_t n = 0; n < N; ++n) {
      if (tok.targets[n] < 0) continue;
      auto [it, added] = slot.emplace(tok.seq[n], seq_logratio.size());
      if (added) {
        seq_logratio.push_back(0.0);
        seq_len.push_back(0);
      }
      pos_slot[n] = it->second;
      seq_logratio[it->second] += lp[n] - tok.lp_old[n];
      seq_len[it->second] += 1;
    }
  }
  std::vector<double> seq_ratio(seq_logratio.size());
  for (size_t s = 0; s < seq_ratio.size(); ++s) seq_ratio[s] = std::exp(seq_logratio[s] / double(seq_len[s]));

  // 3. Per token: ratio, pg, kl and d loss / d lp (or, at the sequence level, d loss / d ratio
  // of the completion, collected in position order). Stats summed in position order.
  RlHeadStats st;
  std::vector<double> dlp(size_t(N), 0.0);
  std::vector<double> dseq(seq_ratio.size(), 0.0);  // d loss / d ratio_i
  const double lo = 1.0 - c.epsilon, hi = 1.0 + c.epsilon_high;
  for (int64_t n = 0; n < N; ++n) {
    if (tok.targets[n] < 0) continue;
    const double A = tok.advantage[n], w = tok.weight[n];
    const double ratio = sequence ? seq_ratio[pos_slot[n]] : std::exp(lp[n] - tok.lp_old[n]);
    const double unclipped = ratio * A, clipped = std::clamp(ratio, lo, hi) * A;
    const double pg = -std::min(unclipped, clipped);
    // Through the unclipped branch unless the clipped one is strictly the minimum.
    const double dpg_dratio = clipped < unclipped ? 0.0 : -A;
    double kl = 0, dkl_dlp = 0;
    if (kl_on) {
      const double d = tok.lp_ref[n] - lp[n];
      kl = std::exp(d) - d - 1.0;
      dkl_dlp = 1.0 - std::exp(d);
    }
    if (sequence)
      dseq[pos_slot[n]] += w * dpg_dratio;
    else
      dlp[n] = w * dpg_dratio * ratio;
    dlp[n] += w * c.beta * dkl_dlp;

    st.loss += w * (pg + c.beta * kl);
    st.pg_loss += w * pg;
    st.kl_sum += kl;
    st.entropy_sum += ent[n];
    st.ratio_sum += ratio;
    st.ratio_min = std::min(st.ratio_min, ratio);
    st.ratio_max = std::max(st.ratio_max, ratio);
    st.lp_sum += lp[n];
    st.tokens += 1;
    if (ratio < lo && A < 0) st.clipped_low += 1;
    if (ratio > hi && A > 0) st.clipped_high += 1;
  }
  // d ratio_i / d lp_t = ratio_i / |o_i| for every token t of completion i.
  if (sequence)
    for (int64_t n = 0; n < N; ++n)
      if (tok.targets[n] >= 0) {
        const size_t s = pos_slot[n];
        dlp[n] += dseq[s] * seq_ratio[s] / double(seq_len[s]);
      }

  if (lp_out) std::copy(lp.begin(), lp.end(), lp_out);

  // 4. d loss / d z = dlp * (onehot - softmax(z / tau)) / tau.
  if (dlogits) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      T* dz = dlogits + n * V;
      if (tok.targets[n] < 0) {
        std::fill_n(dz, V, T(0));
        continue;
      }
      const T* z = logits + n * V;
      const double g = dlp[n] / tau;
      const int64_t t = tok.targets[n];
      for (int64_t j = 0; j < V; ++j) {
        const double p = std::exp(double(z[j]) / tau - lse[n]);
        dz[j] = T(j == t ? g * (1.0 - p) : -g * p);
      }
    }
  }
  return st;
}

template void token_logprobs<float>(double*, double*, const float*, const int32_t*, int64_t, int64_t, double);
template void token_logprobs<double>(double*, double*, const double*, const int32_t*, int64_t, int64_t, double);
template RlHeadStats rl_loss_head<float>(float*, const float*, int64_t, int64_t, const RlTokens&,
                                         const RlLossConfig&, double*);
template RlHeadStats rl_loss_head<double>(double*, const double*, int64_t, int64_t, const RlTokens&,
                                          const RlLossConfig&, double*);

}  // namespace moetune
