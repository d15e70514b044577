// Byte-level alphabet, Unicode classes and the GPT-2 pre-tokenizer (byte_level.hpp).
#include "tokenizer/byte_level.hpp"

#include <algorithm>
#include <array>

namespace moetune::tok {
namespace {

struct CodeRange {
  char32_t lo, hi;
};
#include "tokenizer/unicode_tables.inc"

template <size_t N>
bool in_ranges(const CodeRange (&r)[N], char32_t cp) {
  // First range whose hi >= cp; cp is in it when lo <= cp.
  const CodeRange* it = std::lower_bound(r, r + N, cp, [](const CodeRange& a, char32_t c) { return a.hi < c; });
  return it != r + N && it->lo <= cp;
}

constexpr char32_t kInvalid = 0xFFFFFFFF;

struct ByteMaps {
  std::array<char32_t, 256> to_cp{};
  std::array<int16_t, 324> to_byte{};  // code points 0..323 cover every image
  ByteMaps() {
    to_byte.fill(-1);
    int next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      to_cp[size_t(b)] = printable ? char32_t(b) : char32_t(next++);
      to_byte[size_t(to_cp[size_t(b)])] = int16_t(b);
    }
  }
};
const ByteMaps& maps() {
  static const ByteMaps m;
  return m;
}

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

enum class Cls { Letter, Number, Space, Other };
Cls classify(char32_t cp) {
  if (cp < 0x80) {  // fast path for ASCII
    if ((cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z')) return Cls::Letter;
    if (cp >= '0' && cp <= '9') return Cls::Number;
    if (cp == ' ' || (cp >= 0x09 && cp <= 0x0D)) return Cls::Space;
    return Cls::Other;
  }
  if (is_space(cp)) return Cls::Space;
  if (is_letter(cp)) return Cls::Letter;
  if (is_number(cp)) return Cls::Number;
  return Cls::Other;
}

}  // namespace

char32_t byte_to_codepoint(uint8_t b) { return maps().to_cp[b]; }

int codepoint_to_byte(char32_t cp) { return cp < 324 ? maps().to_byte[cp] : -1; }

std::string bytes_to_byte_level(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char b : bytes) append_utf8(out, byte_to_codepoint(b));
  return out;
}

bool byte_level_to_bytes(std::string_view s, std::string& out) {
  std::string r;
  r.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    size_t len = 0;
    const char32_t cp = decode_utf8(s, i, len);
    const int b = cp == kInvalid ? -1 : codepoint_to_byte(cp);
    if (b < 0) return false;
    r += char(b);
    i += len;
  }
  out = std::move(r);
  return true;
}

bool is_letter(char32_t cp) { return in_ranges(kLetterRanges, cp); }
bool is_number(char32_t cp) { return in_ranges(kNumberRanges, cp); }
bool is_space(char32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
         cp == 0x3000;
}

char32_t decode_utf8(std::string_view s, size_t i, size_t& len) {
  len = 1;
  const auto u = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = u(i);
  if (c < 0x80) return c;
  int n;
  char32_t cp, min;
  if (c >= 0xC2 && c <= 0xDF) {
    n = 1, cp = c & 0x1F, min = 0x80;
  } else if (c >= 0xE0 && c <= 0xEF) {
    n = 2, cp = c & 0x0F, min = 0x800;
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 3, cp = c & 0x07, min = 0x10000;
  } else {
    return kInvalid;
  }
  for (int k = 1; k <= n; ++k) {
    if (i + size_t(k) >= s.size()) return kInvalid;
    const unsigned char cc = u(i + size_t(k));
    if ((cc & 0xC0) != 0x80) return kInvalid;
    cp = (cp << 6) | (cc & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return kInvalid;
  len = size_t(n) + 1;
  return cp;
}

bool valid_utf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    size_t len = 0;
    if (decode_utf8(s, i, len) == kInvalid) return false;
    i += len;
  }
  return true;
}

std::vector<std::pair<uint32_t, uint32_t>> pretokenize(std::string_view text) {
  // Decode once: code point classes and byte offsets (offs[k] = start of char k).
  std::vector<Cls> cls;
  std::vector<uint32_t> offs;
  cls.reserve(text.size());
  offs.reserve(text.size() + 1);
  for (size_t i = 0; i < text.size();) {
    size_t len = 0;
    const char32_t cp = decode_utf8(text, i, len);
    cls.push_back(cp == kInvalid ? Cls::Other : classify(cp));
    offs.push_back(uint32_t(i));
    i += len;
  }
  const size_t n = cls.size();
  offs.push_back(uint32_t(text.size()));
  const auto byte_at = [&](size_t k) { return text[offs[k]]; };
  const auto run = [&](size_t k, Cls c) {  // end of the run of class c starting at k
    while (k < n && cls[k] == c) ++k;
    return k;
  };

  std::vector<std::pair<uint32_t, uint32_t>> words;
  size_t k = 0;
  while (k < n) {
    size_t end = k;
    // 's|'t|'re|'ve|'m|'ll|'d  (ASCII, case-sensitive)
    if (byte_at(k) == '\'' && k + 1 < n) {
      const char a = byte_at(k + 1);
      const char b = k + 2 < n ? byte_at(k + 2) : '\0';
      if (a == 's' || a == 't' || a == 'm' || a == 'd')
        end = k + 2;
      else if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l'))
        end = k + 3;
    }
    if (end == k) {
      // " ?X+" for X in {L, N, [^\s\p{L}\p{N}]}: an optional literal space, then a run.
      const size_t s = (byte_at(k) == ' ' && k + 1 < n && cls[k + 1] != Cls::Space) ? k + 1 : k;
      if (cls[s] != Cls::Space) {
        end = run(s, cls[s]);
      } else {
        // \s+(?!\S) then \s+: the whitespace run, less its last character when a
        // non-space follows and the run is longer than one.
        const size_t e = run(k, Cls::Space);
        end = (e < n && e - k > 1) ? e - 1 : e;
      }
    }
    words.emplace_back(offs[k], offs[end]);
    k = end;
  }
  return words;
}

}  // namespace moetune::tok
