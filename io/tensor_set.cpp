// Tensor sets and atomic checkpoint directories (see tensor_set.hpp).
#include "io/tensor_set.hpp"

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "io/fsutil.hpp"
#include "io/json_parse.hpp"
#include "moe/error.hpp"

namespace moetune {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::string join(const std::string& dir, const std::string& file) { return (fs::path(dir) / file).string(); }

}  // namespace

std::string clean_checkpoint_dir(const std::string& dir) {
  std::string d = dir;
  while (d.size() > 1 && d.back() == '/') d.pop_back();
  const std::string base = fs::path(d).filename().string();
  if (d.empty() || base.empty() || base == "." || base == ".." || d == "/")
    throw Error("checkpoint directory '" + dir + "': must name a directory (not '.', '..' or '/')");
  return d;
}

// ---------------------------------------------------------------------------------
// Writing: one file, or shards plus a Hugging Face style index.

void write_tensor_set(const std::string& dir, const std::string& stem, const std::vector<TensorToWrite>& tensors,
                      const std::map<std::string, std::string>& metadata, uint64_t max_shard_bytes) {
  // Greedy packing in the given order; a tensor larger than the limit is alone.
  std::vector<std::vector<TensorToWrite>> shards(1);
  uint64_t shard_bytes = 0, total = 0;
  for (const auto& t : tensors) {
    uint64_t bytes = t.element_bytes();
    for (auto s : t.shape) bytes *= static_cast<uint64_t>(s);
    if (max_shard_bytes > 0 && !shards.back().empty() && shard_bytes + bytes > max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(t);
    shard_bytes += bytes;
    total += bytes;
  }
  if (shards.size() == 1) {
    write_safetensors(join(dir, stem + ".safetensors"), tensors, metadata);
    return;
  }
  json index = {{"metadata", {{"total_size", total}}}, {"weight_map", json::object()}};
  for (const auto& [k, v] : metadata) index["metadata"][k] = v;
  const size_t n = shards.size();
  for (size_t k = 0; k < n; ++k) {
    char name[128];
    std::snprintf(name, sizeof name, "%s-%05zu-of-%05zu.safetensors", stem.c_str(), k + 1, n);
    write_safetensors(join(dir, name), shards[k], metadata);
    for (const auto& t : shards[k]) index["weight_map"][t.name] = name;
  }
  fsutil::write_file_atomic(join(dir, stem + ".safetensors.index.json"), index.dump(2) + "\n");
}

// ---------------------------------------------------------------------------------
// Reading: "<stem>.safetensors" or "<stem>.safetensors.index.json" + shards.

const SafeTensorInfo& TensorSource::expect(const std::string& name, const std::vector<int64_t>& shape) const {
  auto it = where.find(name);
  if (it == where.end())
    throw Error(label + ": missing tensor '" + name + "' (expected shape " + format_shape(shape) + ")");
  const SafeTensorInfo& t = files[it->second].at(name);
  if (t.shape != shape)
    throw Error(files[it->second].path() + ": tensor '" + name + "' has shape " + format_shape(t.shape) +
                " but the model configuration needs " + format_shape(shape));
  return t;
}

void TensorSource::reject_unexpected(const std::unordered_set<std::string>& expected) const {
  for (const auto& n : names)
    if (!expected.count(n))
      throw Error(file_of(n).path() + ": unexpected tensor '" + n + "' (not part of this model configuration)");
}

std::optional<TensorSource> open_tensor_set(const std::string& dir, const std::string& stem) {
  const std::string single = join(dir, stem + ".safetensors"), index = single + ".index.json";
  const bool has_single = fs::exists(single), has_index = fs::exists(index);
  if (!has_single && !has_index) return std::nullopt;
  if (has_single && has_index)
    throw Error(dir + ": both " + stem + ".safetensors and " + stem +
                ".safetensors.index.json exist; a checkpoint holds one or the other");
  TensorSource src;
  const auto add_file = [&](const std::string& path) {
    src.files.emplace_back(path);
    for (const auto& t : src.files.back().tensors()) {
      if (!src.where.emplace(t.name, src.files.size() - 1).second)
        throw Error(path + ": tensor '" + t.name + "' also appears in " + src.file_of(t.name).path());
      src.names.push_back(t.name);
    }
  };
  if (has_single) {
    src.label = single;
    add_file(single);
    return src;
  }
  src.label = index;
  json j;
  try {
    j = parse_json(fsutil::read_file(index));
  } catch (const JsonError& e) {
    throw Error(index + ": invalid JSON: " + e.what());
  }
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
    throw Error(index + ": expected a JSON object with a \"weight_map\" object");
  std::set<std::string> shard_files;
  for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
    if (!it.value().is_string()) throw Error(index + ": weight_map entry '" + it.key() + "' is not a string");
    const std::string f = it.value().get<std::string>();
    if (f.empty() || f.find('/') != std::string::npos || f == "." || f == "..")
      throw Error(index + ": weight_map entry '" + it.key() + "' names '" + f + "', not a file of the checkpoint");
    shard_files.insert(f);
  }
  if (shard_files.empty()) throw Error(index + ": empty weight_map");
  for (const auto& f : shard_files) add_file(join(dir, f));
  for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
    const std::string shard = join(dir, it.value().get<std::string>());
    auto w = src.where.find(it.key());
    if (w == src.where.end() || src.files[w->second].path() != shard)
      throw Error(index + ": weight_map puts tensor '" + it.key() + "' in " + shard + ", which does not hold it");
  }
  if (src.where.size() != j["weight_map"].size())
    for (const auto& n : src.names)
      if (!j["weight_map"].contains(n))
        throw Error(src.file_of(n).path() + ": tensor '" + n + "' is not listed in " + index);
  return src;
}

void replace_dir_atomically(const std::string& dir_in, const std::string& what,
                            const std::function<void(const std::string& tmp)>& fill) {
  const std::string dir = clean_checkpoint_dir(dir_in);
  std::error_code ec;
  const std::string parent = fsutil::parent_dir(dir);
  fs::create_directories(parent, ec);
  if (ec) throw Error(dir + ": cannot create parent directory '" + parent + "': " + ec.message());
  const bool replacing = fs::exists(fs::symlink_status(dir));
  if (replacing) {
    if (!fs::is_directory(fs::symlink_status(dir)))
      throw Error(dir + ": exists and is not a directory; refusing to replace it with a checkpoint");
    if (!fs::is_empty(dir, ec) && !fs::exists(join(dir, "config.json")))
      throw Error(dir + ": exists and is not a moetune checkpoint (no config.json); refusing to replace it");
  }

  const std::string pid = std::to_string(::getpid());
  const std::string tmp = dir + ".tmp-" + pid, old = dir + ".old-" + pid;
  // A leftover from a crashed run that had our pid: ours by name, safe to remove.
  fs::remove_all(tmp, ec);
  if (ec) throw Error(dir + ": cannot remove stale temporary '" + tmp + "': " + ec.message());
  if (!fs::create_directory(tmp, ec) || ec)
    throw Error(dir + ": cannot create temporary directory '" + tmp + "': " +
                (ec ? ec.message() : std::string("already exists")));
  try {
    fill(tmp);
    fsutil::fsync_dir(tmp);
  } catch (const Error& e) {
    fs::remove_all(tmp, ec);
    throw Error(dir + ": " + what + " failed" + (replacing ? " (the existing one is left intact)" : "") + ": " +
                e.what());
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }

  // Swap into place: the old directory is only removed once the new one has its name.
  if (replacing) {
    fs::remove_all(old, ec);
    fs::rename(dir, old, ec);
    if (ec) {
      const std::string msg = ec.message();
      fs::remove_all(tmp, ec);
      throw Error(dir + ": cannot move the old checkpoint aside to '" + old + "': " + msg);
    }
  }
  fs::rename(tmp, dir, ec);
  if (ec) {
    const std::string msg = ec.message();
    if (replacing) fs::rename(old, dir, ec);
    fs::remove_all(tmp, ec);
    throw Error(dir + ": cannot rename '" + tmp + "' into place: " + msg);
  }
  fsutil::fsync_dir(parent);
  if (replacing) fs::remove_all(old, ec);  // the new directory is complete; a leftover is harmless
}

}  // namespace moetune
