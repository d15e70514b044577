// Learning-rate schedules (MODEL.md sections 5 and 8.1): linear warmup from 0, then
// constant, linear or cosine decay that ends exactly at min_lr_ratio * lr at
// t = total_steps and stays there afterwards.
#include "optim/schedule.hpp"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "moe/error.hpp"

namespace moetune {
namespace {

[[noreturn]] void fail(const std::string& key, const std::string& msg) {
  throw Error("key '" + key + "': " + msg);
}

}  // namespace

double lr_at(const ScheduleConfig& s, int64_t t) {
  // Steps count from 1; t < 1 (asking before the first step) is treated as step 1,
  // t > total_steps keeps the final value.
  t = std::max<int64_t>(t, 1);
  if (s.warmup_steps > 0 && t <= s.warmup_steps)
    return s.lr * static_cast<double>(t) / static_cast<double>(s.warmup_steps);
  if (s.kind == "constant") return s.lr;

  const int64_t decay_steps = s.total_steps - s.warmup_steps;
  double p = 1.0;  // no decay steps at all: already at the end
  if (decay_steps > 0)
    p = std::clamp(static_cast<double>(t - s.warmup_steps) / static_cast<double>(decay_steps), 0.0, 1.0);
  const double r = s.min_lr_ratio;
  if (s.kind == "linear") return s.lr * (r + (1.0 - r) * (1.0 - p));
  // cosine: cos(pi) rounds to exactly -1, so p = 1 gives exactly lr * r.
  return s.lr * (r + (1.0 - r) * 0.5 * (1.0 + std::cos(std::numbers::pi * p)));
}

void validate(const ScheduleConfig& s) {
  if (s.kind != "constant" && s.kind != "linear" && s.kind != "cosine")
    fail("optim.schedule", "expected one of constant, linear, cosine, got '" + s.kind + "'");
  if (!std::isfinite(s.lr) || s.lr < 0.0) fail("optim.lr", "must be a finite number >= 0");
  if (s.total_steps < 1) fail("train.steps", "must be >= 1, got " + std::to_string(s.total_steps));
  if (s.warmup_steps < 0) fail("optim.warmup_steps", "must be >= 0, got " + std::to_string(s.warmup_steps));
  if (s.warmup_steps > s.total_steps)
    fail("optim.warmup_steps", "must be <= train.steps (" + std::to_string(s.total_steps) + "), got " +
                                   std::to_string(s.warmup_steps));
  if (!(s.min_lr_ratio >= 0.0 && s.min_lr_ratio <= 1.0))
    fail("optim.min_lr_ratio", "must be in [0, 1]");
}

}  // namespace moetune
