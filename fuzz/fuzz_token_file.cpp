// Fuzzes the token-file reader (io/token_file.hpp TokenFile: header, sizes, offsets,
// ids); every document of a file that opens is copied out.
#include <vector>

#include "fuzz/fuzz_util.hpp"
#include "io/token_file.hpp"

using namespace moetune;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = fuzz::write_input("train.bin", data, size);
  (void)TokenFile::looks_like(path);
  fuzz::parse_or_reject([&] {
    const TokenFile f(path);
    uint64_t total = 0;
    std::vector<int32_t> ids;
    for (uint64_t d = 0; d < f.num_docs(); ++d) {
      const uint64_t n = f.doc_length(d);
      total += n;
      if (n == 0 || total > f.num_tokens()) fuzz::invariant_failed("document lengths do not add up");
      ids.resize(n);
      f.copy(d, 0, n, ids.data());
      for (int32_t id : ids)
        if (id < 0 || uint64_t(id) >= f.vocab_size()) fuzz::invariant_failed("id outside the vocabulary");
    }
    if (total != f.num_tokens()) fuzz::invariant_failed("document lengths do not add up to num_tokens");
    (void)sha256_to_hex(f.tokenizer_sha256());
  });
  return 0;
}
