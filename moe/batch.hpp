// One micro-batch as the model sees it: `rows` rows of `seq_len` tokens, row-major.
#pragma once
#include <cstdint>
#include <vector>

namespace moetune {

constexpr int32_t kIgnoreIndex = -100;

struct MicroBatch {
  int rows = 0;
  int seq_len = 0;
  // (rows * seq_len) each. Position t of a row predicts labels[t+1] (Hugging Face
  // convention); -100 is ignored. doc_ids mark the documents packed into a row:
  // attention never crosses a change of doc id, RoPE positions restart at each new
  // doc id, and the target across a boundary is ignored (MODEL.md section 8.6).
  std::vector<int32_t> input_ids;
  std::vector<int32_t> labels;
  std::vector<int32_t> doc_ids;
  // Optional (rows * seq_len): 1 marks a padding token, which is computed but counts in
  // no routing statistic (expert loads and the bias update, the balance losses and
  // their normalisers). Empty = none. RL rows set it (MODEL.md section 11); SFT and
  // pre-training padding counts like any token (section 8.4-8.5).
  std::vector<uint8_t> padding;

  int64_t tokens() const { return int64_t(rows) * seq_len; }
  // Target of flat position i = row * seq_len + t: labels[i+1] when t+1 < seq_len and
  // doc_ids agree, else -100.
  int32_t target(int64_t i) const {
    const int t = int(i % seq_len);
    if (t + 1 >= seq_len || doc_ids[i + 1] != doc_ids[i]) return kIgnoreIndex;
    return labels[i + 1];
  }
  // MTP target (MODEL.md section 12) of position i: labels[i+2] when t+2 < seq_len and
  // the token is in the same document, else -100.
  int32_t mtp_target(int64_t i) const {
    const int t = int(i % seq_len);
    if (t + 2 >= seq_len || doc_ids[i + 2] != doc_ids[i]) return kIgnoreIndex;
    return labels[i + 2];
  }
  // The MTP block's input token of position i: input_ids[i+1] when t+1 < seq_len and it is
  // in the same document, else input_ids[i] (a placeholder: no MTP target, and no other
  // position of its document attends to it).
  int32_t mtp_input(int64_t i) const {
    const int t = int(i % seq_len);
    if (t + 1 >= seq_len || doc_ids[i + 1] != doc_ids[i]) return input_ids[i];
    return input_ids[i + 1];
  }
  int64_t count_mtp_targets() const {
    int64_t n = 0;
    for (int64_t i = 0; i < tokens(); ++i) n += mtp_target(i) != kIgnoreIndex;
    return n;
  }
  bool is_padding(int64_t i) const { return !padding.empty() && padding[std::size_t(i)] != 0; }
  int64_t count_targets() const {
    int64_t n = 0;
    for (int64_t i = 0; i < tokens(); ++i) n += target(i) != kIgnoreIndex;
    return n;
  }
};

}  // namespace moetune
