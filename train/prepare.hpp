// moetune data prepare: text / JSONL {"text"} files tokenized once into a binary token
// file (io/token_file.hpp) that training reads by memory map (data.format "bin").
// See docs/data.md.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.hpp"
#include "train/text_corpus.hpp"

namespace moetune {

struct PrepareOptions {
  std::vector<std::string> inputs;  // text or JSONL files, read in this order
  std::string out;                  // token file to write (atomically)
  TextCorpusOptions corpus;         // format, text split, JSONL key
  bool bos = false;                 // start every document with <|bos|>
  std::string eos = "<|eos|>";      // special appended to every document; "" = none
  bool progress = false;            // a line every ~64 MB of text and at the end
};

struct PrepareStats {
  int64_t documents = 0, tokens = 0, bytes = 0, empty = 0;
  double seconds = 0;
};

// Tokenizes every document of the inputs in order (encoded in parallel, written in
// order) and writes the token file, recording the tokenizer's vocabulary size and
// SHA-256. Nothing is written at `out` unless everything succeeds. Throws
// moetune::Error naming the file and line of bad input, or the option at fault
// (an --eos special the tokenizer lacks, inputs without any document).
PrepareStats prepare_token_file(const PrepareOptions& opt, const Tokenizer& tok);

}  // namespace moetune
