// Reader and writer of the safetensors format (see safetensors.hpp). The header is
// validated completely when a file is opened, so a later read() can only fail on I/O.
#include "io/safetensors.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <type_traits>
#include <unordered_set>

#include "io/fsutil.hpp"
#include "io/json_parse.hpp"
#include "moe/error.hpp"

namespace moetune {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; this build assumes a little-endian host");

namespace {

using json = nlohmann::json;

constexpr uint64_t kMaxHeaderBytes = 100'000'000;  // a header larger than this is corrupt
constexpr size_t kChunk = 1 << 16;                 // elements per conversion chunk

float bf16_to_float(uint16_t h) { return std::bit_cast<float>(uint32_t(h) << 16); }

float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) return std::bit_cast<float>(sign);
    // Subnormal: mant * 2^-24, exact in float.
    const float v = float(mant) * (1.0f / 16777216.0f);
    return sign ? -v : v;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / nan
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  return std::bit_cast<float>(bits);
}

bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out) { return __builtin_mul_overflow(a, b, out); }

}  // namespace

uint64_t SafeTensorInfo::numel() const {
  uint64_t n = 1;
  for (auto s : shape) n *= static_cast<uint64_t>(s);
  return n;
}

std::string format_shape(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + ")";
}

size_t safetensors_dtype_size(const std::string& d) {
  static const std::map<std::string, size_t> sizes = {
      {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8}, {"I32", 4},     {"I16", 2},     {"I8", 1},
      {"U64", 8}, {"U32", 4}, {"U16", 2}, {"U8", 1},   {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1}};
  auto it = sizes.find(d);
  return it == sizes.end() ? 0 : it->second;
}

// ---------------------------------------------------------------------------------
// Reader

SafetensorsReader::SafetensorsReader(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) throw Error(fsutil::errno_message(path, "cannot open safetensors file", errno));
  try {
    struct stat st {};
    if (::fstat(fd_, &st) != 0) throw Error(fsutil::errno_message(path, "cannot stat", errno));
    if (!S_ISREG(st.st_mode)) throw Error(path + ": not a regular file");
    const uint64_t file_size = static_cast<uint64_t>(st.st_size);
    const auto fail = [&](const std::string& msg) { throw Error(path + ": " + msg); };
    if (file_size < 8)
      fail("not a safetensors file: " + std::to_string(file_size) + " bytes, shorter than the 8-byte header length");

    unsigned char len_bytes[8];
    if (::pread(fd_, len_bytes, 8, 0) != 8) fail("cannot read the header length");
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | len_bytes[i];
    if (n > kMaxHeaderBytes)
      fail("header length " + std::to_string(n) + " is absurd (more than " + std::to_string(kMaxHeaderBytes) +
           " bytes): not a safetensors file or corrupt");
    if (8 + n > file_size)
      fail("header length " + std::to_string(n) + " runs past the end of the file (" + std::to_string(file_size) +
           " bytes): truncated or corrupt");
    std::string header(n, '\0');
    size_t got = 0;
    while (got < n) {
      const ssize_t r = ::pread(fd_, header.data() + got, n - got, static_cast<off_t>(8 + got));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) fail("cannot read the header");
      got += static_cast<size_t>(r);
    }
    data_start_ = 8 + n;
    const uint64_t buffer_size = file_size - data_start_;

    json j;
    try {
      j = parse_json(header);
    } catch (const JsonError& e) {
      fail(std::string("header is not valid JSON: ") + e.what());
    }
    if (!j.is_object()) fail("header is not a JSON object");

    for (auto it = j.begin(); it != j.end(); ++it) {
      const std::string& name = it.key();
      const json& v = it.value();
      if (name == "__metadata__") {
        if (!v.is_object()) fail("__metadata__ is not a JSON object");
        for (auto m = v.begin(); m != v.end(); ++m) {
          if (!m.value().is_string()) fail("__metadata__ value of '" + m.key() + "' is not a string");
          metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      const auto bad = [&](const std::string& msg) { fail("tensor '" + name + "': " + msg); };
      if (!v.is_object()) bad("header entry is not a JSON object");
      SafeTensorInfo t;
      t.name = name;
      if (!v.contains("dtype") || !v["dtype"].is_string()) bad("missing or non-string 'dtype'");
      t.dtype = v["dtype"].get<std::string>();
      const size_t esize = safetensors_dtype_size(t.dtype);
      if (esize == 0) bad("unknown dtype '" + t.dtype + "'");
      if (!v.contains("shape") || !v["shape"].is_array()) bad("missing or non-array 'shape'");
      uint64_t numel = 1;
      for (const auto& s : v["shape"]) {
        if (!s.is_number_unsigned() || s.get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max()))
          bad("'shape' entries must be non-negative integers, got " + v["shape"].dump());
        t.shape.push_back(s.get<int64_t>());
        if (mul_overflows(numel, s.get<uint64_t>(), &numel)) bad("shape " + v["shape"].dump() + " overflows");
      }
      const json* off = v.contains("data_offsets") ? &v["data_offsets"] : nullptr;
      if (!off || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
          !(*off)[1].is_number_unsigned())
        bad("'data_offsets' must be an array of two non-negative integers");
      t.begin = (*off)[0].get<uint64_t>();
      t.end = (*off)[1].get<uint64_t>();
      if (t.end < t.begin)
        bad("data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) + "] end before begin");
      uint64_t nbytes = 0;
      if (mul_overflows(numel, esize, &nbytes) || t.end - t.begin != nbytes)
        bad("data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) + "] hold " +
            std::to_string(t.end - t.begin) + " bytes but " + t.dtype + " " + format_shape(t.shape) + " needs " +
            std::to_string(numel * esize) + " (" + std::to_string(numel) + " elements x " + std::to_string(esize) +
            " bytes)");
      if (t.end > buffer_size)
        bad("data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
            "] lie outside the data buffer of " + std::to_string(buffer_size) + " bytes (file truncated?)");
      tensors_.push_back(std::move(t));
    }

    // The tensors must tile the buffer exactly, in data order.
    std::sort(tensors_.begin(), tensors_.end(), [](const SafeTensorInfo& a, const SafeTensorInfo& b) {
      return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    uint64_t expect = 0;
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const auto& t = tensors_[i];
      if (t.begin < expect)
        fail("tensor '" + t.name + "' overlaps tensor '" + tensors_[i - 1].name + "' (data_offsets [" +
             std::to_string(t.begin) + ", " + std::to_string(t.end) + "])");
      if (t.begin > expect)
        fail("hole in the data buffer: bytes [" + std::to_string(expect) + ", " + std::to_string(t.begin) +
             ") before tensor '" + t.name + "' belong to no tensor");
      expect = t.end;
    }
    if (expect != buffer_size)
      fail("data buffer has " + std::to_string(buffer_size) + " bytes but the tensors cover " +
           std::to_string(expect) + " (trailing garbage)");
    for (size_t i = 0; i < tensors_.size(); ++i) index_[tensors_[i].name] = i;
  } catch (...) {
    ::close(fd_);
    fd_ = -1;
    throw;
  }
}

SafetensorsReader::~SafetensorsReader() {
  if (fd_ >= 0) ::close(fd_);
}

SafetensorsReader::SafetensorsReader(SafetensorsReader&& o) noexcept
    : path_(std::move(o.path_)),
      fd_(o.fd_),
      data_start_(o.data_start_),
      tensors_(std::move(o.tensors_)),
      index_(std::move(o.index_)),
      metadata_(std::move(o.metadata_)) {
  o.fd_ = -1;
}

SafetensorsReader& SafetensorsReader::operator=(SafetensorsReader&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    path_ = std::move(o.path_);
    fd_ = o.fd_;
    o.fd_ = -1;
    data_start_ = o.data_start_;
    tensors_ = std::move(o.tensors_);
    index_ = std::move(o.index_);
    metadata_ = std::move(o.metadata_);
  }
  return *this;
}

const SafeTensorInfo& SafetensorsReader::at(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) throw Error(path_ + ": no tensor '" + name + "'");
  return tensors_[it->second];
}

void SafetensorsReader::read_bytes(const SafeTensorInfo& t, uint64_t at, void* out, size_t size) const {
  char* p = static_cast<char*>(out);
  uint64_t pos = data_start_ + at;
  while (size > 0) {
    const ssize_t r = ::pread(fd_, p, size, static_cast<off_t>(pos));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) throw Error(fsutil::errno_message(path_, "reading tensor '" + t.name + "'", errno));
    if (r == 0) throw Error(path_ + ": tensor '" + t.name + "': unexpected end of file (truncated while open?)");
    p += r;
    pos += static_cast<uint64_t>(r);
    size -= static_cast<size_t>(r);
  }
}

template <class T>
void SafetensorsReader::read(const std::string& name, T* out, size_t n) const {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
  const SafeTensorInfo& t = at(name);
  if (t.numel() != n)
    throw Error(path_ + ": tensor '" + name + "' has shape " + format_shape(t.shape) + " = " +
                std::to_string(t.numel()) + " elements, expected " + std::to_string(n));
  const bool same = (std::is_same_v<T, float> && t.dtype == "F32") || (std::is_same_v<T, double> && t.dtype == "F64");
  if (same) {
    read_bytes(t, t.begin, out, n * sizeof(T));
    return;
  }
  const size_t esize = safetensors_dtype_size(t.dtype);
  if (t.dtype != "F32" && t.dtype != "F64" && t.dtype != "BF16" && t.dtype != "F16")
    throw Error(path_ + ": tensor '" + name + "' has dtype " + t.dtype +
                "; only F32, F64, BF16 and F16 can be read as floating point");
  std::vector<unsigned char> buf(kChunk * esize);
  for (size_t i0 = 0; i0 < n; i0 += kChunk) {
    const size_t m = std::min(kChunk, n - i0);
    read_bytes(t, t.begin + i0 * esize, buf.data(), m * esize);
    const unsigned char* b = buf.data();
    T* o = out + i0;
    if (t.dtype == "F32") {
      for (size_t i = 0; i < m; ++i) { float v; std::memcpy(&v, b + 4 * i, 4); o[i] = static_cast<T>(v); }
    } else if (t.dtype == "F64") {
      for (size_t i = 0; i < m; ++i) { double v; std::memcpy(&v, b + 8 * i, 8); o[i] = static_cast<T>(v); }
    } else {
      const bool bf = t.dtype == "BF16";
      for (size_t i = 0; i < m; ++i) {
        uint16_t h;
        std::memcpy(&h, b + 2 * i, 2);
        o[i] = static_cast<T>(bf ? bf16_to_float(h) : f16_to_float(h));
      }
    }
  }
}

// Integer tables are read exactly as stored: no conversion from any other dtype.
template <>
void SafetensorsReader::read<int32_t>(const std::string& name, int32_t* out, size_t n) const {
  const SafeTensorInfo& t = at(name);
  if (t.numel() != n)
    throw Error(path_ + ": tensor '" + name + "' has shape " + format_shape(t.shape) + " = " +
                std::to_string(t.numel()) + " elements, expected " + std::to_string(n));
  if (t.dtype == "I32") {
    read_bytes(t, t.begin, out, n * sizeof(int32_t));
    return;
  }
  if (t.dtype != "I64")
    throw Error(path_ + ": tensor '" + name + "' has dtype " + t.dtype + "; an integer table must be I32 or I64");
  std::vector<int64_t> wide(std::min(kChunk, n));
  for (size_t i0 = 0; i0 < n; i0 += kChunk) {
    const size_t m = std::min(kChunk, n - i0);
    read_bytes(t, t.begin + i0 * sizeof(int64_t), wide.data(), m * sizeof(int64_t));
    for (size_t i = 0; i < m; ++i) {
      if (wide[i] < INT32_MIN || wide[i] > INT32_MAX)
        throw Error(path_ + ": tensor '" + name + "' holds " + std::to_string(wide[i]) + " at element " +
                    std::to_string(i0 + i) + ", outside the int32 range");
      out[i0 + i] = int32_t(wide[i]);
    }
  }
}

template void SafetensorsReader::read<float>(const std::string&, float*, size_t) const;
template void SafetensorsReader::read<double>(const std::string&, double*, size_t) const;

// ---------------------------------------------------------------------------------
// Writer

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  // Header first: validates every entry before a byte is written.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    header["__metadata__"] = std::move(m);
  }
  std::unordered_set<std::string> seen;
  std::vector<uint64_t> numels;
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    const auto bad = [&](const std::string& msg) { throw Error(path + ": tensor '" + t.name + "': " + msg); };
    if (t.name.empty() || t.name == "__metadata__") bad("reserved or empty tensor name");
    if (!seen.insert(t.name).second) bad("written twice");
    uint64_t numel = 1;
    for (auto s : t.shape) {
      if (s < 0) bad("negative dimension in shape " + format_shape(t.shape));
      if (mul_overflows(numel, uint64_t(s), &numel)) bad("shape " + format_shape(t.shape) + " overflows");
    }
    if (int(t.data != nullptr) + int(t.data_f64 != nullptr) + int(t.data_i32 != nullptr) +
                int(t.data_i64 != nullptr) !=
            1 &&
        numel > 0)
      bad("exactly one of data (float), data_f64 (double), data_i32 (int32) and data_i64 (int64) must be set");
    numels.push_back(numel);
    const uint64_t bytes = t.element_bytes() * numel;
    header[t.name] = {{"dtype", t.data_i64 ? "I64" : t.data_i32 ? "I32" : "F32"},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');
  unsigned char len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(uint64_t(h.size()) >> (8 * i));

  fsutil::AtomicFile f(path);
  f.write(len, 8);
  f.write(h);
  std::vector<float> buf;
  for (size_t k = 0; k < tensors.size(); ++k) {
    const auto& t = tensors[k];
    const size_t n = numels[k];
    if (n == 0) continue;
    if (t.data) {
      f.write(t.data, n * sizeof(float));
      continue;
    }
    if (t.data_i32) {
      f.write(t.data_i32, n * sizeof(int32_t));
      continue;
    }
    if (t.data_i64) {
      f.write(t.data_i64, n * sizeof(int64_t));
      continue;
    }
    buf.resize(std::min(kChunk, n));
    for (size_t i0 = 0; i0 < n; i0 += kChunk) {
      const size_t m = std::min(kChunk, n - i0);
      for (size_t i = 0; i < m; ++i) buf[i] = static_cast<float>(t.data_f64[i0 + i]);
      f.write(buf.data(), m * sizeof(float));
    }
  }
  f.commit();
}

}  // namespace moetune
