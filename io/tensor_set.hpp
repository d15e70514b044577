// Tensor sets of checkpoint directories: "<stem>.safetensors", or Hugging Face style
// shards "<stem>-0000k-of-0000n.safetensors" plus "<stem>.safetensors.index.json",
// read and written in one place for moetune checkpoints (io/checkpoint.cpp) and the
// Hugging Face converter (io/hf_convert.cpp); and the atomic replacement of a whole
// checkpoint directory both of them write through.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "io/safetensors.hpp"

namespace moetune {

// Writes `tensors` (in order) as <dir>/<stem>.safetensors, or, when max_shard_bytes > 0
// and they do not fit in one shard, as greedy shards plus the index (metadata copied
// into the index's "metadata" next to total_size).
void write_tensor_set(const std::string& dir, const std::string& stem, const std::vector<TensorToWrite>& tensors,
                      const std::map<std::string, std::string>& metadata, uint64_t max_shard_bytes);

// The tensors of one tensor set, whichever layout it has.
struct TensorSource {
  std::string label;  // the file named in messages: the single file or the index
  std::vector<SafetensorsReader> files;
  std::unordered_map<std::string, size_t> where;  // tensor name -> files[i]
  std::vector<std::string> names;                  // every tensor, file by file in data order

  bool has(const std::string& name) const { return where.count(name) != 0; }
  const SafetensorsReader& file_of(const std::string& name) const { return files[where.at(name)]; }
  const std::map<std::string, std::string>& metadata() const { return files.front().metadata(); }
  // Error unless `name` is present with exactly `shape`.
  const SafeTensorInfo& expect(const std::string& name, const std::vector<int64_t>& shape) const;
  // Error naming the first tensor that is not in `expected`.
  void reject_unexpected(const std::unordered_set<std::string>& expected) const;
};

// nullopt if <dir> has neither <stem>.safetensors nor its index; Error if it has both,
// or if the index and the shards disagree.
std::optional<TensorSource> open_tensor_set(const std::string& dir, const std::string& stem);

// Creates or replaces the directory <dir> atomically: fill(tmp) writes every file into
// the fresh "<dir>.tmp-<pid>", which is fsynced and only then renamed to <dir>. An
// existing <dir> must be empty or hold a config.json (a checkpoint), else nothing is
// touched; any failure (of fill included) removes the temporary and leaves the old
// <dir> intact. `what` names the operation in messages ("saving the checkpoint").
void replace_dir_atomically(const std::string& dir, const std::string& what,
                            const std::function<void(const std::string& tmp)>& fill);

// <dir> without trailing slashes; Error for "", ".", ".." and "/" (which cannot be
// renamed into place).
std::string clean_checkpoint_dir(const std::string& dir);

}  // namespace moetune
