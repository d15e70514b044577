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
    // A checkpoint is one flat directory: an entry such as "../run.json" or "/etc/x"
    // would have the check read (and vouch for) a file outside it.
    const std::string& name = it.key();
    if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos)
      throw Error(path.string() + ": entry '" + name + "' is not a file of the checkpoint directory");
    const fs::path f = fs::path(dir) / name;
    const auto& want = it.value();
    if (!want.is_object() || !want.contains("bytes") || !want.contains("sha256"))
      throw Error(path.string() + ": entry '" + name + "' needs bytes and sha256");
    if (!want["bytes"].is_number_unsigned())
      throw Error(path.string() + ": entry '" + name + "': 'bytes' must be a non-negative integer, got " +
                  want["bytes"].dump().substr(0, 80));
    if (!want["sha256"].is_string())
      throw Error(path.string() + ": entry '" + name + "': 'sha256' must be a string, got " +
                  want["sha256"].dump().substr(0, 80));
    std::error_code ec;
    const fs::file_status st = fs::status(f, ec);
    if (!fs::exists(st)) {
      if (ec && ec != std::errc::no_such_file_or_directory)
        throw Error(f.string() + ": listed in the manifest but cannot be read: " + ec.message());
      throw Error(f.string() + ": listed in the manifest but missing");
    }
    if (!fs::is_regular_file(st)) throw Error(f.string() + ": listed in the manifest but not a regular file");
    const uint64_t bytes = want["bytes"].get<uint64_t>();
    const uint64_t size = fs::file_size(f, ec);
    if (ec) throw Error(f.string() + ": cannot get the size: " + ec.message());
    if (size != bytes)
      throw Error(f.string() + ": size " + std::to_string(size) + " differs from the manifest's " +
                  std::to_string(bytes) + " (truncated or rewritten)");
    if (sha256_file(f.string()) != want["sha256"].get<std::string>())
      throw Error(f.string() + ": SHA-256 differs from the manifest (corrupt)");
  }
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file() && e.path().filename() != "manifest.json" &&
        !m["files"].contains(e.path().filename().string()))
      throw Error(e.path().string() + ": not listed in the manifest");
}

}  // namespace moetune
