// Fuzzes the run configuration (train/run_config.hpp): RunConfig::from_file on the input
// up to its first NUL byte, then every line after it as a `--set section.key=value`
// override (RunConfig::set), applied to the loaded config (or the defaults when the file
// is rejected), followed by validate() as the CLI does. A config that validates must
// reload from its own to_json().
#include <string>

#include "fuzz/fuzz_util.hpp"
#include "train/run_config.hpp"

using namespace moetune;

namespace {

void check_round_trip(const RunConfig& c) {
  const nlohmann::json j = c.to_json();
  RunConfig back;
  try {
    back = RunConfig::from_json(j, "round trip");
  } catch (const Error& e) {
    fuzz::invariant_failed(std::string("a valid run config does not reload from its own to_json(): ") + e.what());
  }
  if (back.to_json() != j) fuzz::invariant_failed("to_json() -> from_json() changed the run config: " + j.dump());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto [file, sets] = fuzz::split_at_nul(data, size);
  const std::string path = fuzz::write_file(fuzz::scratch_dir() + "/run.json", file);
  RunConfig c;
  fuzz::parse_or_reject([&] {
    c = RunConfig::from_file(path);
    check_round_trip(c);
  });
  bool any = false;
  size_t at = 0;
  while (at < sets.size()) {
    size_t end = sets.find('\n', at);
    if (end == std::string_view::npos) end = sets.size();
    const std::string line(sets.substr(at, end - at));
    at = end + 1;
    any = true;
    fuzz::parse_or_reject([&] { c.set(line); });
  }
  if (any)
    fuzz::parse_or_reject([&] {
      c.validate("--set");
      check_round_trip(c);
    });
  return 0;
}
