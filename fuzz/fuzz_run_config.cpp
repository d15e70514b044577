// Fuzzes the run configuration (train/run_config.hpp): RunConfig::from_file on the input
// up to its first NUL byte, then every line after it as a `--set section.key=value`
// override (RunConfig::set), applied to the loaded config (or the defaults when the file
// is rejected), followed by validate() as the CLI does. A config that validates must
// reload from its own to_json().
#include <string>

#include "fuzz/fuzz_util.hpp"
#include "train/run_config.hpp"

using namespace moetune;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto [file, sets] = fuzz::split_at_nul(data, size);
  const std::string path = fuzz::write_file(fuzz::scratch_dir() + "/run.json", file);
  RunConfig c;
  fuzz::parse_or_reject([&] {
    c = RunConfig::from_file(path);
    fuzz::check_round_trip(c, "run config");
  });
  bool any = false;
  fuzz::for_each_line(sets, [&](const std::string& line) {
    any = true;
    fuzz::parse_or_reject([&] { c.set(line); });
  });
  if (any)
    fuzz::parse_or_reject([&] {
      c.validate("--set");
      fuzz::check_round_trip(c, "run config");
    });
  return 0;
}
