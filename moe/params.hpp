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
  // All trainable tensors of the model, in a fixed canonical order.
  static ParamLayout build(const ModelConfig& cfg);

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

 private:
  void add(const std::string& name, std::vector<int64_t> shape, bool decay);
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, size_t> index_;
  size_t total_ = 0;
};

}  // namespace moetune
