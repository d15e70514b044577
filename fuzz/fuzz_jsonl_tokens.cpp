// Fuzzes the JSONL token-row reader (train/data.hpp read_jsonl_documents); documents
// that load are fed through a BatchLoader (packing, split of overlong documents).
#include "fuzz/fuzz_util.hpp"
#include "train/data.hpp"

using namespace moetune;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = fuzz::write_input("train.jsonl", data, size);
  fuzz::parse_or_reject([&] {
    std::vector<Document> docs = read_jsonl_documents(path, 512);
    for (const auto& d : docs)
      if (d.input_ids.empty() || d.labels.size() != d.input_ids.size())
        fuzz::invariant_failed("read_jsonl_documents returned an empty or mismatched document");
    DataConfig cfg;
    cfg.seq_len = 8;
    cfg.overlong = "split";
    BatchLoader loader(std::move(docs), cfg, 1);
    (void)loader.next_global_batch(2, 2);
  });
  return 0;
}
