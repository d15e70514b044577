// Strict JSON parsing (io/json_parse.hpp): duplicate keys and deep nesting are refused
// with the path of the offending value; nlohmann's own errors become JsonError too.
#include <gtest/gtest.h>

#include <string>

#include "io/json_parse.hpp"

using namespace moetune;

namespace {
std::string error_of(const std::string& text) {
  try {
    parse_json(text);
  } catch (const JsonError& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST(JsonParse, ParsesLikeNlohmann) {
  const auto j = parse_json(R"({"a": [1, {"b": 2}], "c": {"d": "x"}, "e": [[], {}]})");
  EXPECT_EQ(j["a"][1]["b"], 2);
  EXPECT_EQ(j["c"]["d"], "x");
  // The same key in different objects is fine.
  EXPECT_NO_THROW(parse_json(R"([{"k": 1}, {"k": 2}, {"o": {"k": 3}}])"));
}

TEST(JsonParse, DuplicateKeysAreNamedByTheirPath) {
  EXPECT_EQ(error_of(R"({"steps": 2, "steps": 9})"), "duplicate key 'steps'");
  EXPECT_EQ(error_of(R"({"train": {"steps": 2, "lr": 1, "steps": 9}})"), "duplicate key 'train.steps'");
  EXPECT_EQ(error_of(R"({"m": [{"role": "a"}, {"role": "b", "role": "c"}]})"), "duplicate key 'm[1].role'");
  EXPECT_EQ(error_of(R"({"a": [1, 2, [3], {"x": 1, "x": 2}]})"), "duplicate key 'a[3].x'");
}

TEST(JsonParse, DeepNestingIsRefused) {
  const int n = kMaxJsonDepth;
  EXPECT_NO_THROW(parse_json(std::string(size_t(n), '[') + std::string(size_t(n), ']')));
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  EXPECT_NE(error_of(deep).find("nested deeper than " + std::to_string(n) + " levels"), std::string::npos);
  EXPECT_NE(error_of(R"({"a": )" + deep + "}").find("(at 'a[0][0]"), std::string::npos);
}

TEST(JsonParse, NlohmannErrorsBecomeJsonError) {
  EXPECT_NE(error_of(R"({"a": )").find("parse error"), std::string::npos);
  EXPECT_NE(error_of(R"({"lr": 1e999})").find("number overflow"), std::string::npos);
  EXPECT_NE(error_of("{\"a\": \"\xff\"}").find("UTF-8"), std::string::npos);
  EXPECT_NE(error_of("").find("parse error"), std::string::npos);
}
