#include "train/step.hpp"

#include <cmath>

namespace moetune {

LossNorm global_loss_norm(const std::vector<MicroBatch>& batch) {
  // Rows and micro-batches made only of padding (MicroBatch::padding) are not
  // sequences: they do not count in the balance losses' normalisers.
  LossNorm n;
  int64_t targets = 0, mtp_targets = 0, rows = 0, micro = 0;
  for (const auto& mb : batch) {
    targets += mb.count_targets();
    mtp_targets += mb.count_mtp_targets();
    int64_t real_rows = 0;
    for (int r = 0; r < mb.rows; ++r) {
      bool any = mb.padding.empty();
      for (int t = 0; t < mb.seq_len && !any; ++t) any = !mb.is_padding(int64_t(r) * mb.seq_len + t);
      real_rows += any;
    }
    rows += real_rows;
    micro += real_rows > 0;
  }
  n.n_targets = double(targets);
  n.n_mtp_targets = double(mtp_targets);
  n.n_micro = int(std::max<int64_t>(1, micro));
  n.n_rows = int(std::max<int64_t>(1, rows));
  return n;
}

template <class T>
StepResult accumulate_gradients(Model<T>& model, const std::vector<MicroBatch>& batch) {
  StepResult r;
  const LossNorm norm = global_loss_norm(batch);
  model.zero_grad();
  const int moe_layers = model.config().num_moe_layers();
  r.expert_counts.assign(moe_layers, std::vector<int64_t>(model.config().E(), 0));
  for (const auto& mb : batch) {
    const MicroStats s = model.forward_backward(mb, norm, true);
    r.loss += s.ce;
    r.aux_loss += s.aux_loss;
    r.seq_aux_loss += s.seq_aux_loss;
    r.z_loss += s.z_loss;
    r.mtp_loss += s.mtp_loss;
    r.n_targets += s.n_targets;
    r.tokens += mb.tokens();
    r.dropped_pairs += s.dropped_pairs;
    for (int j = 0; j < moe_layers; ++j)
      for (int e = 0; e < model.config().E(); ++e) r.expert_counts[j][e] += s.expert_counts[j][e];
  }
  r.total_loss = r.loss + r.aux_loss + r.seq_aux_loss + r.z_loss + r.mtp_loss;
  r.grad_norm = global_grad_norm(model.grads());
  return r;
}

void update_expert_bias(std::vector<std::vector<float>>& bias, const std::vector<std::vector<int64_t>>& counts,
                        double rate) {
  for (size_t j = 0; j < bias.size(); ++j) {
    if (bias[j].empty()) continue;  // a hash-routed layer has no bias (MODEL.md section 12)
    const auto& c = counts[j];
    double mean = 0;
    for (auto v : c) mean += double(v);
    mean /= double(c.size());
    for (size_t e = 0; e < c.size(); ++e) {
      const double diff = mean - double(c[e]);
      const double sign = diff > 0 ? 1.0 : (diff < 0 ? -1.0 : 0.0);
      bias[j][e] = float(double(bias[j][e]) + rate * sign);
    }
  }
}

void finish_step(StepResult& r, const ModelConfig& cfg, std::vector<std::vector<float>>& bias, double max_grad_norm,
                 const std::function<void(double clip)>& update) {
  if (!std::isfinite(r.total_loss) || !std::isfinite(r.grad_norm)) {
    r.skipped = true;
    return;
  }
  r.clip_coef = clip_coefficient(r.grad_norm, max_grad_norm);
  update(r.clip_coef);
  if (cfg.noaux_tc()) update_expert_bias(bias, r.expert_counts, cfg.bias_update_rate);
}

namespace {
// train_step of both optimizer types.
template <class T, class Opt>
StepResult train_step_with(Model<T>& model, Opt& opt, const std::vector<MicroBatch>& batch, double lr,
                           double max_grad_norm) {
  StepResult r = accumulate_gradients(model, batch);
  finish_step(r, model.config(), model.expert_bias(), max_grad_norm,
              [&](double clip) { opt.step(model.params(), model.grads(), lr, clip); });
  return r;
}
}  // namespace

template <class T>
StepResult train_step(Model<T>& model, AdamW<T>& opt, const std::vector<MicroBatch>& batch, double lr,
                      double max_grad_norm) {
  return train_step_with(model, opt, batch, lr, max_grad_norm);
}

template <class T>
StepResult train_step(Model<T>& model, Optimizer<T>& opt, const std::vector<MicroBatch>& batch, double lr,
                      double max_grad_norm) {
  return train_step_with(model, opt, batch, lr, max_grad_norm);
}

template StepResult accumulate_gradients<float>(Model<float>&, const std::vector<MicroBatch>&);
template StepResult accumulate_gradients<double>(Model<double>&, const std::vector<MicroBatch>&);
template StepResult train_step<float>(Model<float>&, AdamW<float>&, const std::vector<MicroBatch>&, double, double);
template StepResult train_step<double>(Model<double>&, AdamW<double>&, const std::vector<MicroBatch>&, double,
                                       double);
template StepResult train_step<float>(Model<float>&, Optimizer<float>&, const std::vector<MicroBatch>&, double,
                                      double);
template StepResult train_step<double>(Model<double>&, Optimizer<double>&, const std::vector<MicroBatch>&, double,
                                       double);

}  // namespace moetune
