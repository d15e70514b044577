// Plain-text corpora: the documents of text files and of JSONL {"text": ...} files,
// for tokenizer training (moetune tokenizer train) and continued pre-training data
// (moetune data prepare). See docs/data.md.
#pragma once
#include <cstdint>
#include <functional>
#include <string>

namespace moetune {

struct TextCorpusOptions {
  // "auto": *.jsonl / *.json are JSONL, anything else is text. "text" | "jsonl" force it.
  std::string format = "auto";
  // How a text file is cut into documents: "file" (the whole file is one document),
  // "paragraph" (blocks separated by one or more blank lines), "line" (every line).
  // Line breaks inside a document are kept; separators are not part of any document.
  std::string text_split = "file";
  std::string jsonl_key = "text";  // the JSONL field holding a document
};

struct TextCorpusStats {
  int64_t documents = 0;  // documents passed to the callback
  int64_t empty = 0;      // empty documents skipped (blank paragraphs/lines, "text": "")
  int64_t bytes = 0;      // bytes of the documents passed on
};

// Calls fn(document, where) for every non-empty document of `path`, in file order.
// `where` is "<path>:<line>" of the document's first line ("<path>" for a whole file).
// Errors are moetune::Error naming "<path>:<line>": a file that cannot be read, text
// that is not valid UTF-8, a JSONL line that is not valid JSON, not an object, lacks the
// key or has a non-string value. Bad options name the option.
TextCorpusStats for_each_text_document(const std::string& path, const TextCorpusOptions& opt,
                                       const std::function<void(std::string&& doc, const std::string& where)>& fn);

}  // namespace moetune
