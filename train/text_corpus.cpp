// Text and JSONL {"text"} corpora (text_corpus.hpp).
#include "train/text_corpus.hpp"

#include <fstream>
#include <nlohmann/json.hpp>

#include "moe/error.hpp"
#include "tokenizer/byte_level.hpp"

namespace moetune {
namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool blank(const std::string& s) {
  for (char c : s)
    if (c != ' ' && c != '\t' && c != '\r') return false;
  return true;
}

}  // namespace

TextCorpusStats for_each_text_document(const std::string& path, const TextCorpusOptions& opt,
                                       const std::function<void(std::string&&, const std::string&)>& fn) {
  if (opt.format != "auto" && opt.format != "text" && opt.format != "jsonl")
    throw Error("--format must be auto, text or jsonl, got '" + opt.format + "'");
  if (opt.text_split != "file" && opt.text_split != "paragraph" && opt.text_split != "line")
    throw Error("--text-split must be file, paragraph or line, got '" + opt.text_split + "'");
  const bool jsonl = opt.format == "jsonl" || (opt.format == "auto" && (ends_with(path, ".jsonl") || ends_with(path, ".json")));
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open file");
  TextCorpusStats st;
  const auto emit = [&](std::string&& doc, const std::string& where) {
    if (doc.empty()) {
      ++st.empty;
      return;
    }
    ++st.documents;
    st.bytes += int64_t(doc.size());
    fn(std::move(doc), where);
  };
  std::string line, doc;
  int64_t lineno = 0, doc_line = 0;
  const auto at = [&](int64_t l) { return path + ":" + std::to_string(l); };
  while (std::getline(in, line)) {
    ++lineno;
    if (!tok::valid_utf8(line)) throw Error(at(lineno) + ": not valid UTF-8");
    if (jsonl) {
      if (blank(line)) continue;
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception& e) {
        throw Error(at(lineno) + ": invalid JSON: " + e.what());
      }
      if (!j.is_object()) throw Error(at(lineno) + ": expected a JSON object {\"" + opt.jsonl_key + "\": \"...\"}");
      auto it = j.find(opt.jsonl_key);
      if (it == j.end()) throw Error(at(lineno) + ": missing key '" + opt.jsonl_key + "'");
      if (!it->is_string())
        throw Error(at(lineno) + ": '" + opt.jsonl_key + "' must be a string, got " + it->dump().substr(0, 60));
      emit(it->get<std::string>(), at(lineno));
      continue;
    }
    if (opt.text_split == "line") {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      emit(std::move(line), at(lineno));
      line.clear();
      continue;
    }
    if (opt.text_split == "paragraph" && blank(line)) {
      if (!doc.empty() && doc.back() == '\n') doc.pop_back();  // the break before the blank line
      emit(std::move(doc), at(doc_line));
      doc.clear();
      continue;
    }
    if (doc.empty()) doc_line = lineno;
    doc += line;
    if (!in.eof()) doc += '\n';  // the file's own line breaks, except a missing final one
  }
  if (in.bad()) throw Error(path + ": read error");
  if (!jsonl && opt.text_split != "line") emit(std::move(doc), opt.text_split == "file" ? path : at(doc_line));
  return st;
}

}  // namespace moetune
