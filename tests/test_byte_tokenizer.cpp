// The byte tokenizer: exact round trip of arbitrary bytes, and special tokens are
// never produced from plain text.
#include <gtest/gtest.h>

#include <random>

#include "moe/error.hpp"
#include "train/byte_tokenizer.hpp"

using namespace moetune;

TEST(ByteTokenizer, RoundTripOfArbitraryBytesAndUtf8) {
  ByteTokenizer tok;
  std::mt19937 g(3);
  for (int n = 0; n < 50; ++n) {
    std::string s(size_t(g() % 64), '\0');
    for (auto& c : s) c = char(g() % 256);  // includes NUL and invalid UTF-8
    EXPECT_EQ(tok.decode(tok.encode(s)), s);
  }
  const std::string utf8 = "gr\xc3\xbc\xc3\x9f dich, \xe4\xb8\x96\xe7\x95\x8c \xf0\x9f\x99\x82";
  EXPECT_EQ(tok.encode(utf8).size(), utf8.size());
  EXPECT_EQ(tok.decode(tok.encode(utf8)), utf8);
}

TEST(ByteTokenizer, SpecialTokensOnlyFromTheApi) {
  ByteTokenizer tok;
  for (const char* name : ByteTokenizer::kSpecials) {
    const int32_t id = tok.special_id(name);
    EXPECT_GE(id, 256);
    EXPECT_LT(id, ByteTokenizer::kVocabSize);
    for (int32_t t : tok.encode(std::string("text ") + name + " text")) EXPECT_LT(t, 256);
    EXPECT_EQ(tok.decode({id}), name);
  }
  EXPECT_THROW(tok.special_id("<|tool|>"), Error);
  EXPECT_THROW(tok.decode({263}), Error);
}
