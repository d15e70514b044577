// Fuzzes the checkpoint manifest check (io/manifest.hpp verify_manifest): the input is
// manifest.json of a directory that also holds two small files (config.json and
// model.safetensors, fixed contents).
#include "fuzz/fuzz_util.hpp"
#include "io/manifest.hpp"

using namespace moetune;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string dir = [] {
    const std::string d = fuzz::scratch_subdir("ckpt");
    fuzz::write_file(d + "/config.json", "{\"vocab_size\": 64}\n");
    fuzz::write_file(d + "/model.safetensors", "0123456789abcdef");
    return d;
  }();
  fuzz::write_input("ckpt/manifest.json", data, size);
  fuzz::parse_or_reject([&] { verify_manifest(dir); });
  return 0;
}
