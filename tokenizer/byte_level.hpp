// The byte level of a GPT-2 style tokenizer: the reversible map between bytes and
// printable code points used to write byte tokens in tokenizer.json, and the
// pre-tokenizer that splits text into words before BPE (Hugging Face's ByteLevel
// pre-tokenizer with use_regex = true, i.e. the GPT-2 pattern
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// implemented by hand). See docs/tokenizer.md.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace moetune::tok {

// GPT-2's bytes_to_unicode: byte b -> a code point. The printable bytes '!'..'~',
// 0xA1..0xAC and 0xAE..0xFF map to themselves; the other 68 bytes, in increasing
// order, map to 256, 257, ... (so ' ' = 0x20 -> U+0120 'Ġ', '\n' -> U+010A 'Ċ').
char32_t byte_to_codepoint(uint8_t b);
// The inverse; -1 for a code point that is not the image of a byte.
int codepoint_to_byte(char32_t cp);

// UTF-8 of the byte-level string of `bytes` (each byte as its code point).
std::string bytes_to_byte_level(std::string_view bytes);
// The bytes of a byte-level string; false (out untouched) when `s` is not valid UTF-8
// or holds a code point that is not the image of a byte.
bool byte_level_to_bytes(std::string_view s, std::string& out);

// Unicode classes of the pattern: \p{L} (general category L*), \p{N} (N*), and \s
// (the White_Space property). Tables from scripts/gen_unicode_tables.py.
bool is_letter(char32_t cp);
bool is_number(char32_t cp);
bool is_space(char32_t cp);

// Decodes the code point starting at s[i]; sets `len` to its length in bytes. Bytes
// that do not start a valid UTF-8 sequence (stray continuation bytes, overlong forms,
// surrogates, truncated sequences, > U+10FFFF) decode as one "code point" of length 1
// with value 0xFFFFFFFF, which is in none of the classes above.
char32_t decode_utf8(std::string_view s, size_t i, size_t& len);
// True if `s` is valid UTF-8 (what decode_utf8 decodes without an invalid unit).
bool valid_utf8(std::string_view s);

// Splits `text` into the words of the GPT-2 pattern, as [begin, end) byte ranges that
// cover the text in order. Any bytes are accepted: an invalid UTF-8 byte counts as a
// character of the class [^\s\p{L}\p{N}]. use_regex = false returns one word (the text).
std::vector<std::pair<uint32_t, uint32_t>> pretokenize(std::string_view text);

}  // namespace moetune::tok
