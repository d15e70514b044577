// The table of named views into one flat parameter buffer (llm.c style). Parameters,
// gradients and the AdamW moments share this layout, so the optimizer is one loop
// over a span. Names and shapes are the Hugging Face names of MODEL.md section 7.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "moe/config.hpp"

namespace moetune {

struct TensorInfo {
  std::string name;
  std::vector<int64_t> shape;
  size_t offset = 0;  // in elements, into the flat buffer
  size_t numel = 0;
  bool decay = true;  // weight decay applies (rank-2 tensors), not to RMSNorm weights
};

class ParamLayout {
 public:
  // All trainable tensors of the model, in a fixed canonical order. With an expert
  // range [expert_begin, expert_end) only those routed experts are included (the
  // shard of one expert-parallel rank); -1 = all experts.
  static ParamLayout build(const ModelConfig& cfg, int expert_begin = 0, int expert_end = -1);

  int expert_begin() const { return expert_begin_; }
  int expert_end() const { return expert_end_; }
  bool all_experts(const ModelConfig& cfg) const { return expert_begin_ == 0 && expert_end_ == cfg.E(); }
  // Flat range [begin, end) holding this layout's routed experts of layer l.
  std::pair<size_t, size_t> expert_region(int l) const;
  // True for tensors of routed experts (model.layers.*.mlp.experts.*).
  static bool is_expert_tensor(const std::string& name);

  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  size_t total() const { return total_; }
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  // Throws moetune::Error if the name is unknown.
  const TensorInfo& at(const std::string& name) const;
  size_t offset(const std::string& name) const { return at(name).offset; }

  // Names used by the model (one place that spells them).
  static std::string layer(int l, const std::string& rest);
  static std::string expert(int l, int e, const std::string& proj);  // proj: gate_proj|up_proj|down_proj
  static std::string bias_name(int l);  // model.layers.{l}.mlp.gate.e_score_correction_bias
  static std::string tid2eid_name(int l);  // model.layers.{l}.mlp.gate.tid2eid (hash-routed layers)

 private:
  void add(const std::string& name, std::vector<int64_t> shape, bool decay);
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, size_t> index_;
  size_t total_ = 0;
  int expert_begin_ = 0, expert_end_ = 0;
};

}  // namespace moetune
