// Fuzzes the text-corpus reader (train/text_corpus.hpp for_each_text_document): the
// input as a JSONL {"text": ...} file, and as a text file cut by file, paragraph and line.
#include "fuzz/fuzz_util.hpp"
#include "train/text_corpus.hpp"

using namespace moetune;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string jsonl = fuzz::write_input("corpus.jsonl", data, size);
  const std::string txt = fuzz::write_input("corpus.txt", data, size);
  const auto run = [&](const std::string& path, const TextCorpusOptions& opt) {
    fuzz::parse_or_reject([&] {
      int64_t docs = 0, bytes = 0;
      const TextCorpusStats st = for_each_text_document(path, opt, [&](std::string&& doc, const std::string&) {
        if (doc.empty()) fuzz::invariant_failed("an empty document was passed on");
        ++docs;
        bytes += int64_t(doc.size());
      });
      if (st.documents != docs || st.bytes != bytes) fuzz::invariant_failed("stats do not match the callbacks");
    });
  };
  run(jsonl, TextCorpusOptions{});
  TextCorpusOptions o;
  o.jsonl_key = "content";
  run(jsonl, o);
  for (const char* split : {"file", "paragraph", "line"}) {
    TextCorpusOptions t;
    t.text_split = split;
    run(txt, t);
  }
  return 0;
}
