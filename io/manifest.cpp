#include "io/manifest.hpp"

#include <filesystem>
#include <nlohmann/json.hpp>

#include "io/fsutil.hpp"
#include "io/json_parse.hpp"
#include "io/sha256.hpp"
#include "moe/error.hpp"

namespace moetune {
namespace fs = std::filesystem;
using json = nlohmann::json;

void write_manifest(const std::string& dir) {
  json files = json::object();
  for (const auto& e : fs::directory_iterator(dir)) {
    if (!e.is_regular_file() || e.path().filename() == "manifest.json") continue;
    files[e.path().filename().string()] = {{"bytes", fs::file_size(e.path())},
                                           {"sha256", sha256_file(e.path().string())}};
  }
  fsutil::write_file_atomic((fs::path(dir) / "manifest.json").string(),
                            json{{"format", "moetune-checkpoint-manifest-1"}, {"files", files}}.dump(2) + "\n");
}

void verify_manifest(const std::string& dir) {
  const fs::path path = fs::path(dir) / "manifest.json";
  if (!fs::exists(path)) throw Error(path.string() + ": missing (an incomplete or foreign checkpoint)");
  json m;
  try {
    m = parse_json(fsutil::read_file(path.string()));
  } catch (const JsonError& e) {
    throw Error(path.string() + ": invalid JSON: " + e.what());
  }
  if (!m.is_object() || !m.contains("files") || !m["files"].is_object())
    throw Error(path.string() + ": expected an object with \"files\"");
  for (auto it = m["files"].begin(); it != m["files"].end(); ++it) {
    const fs::path f = fs::path(dir) / it.key();
    if (!fs::exists(f)) throw Error(f.string() + ": listed in the manifest but missing");
    const auto& want = it.value();
    if (!want.contains("bytes") || !want.contains("sha256"))
      throw Error(path.string() + ": entry '" + it.key() + "' needs bytes and sha256");
    if (fs::file_size(f) != want["bytes"].get<uint64_t>())
      throw Error(f.string() + ": size " + std::to_string(fs::file_size(f)) + " differs from the manifest's " +
                  std::to_string(want["bytes"].get<uint64_t>()) + " (truncated or rewritten)");
    if (sha256_file(f.string()) != want["sha256"].get<std::string>())
      throw Error(f.string() + ": SHA-256 differs from the manifest (corrupt)");
  }
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file() && e.path().filename() != "manifest.json" &&
        !m["files"].contains(e.path().filename().string()))
      throw Error(e.path().string() + ": not listed in the manifest");
}

}  // namespace moetune
