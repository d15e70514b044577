// Learning-rate schedules with linear warmup (MODEL.md section 5 and 8.1).
#pragma once
#include <cstdint>
#include <string>

namespace moetune {

struct ScheduleConfig {
  std::string kind = "cosine";  // constant | linear | cosine
  double lr = 1e-3;
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;
  double min_lr_ratio = 0.0;
};

// Learning rate of step t (t counted from 1). Warmup lr*t/warmup while t <= warmup;
// then progress p = (t - warmup) / (total - warmup) in [0, 1]; linear:
// lr*(r + (1-r)(1-p)); cosine: lr*(r + (1-r)*0.5*(1+cos(pi p))); r = min_lr_ratio.
double lr_at(const ScheduleConfig& s, int64_t t);
// Throws moetune::Error naming the key (optim.schedule, ...) when invalid.
void validate(const ScheduleConfig& s);

}  // namespace moetune
