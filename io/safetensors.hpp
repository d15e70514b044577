// The safetensors file format (https://github.com/huggingface/safetensors), read and
// written without any library: an 8-byte little-endian u64 N, N bytes of UTF-8 JSON
//   {"<name>": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {"<key>": "<string>"}}   (metadata optional)
// padded with spaces, then the byte buffer; offsets are relative to the buffer start
// and the tensors tile the buffer exactly (no overlap, no hole, no trailing bytes).
// Tensors are row-major and little-endian. moetune writes F32 (and I32, or I64 for the
// Hugging Face form of moetune convert, for integer tables such as tid2eid); it reads
// F32, F64, BF16 and F16 into float or double, and I32 or I64 (range-checked) into int32_t.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

namespace moetune {

struct SafeTensorInfo {
  std::string name, dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte offsets into the data buffer, [begin, end)
  uint64_t numel() const;
};

// "(16, 32)"; "()" for a scalar.
std::string format_shape(const std::vector<int64_t>& shape);
// Bytes per element of a safetensors dtype name ("F32" -> 4), 0 if unknown.
size_t safetensors_dtype_size(const std::string& dtype);

class SafetensorsReader {  // reads the header eagerly, data on demand
 public:
  // Opens the file and validates the header fully (lengths, JSON, every entry, the
  // tiling of the data buffer). Throws moetune::Error naming the path.
  explicit SafetensorsReader(const std::string& path);
  ~SafetensorsReader();
  SafetensorsReader(SafetensorsReader&& o) noexcept;
  SafetensorsReader& operator=(SafetensorsReader&& o) noexcept;
  SafetensorsReader(const SafetensorsReader&) = delete;
  SafetensorsReader& operator=(const SafetensorsReader&) = delete;

  const std::string& path() const { return path_; }
  // In data order (= the order they were written).
  const std::vector<SafeTensorInfo>& tensors() const { return tensors_; }
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  // Error "<path>: no tensor '<name>'" if absent.
  const SafeTensorInfo& at(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // Reads tensor `name` into out[0..n), converting F32/F64/BF16/F16 to T (float or
  // double); T = int32_t reads an I32 or I64 tensor (every I64 value must fit in int32)
  // and nothing else. Its element count must be
  // n, else Error naming file, tensor and shape. Thread-safe (pread on a shared descriptor).
  template <class T>
  void read(const std::string& name, T* out, size_t n) const;

 private:
  void read_bytes(const SafeTensorInfo& t, uint64_t at, void* out, size_t size) const;
  std::string path_;
  int fd_ = -1;
  uint64_t data_start_ = 0;  // 8 + N
  std::vector<SafeTensorInfo> tensors_;
  std::unordered_map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

template <>
void SafetensorsReader::read<int32_t>(const std::string& name, int32_t* out, size_t n) const;

// One tensor to write: exactly one of `data` (float), `data_f64` (double, rounded to
// float in chunks), both written as F32, `data_i32` (written as I32) and `data_i64`
// (written as I64) points at numel(shape) row-major elements.
struct TensorToWrite {
  std::string name;
  std::vector<int64_t> shape;
  const float* data = nullptr;
  const double* data_f64 = nullptr;
  const int32_t* data_i32 = nullptr;
  const int64_t* data_i64 = nullptr;
  size_t element_bytes() const { return data_i64 ? 8 : 4; }
};

// A TensorToWrite over float or double data (written as F32 either way), int32_t data
// (written as I32) or int64_t data (written as I64).
template <class T>
TensorToWrite to_write(std::string name, std::vector<int64_t> shape, const T* data) {
  TensorToWrite w;
  w.name = std::move(name);
  w.shape = std::move(shape);
  if constexpr (std::is_same_v<T, float>)
    w.data = data;
  else if constexpr (std::is_same_v<T, int32_t>)
    w.data_i32 = data;
  else if constexpr (std::is_same_v<T, int64_t>)
    w.data_i64 = data;
  else
    w.data_f64 = data;
  return w;
}

// Writes the tensors (F32, or I32 / I64 for data_i32 / data_i64), packed contiguously in the given order, header padded
// with spaces to a multiple of 8 bytes. Goes through "<path>.tmp" + fsync + rename,
// so a failure never leaves a half file under <path>. Errors (duplicate or reserved
// names, negative dims, unwritable directory, disk full) throw Error naming the path.
void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace moetune
