// Text and JSONL {"text"} corpora: document splitting, and errors naming file:line.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "moe/error.hpp"
#include "train/text_corpus.hpp"

using namespace moetune;
namespace fs = std::filesystem;

namespace {

std::string write(const std::string& name, const std::string& bytes) {
  const fs::path p = fs::temp_directory_path() / ("moetune_corpus_" + std::to_string(::getpid()) + "_" + name);
  std::ofstream(p, std::ios::binary) << bytes;
  return p.string();
}

std::vector<std::pair<std::string, std::string>> docs(const std::string& path, TextCorpusOptions opt,
                                                      TextCorpusStats* st = nullptr) {
  std::vector<std::pair<std::string, std::string>> out;
  const auto s = for_each_text_document(path, opt, [&](std::string&& d, const std::string& where) {
    out.emplace_back(std::move(d), where);
  });
  if (st) *st = s;
  return out;
}

std::string error_of(const std::string& path, TextCorpusOptions opt = {}) {
  try {
    docs(path, opt);
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST(TextCorpus, TextFilesSplitByFileParagraphOrLine) {
  const std::string p = write("a.txt", "one\ntwo\n\n\nthree\r\n  \nfour");
  using V = std::vector<std::pair<std::string, std::string>>;
  TextCorpusOptions o;
  EXPECT_EQ(docs(p, o), (V{{"one\ntwo\n\n\nthree\r\n  \nfour", p}}));
  o.text_split = "paragraph";
  TextCorpusStats st;
  EXPECT_EQ(docs(p, o, &st), (V{{"one\ntwo", p + ":1"}, {"three\r", p + ":5"}, {"four", p + ":7"}}));
  EXPECT_EQ(st.documents, 3);
  EXPECT_EQ(st.bytes, 7 + 6 + 4);
  o.text_split = "line";
  EXPECT_EQ(docs(p, o, &st), (V{{"one", p + ":1"}, {"two", p + ":2"}, {"three", p + ":5"}, {"  ", p + ":6"},
                                {"four", p + ":7"}}));
  EXPECT_EQ(st.empty, 2);
  o.text_split = "sentence";
  EXPECT_NE(error_of(p, o).find("--text-split"), std::string::npos);
  fs::remove(p);
}

TEST(TextCorpus, JsonlTextField) {
  const std::string p = write("b.jsonl", "{\"text\": \"hello\\nworld\", \"id\": 3}\n\n{\"text\": \"\"}\n{\"text\": \"x\"}\n");
  TextCorpusStats st;
  using V = std::vector<std::pair<std::string, std::string>>;
  EXPECT_EQ(docs(p, {}, &st), (V{{"hello\nworld", p + ":1"}, {"x", p + ":4"}}));
  EXPECT_EQ(st.empty, 1);
  TextCorpusOptions o;
  o.format = "text";  // forced: the lines are text
  EXPECT_EQ(docs(p, o).size(), 1u);
  fs::remove(p);
}

TEST(TextCorpus, BadInputNamesFileAndLine) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{\"text\": \"a\"}\n{\"text\": 5}\n", ":2: 'text' must be a string"},
      {"{\"text\": \"a\"}\n[1]\n", ":2: expected a JSON object"},
      {"{\"txt\": \"a\"}\n", ":1: missing key 'text'"},
      {"{\"text\": \"a\"\n", ":1: invalid JSON"},
      {"{\"text\": \"a\"}\n{\"text\": \"\xff\"}\n", ":2: not valid UTF-8"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string p = write("bad" + std::to_string(i) + ".jsonl", cases[i].first);
    const std::string e = error_of(p);
    EXPECT_NE(e.find(p + cases[i].second), std::string::npos) << e;
    fs::remove(p);
  }
  const std::string t = write("bad.txt", "fine\nbad \xc3\x28 byte\n");
  EXPECT_NE(error_of(t).find(t + ":2: not valid UTF-8"), std::string::npos) << error_of(t);
  fs::remove(t);
  EXPECT_NE(error_of("/nonexistent/x.txt").find("/nonexistent/x.txt: cannot open"), std::string::npos);
}
