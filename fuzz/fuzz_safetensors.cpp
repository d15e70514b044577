// Fuzzes the safetensors reader (io/safetensors.hpp): the input is a whole file; every
// tensor of a header that validates is read as float and as double.
#include <vector>

#include "fuzz/fuzz_util.hpp"
#include "io/safetensors.hpp"

using namespace moetune;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = fuzz::write_input("model.safetensors", data, size);
  fuzz::parse_or_reject([&] {
    SafetensorsReader r(path);
    for (const auto& t : r.tensors()) {
      if (!r.contains(t.name) || &r.at(t.name) != &t) fuzz::invariant_failed("index of tensor '" + t.name + "'");
      // The header was validated against the file size, so numel() elements fit in memory.
      std::vector<float> f(t.numel());
      std::vector<double> d(t.numel());
      fuzz::parse_or_reject([&] { r.read<float>(t.name, f.data(), f.size()); });
      fuzz::parse_or_reject([&] { r.read<double>(t.name, d.data(), d.size()); });
      fuzz::parse_or_reject([&] { r.read<float>(t.name, f.data(), f.size() + 1); });  // wrong count: Error
    }
    for (const auto& [k, v] : r.metadata()) (void)k, (void)v;
    (void)r.at("no such tensor");  // Error
  });
  return 0;
}
