// Strict JSON parsing for every JSON file moetune reads (configs, checkpoint files,
// safetensors headers, tokenizer.json, JSONL lines): nlohmann::json::parse, plus
//   - a key given twice in one object is an error (nlohmann would silently keep the
//     last value, so {"steps": 2, "steps": 9} would train 9 steps without a word);
//   - nesting deeper than kMaxJsonDepth is an error (no file of moetune nests more than
//     a few levels; a hostile one must not reach the recursive dump()/copy code).
// Every failure, including nlohmann's (syntax, invalid UTF-8, number overflow), is a
// JsonError whose message has no location: the caller prefixes "<path>[:<line>]: invalid JSON: ".
#pragma once
#include <nlohmann/json.hpp>
#include <string>

#include "moe/error.hpp"

namespace moetune {

constexpr int kMaxJsonDepth = 128;

struct JsonError : Error {
  explicit JsonError(const std::string& what) : Error(what) {}
};

// Parses `text` as one JSON value; throws JsonError (see above).
nlohmann::json parse_json(const std::string& text);

}  // namespace moetune
