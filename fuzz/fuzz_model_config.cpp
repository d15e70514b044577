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

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto [file, sets] = fuzz::split_at_nul(data, size);
  const std::string dir = fuzz::scratch_subdir("ckpt");
  const std::string path = fuzz::write_file(dir + "/config.json", file);
  ModelConfig c;
  fuzz::parse_or_reject([&] {
    c = ModelConfig::from_file(path);
    fuzz::check_round_trip(c, "config");
  });
  fuzz::parse_or_reject([&] { (void)load_checkpoint_config(dir); });
  fuzz::for_each_line(sets, [&](const std::string& line) {
    const size_t eq = line.find('=');
    if (eq == std::string::npos) return;
    fuzz::parse_or_reject([&] {
      c.set(line.substr(0, eq), line.substr(eq + 1));
      fuzz::check_round_trip(c, "config");
    });
  });
  return 0;
}
