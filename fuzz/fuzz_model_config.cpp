// Fuzzes the model config.json loaders (moe/config.hpp ModelConfig::from_file, and
// io/checkpoint.hpp load_checkpoint_config for a checkpoint's config.json). The input up
// to its first NUL byte is the file; each line after it is a "key=value" override given
// to ModelConfig::set (as `moetune init --set` does). A config that loads must survive
// to_json() -> from_json() unchanged: that is how checkpoints store it.
#include <string>

#include "fuzz/fuzz_util.hpp"
#include "io/checkpoint.hpp"
#include "moe/config.hpp"

using namespace moetune;

namespace {

void check_round_trip(const ModelConfig& c) {
  const nlohmann::json j = c.to_json();
  ModelConfig back;
  try {
    back = ModelConfig::from_json(j, "round trip");
  } catch (const Error& e) {
    fuzz::invariant_failed(std::string("a valid config does not reload from its own to_json(): ") + e.what());
  }
  if (back.to_json() != j) fuzz::invariant_failed("to_json() -> from_json() changed the config: " + j.dump());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto [file, sets] = fuzz::split_at_nul(data, size);
  const std::string dir = fuzz::scratch_subdir("ckpt");
  const std::string path = fuzz::write_file(dir + "/config.json", file);
  ModelConfig c;
  fuzz::parse_or_reject([&] {
    c = ModelConfig::from_file(path);
    check_round_trip(c);
  });
  fuzz::parse_or_reject([&] { (void)load_checkpoint_config(dir); });
  size_t at = 0;
  while (at < sets.size()) {
    size_t end = sets.find('\n', at);
    if (end == std::string_view::npos) end = sets.size();
    const std::string line(sets.substr(at, end - at));
    at = end + 1;
    const size_t eq = line.find('=');
    if (eq == std::string::npos) continue;
    fuzz::parse_or_reject([&] {
      c.set(line.substr(0, eq), line.substr(eq + 1));
      check_round_trip(c);
    });
  }
  return 0;
}
