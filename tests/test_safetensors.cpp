// safetensors reader/writer: round trips, the exact bytes on disk, other dtypes,
// and every kind of corrupt file giving an Error that names the file.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <random>

#include "io/safetensors.hpp"
#include "moe/error.hpp"
#include "test_util.hpp"

using namespace moetune;
using namespace moetune::testing;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::random_device rd;
    dir_ = fs::temp_directory_path() /
           ("moetune_test_st_" + std::to_string(::getpid()) + "_" + std::to_string(rd()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string file(const std::string& name) const { return (dir_ / name).string(); }
  fs::path dir_;
};

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void spit(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return s;
}

// A file with an arbitrary header text and data buffer (no padding, no checks).
void write_raw(const std::string& path, const std::string& header, const std::string& data) {
  spit(path, le64(header.size()) + header + data);
}

template <class V>
std::string bytes_of(const std::vector<V>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(V));
}


}  // namespace

TEST_F(SafetensorsTest, RoundTripFloatWithMetadata) {
  const std::vector<float> a = {1.5f, -2.25f, 3.0f, 1e-30f, 7.0f, -0.0f};  // (2, 3)
  const std::vector<float> b = {0.1f, 0.2f, 0.3f, 0.4f};                  // (4)
  const float c = 42.0f;                                                   // scalar ()
  const std::string p = file("rt.safetensors");
  write_safetensors(p, {{"w.a", {2, 3}, a.data()}, {"w.b", {4}, b.data()}, {"c", {}, &c}},
                    {{"format", "pt"}, {"note", "héllo"}});
  ASSERT_FALSE(fs::exists(p + ".tmp"));

  SafetensorsReader r(p);
  ASSERT_EQ(r.tensors().size(), 3u);
  EXPECT_EQ(r.tensors()[0].name, "w.a");  // data order = write order
  EXPECT_EQ(r.tensors()[1].name, "w.b");
  EXPECT_EQ(r.tensors()[2].name, "c");
  EXPECT_EQ(r.at("w.a").shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(r.at("w.a").dtype, "F32");
  EXPECT_TRUE(r.at("c").shape.empty());
  EXPECT_TRUE(r.contains("w.b"));
  EXPECT_FALSE(r.contains("w.z"));
  EXPECT_EQ(r.metadata(), (std::map<std::string, std::string>{{"format", "pt"}, {"note", "héllo"}}));

  std::vector<float> a2(6), b2(4);
  float c2 = 0;
  r.read("w.a", a2.data(), 6);
  r.read("w.b", b2.data(), 4);
  r.read("c", &c2, 1);
  EXPECT_EQ(bytes_of(a2), bytes_of(a));  // bitwise, including -0.0
  EXPECT_EQ(b2, b);
  EXPECT_EQ(c2, 42.0f);
  std::vector<double> a3(6);
  r.read("w.a", a3.data(), 6);
  for (size_t i = 0; i < 6; ++i) EXPECT_EQ(a3[i], double(a[i]));
}

TEST_F(SafetensorsTest, DoubleDataIsWrittenAsF32Rounded) {
  std::vector<double> x(200000);  // more than one conversion chunk
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(double(i)) / 3.0;
  const std::string p = file("d.safetensors");
  TensorToWrite t;
  t.name = "x";
  t.shape = {2, 100000};
  t.data_f64 = x.data();
  write_safetensors(p, {t});
  SafetensorsReader r(p);
  EXPECT_EQ(r.at("x").dtype, "F32");
  EXPECT_EQ(r.at("x").end - r.at("x").begin, 4u * x.size());
  std::vector<double> y(x.size());
  std::vector<float> yf(x.size());
  r.read("x", y.data(), y.size());
  r.read("x", yf.data(), yf.size());
  size_t differs = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    ASSERT_EQ(y[i], double(float(x[i]))) << i;
    ASSERT_EQ(yf[i], float(x[i])) << i;
    differs += y[i] != x[i];
  }
  EXPECT_GT(differs, x.size() / 2);  // the values really went through float
}

// I32 (the hash-routing tables): written as stored, read back exactly, and only as
// int32: an I32 tensor is no float, a float tensor no integer table.
TEST_F(SafetensorsTest, Int32TablesRoundTripStrictly) {
  const std::vector<int32_t> t = {0, -1, 2147483647, -2147483647 - 1, 7, 3};
  const std::vector<float> f = {1.5f, 2.5f};
  const std::string p = file("i.safetensors");
  write_safetensors(p, {to_write<int32_t>("table", {3, 2}, t.data()), to_write<float>("w", {2}, f.data())});
  SafetensorsReader r(p);
  EXPECT_EQ(r.at("table").dtype, "I32");
  EXPECT_EQ(r.at("table").shape, (std::vector<int64_t>{3, 2}));
  EXPECT_EQ(r.at("table").end - r.at("table").begin, 24u);
  std::vector<int32_t> back(6);
  r.read("table", back.data(), back.size());
  EXPECT_EQ(back, t);
  std::vector<float> as_float(6);
  EXPECT_CONTAINS(error_of([&] { r.read("table", as_float.data(), 6); }), "tensor 'table' has dtype I32");
  std::vector<int32_t> as_int(2);
  EXPECT_CONTAINS(error_of([&] { r.read("w", as_int.data(), 2); }), "tensor 'w' has dtype F32; an integer table must be I32 or I64");
  EXPECT_CONTAINS(error_of([&] { r.read("table", back.data(), 5); }), "expected 5");
  // Exactly one data pointer.
  TensorToWrite both = to_write<int32_t>("x", {2}, t.data());
  both.data = f.data();
  EXPECT_CONTAINS(error_of([&] { write_safetensors(file("bad.safetensors"), {both}); }), "exactly one");
}

TEST_F(SafetensorsTest, Int64TablesAreReadIntoInt32WithARangeCheck) {
  // transformers stores integer buffers as torch.long (I64); moetune convert reads them.
  const std::vector<int64_t> t = {0, 5, -3, 2147483647};
  const std::vector<int64_t> big = {1, int64_t(1) << 40};
  const std::string p = file("i64.safetensors");
  write_safetensors(p, {to_write<int64_t>("table", {2, 2}, t.data()), to_write<int64_t>("big", {2}, big.data())});
  SafetensorsReader r(p);
  EXPECT_EQ(r.at("table").dtype, "I64");
  EXPECT_EQ(r.at("table").end - r.at("table").begin, 32u);
  std::vector<int32_t> back(4);
  r.read("table", back.data(), back.size());
  EXPECT_EQ(back, (std::vector<int32_t>{0, 5, -3, 2147483647}));
  std::vector<int32_t> two(2);
  EXPECT_CONTAINS(error_of([&] { r.read("big", two.data(), 2); }),
                  "tensor 'big' holds 1099511627776 at element 1, outside the int32 range");
}

TEST_F(SafetensorsTest, BytesOnDiskFollowTheFormat) {
  const std::vector<float> a = {1, 2, 3, 4, 5, 6}, b = {-1, -2};
  const std::string p = file("fmt.safetensors");
  write_safetensors(p, {{"second_name_sorts_later_z", {3, 2}, a.data()}, {"a_first_in_sort", {2}, b.data()}},
                    {{"k", "v"}});
  const std::string bytes = slurp(p);
  ASSERT_GE(bytes.size(), 8u);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  EXPECT_EQ(n % 8, 0u);
  ASSERT_LE(8 + n, bytes.size());
  const std::string header = bytes.substr(8, n);
  EXPECT_EQ(header.front(), '{');
  EXPECT_EQ(header.find_last_not_of(' '), header.rfind('}'));  // only spaces after the JSON
  const json j = json::parse(header);
  EXPECT_EQ(j["__metadata__"], (json{{"k", "v"}}));
  const json& ta = j["second_name_sorts_later_z"];
  const json& tb = j["a_first_in_sort"];
  EXPECT_EQ(ta["dtype"], "F32");
  EXPECT_EQ(ta["shape"], (json{3, 2}));
  EXPECT_EQ(ta["data_offsets"], (json{0, 24}));  // packed in the order written
  EXPECT_EQ(tb["shape"], (json{2}));
  EXPECT_EQ(tb["data_offsets"], (json{24, 32}));
  EXPECT_EQ(bytes.size(), 8 + n + 32);
  EXPECT_EQ(bytes.substr(8 + n, 24), bytes_of(a));
  EXPECT_EQ(bytes.substr(8 + n + 24, 8), bytes_of(b));
}

TEST_F(SafetensorsTest, ReadsF64BF16AndF16) {
  const std::vector<double> d = {0.1, -1e300, 3.0};
  const std::vector<uint16_t> bf = {0x3f80, 0xc000, 0x3e80};                // 1, -2, 0.25
  const std::vector<uint16_t> h = {0x3c00, 0xc200, 0x0001, 0x7c00, 0x3555};  // 1, -3, 2^-24, inf, 0.333251953125
  const json header = {
      {"d", {{"dtype", "F64"}, {"shape", {3}}, {"data_offsets", {0, 24}}}},
      {"bf", {{"dtype", "BF16"}, {"shape", {3}}, {"data_offsets", {24, 30}}}},
      {"h", {{"dtype", "F16"}, {"shape", {5}}, {"data_offsets", {30, 40}}}},
      {"i", {{"dtype", "I32"}, {"shape", {1}}, {"data_offsets", {40, 44}}}},
  };
  const std::string p = file("types.safetensors");
  write_raw(p, header.dump(), bytes_of(d) + bytes_of(bf) + bytes_of(h) + std::string(4, '\1'));
  SafetensorsReader r(p);
  std::vector<double> dd(3);
  r.read("d", dd.data(), 3);
  EXPECT_EQ(dd, d);
  std::vector<float> df(3);
  r.read("d", df.data(), 3);
  EXPECT_EQ(df[0], 0.1f);
  EXPECT_TRUE(std::isinf(df[1]) && df[1] < 0);
  std::vector<float> bff(3);
  r.read("bf", bff.data(), 3);
  EXPECT_EQ(bff, (std::vector<float>{1.0f, -2.0f, 0.25f}));
  std::vector<double> hd(5);
  r.read("h", hd.data(), 5);
  EXPECT_EQ(hd[0], 1.0);
  EXPECT_EQ(hd[1], -3.0);
  EXPECT_EQ(hd[2], std::ldexp(1.0, -24));
  EXPECT_TRUE(std::isinf(hd[3]) && hd[3] > 0);
  EXPECT_EQ(hd[4], 0.333251953125);
  float x;
  const std::string msg = error_of([&] { r.read("i", &x, 1); });
  EXPECT_CONTAINS(msg, p);
  EXPECT_CONTAINS(msg, "I32");
}

TEST_F(SafetensorsTest, LookupAndCountErrorsNameFileTensorAndShape) {
  const std::vector<float> a(6, 1.0f);
  const std::string p = file("lk.safetensors");
  write_safetensors(p, {{"w", {2, 3}, a.data()}});
  SafetensorsReader r(p);
  EXPECT_EQ(error_of([&] { r.at("nope"); }), p + ": no tensor 'nope'");
  std::vector<float> out(5);
  const std::string msg = error_of([&] { r.read("w", out.data(), 5); });
  EXPECT_CONTAINS(msg, p);
  EXPECT_CONTAINS(msg, "'w'");
  EXPECT_CONTAINS(msg, "(2, 3)");
  EXPECT_CONTAINS(msg, "5");
}

TEST_F(SafetensorsTest, CorruptFilesGiveErrorsNamingTheFile) {
  const std::string ok_entry = R"("w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})";
  const std::string eight(8, '\0');
  struct Case {
    std::string name, bytes, expect;
  };
  const std::vector<Case> cases = {
      {"three_bytes", "abc", "shorter than the 8-byte"},
      {"empty", "", "shorter than the 8-byte"},
      {"len_past_eof", le64(1000) + "{}", "runs past the end"},
      {"len_absurd", le64(uint64_t(1) << 40) + "{}", "absurd"},
      {"bad_json", le64(9) + "{\"w\": [1," + eight, "not valid JSON"},
      {"not_object", le64(5) + "[1,2]", "not a JSON object"},
      {"metadata_not_strings", "", "not a string"},
      {"missing_dtype", "", "'dtype'"},
      {"shape_not_array", "", "'shape'"},
      {"unknown_dtype", "", "unknown dtype 'F33'"},
      {"negative_dim", "", "non-negative"},
      {"offsets_wrong_type", "", "data_offsets"},
      {"wrong_byte_size", "", "hold 12 bytes"},
      {"offsets_out_of_range", "", "outside the data buffer"},
      {"overlap", "", "overlaps"},
      {"hole", "", "hole"},
      {"trailing_bytes", "", "trailing"},
      {"end_before_begin", "", "end before begin"},
  };
  const auto file_with = [&](const std::string& header, size_t data_bytes) {
    return le64(header.size()) + header + std::string(data_bytes, '\0');
  };
  std::map<std::string, std::string> built = {
      {"metadata_not_strings", file_with(R"({"__metadata__": {"step": 3}})", 0)},
      {"missing_dtype", file_with(R"({"w": {"shape": [2], "data_offsets": [0, 8]}})", 8)},
      {"shape_not_array", file_with(R"({"w": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}})", 8)},
      {"unknown_dtype", file_with(R"({"w": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}})", 8)},
      {"negative_dim", file_with(R"({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}})", 8)},
      {"offsets_wrong_type", file_with(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": ["0", 8]}})", 8)},
      {"wrong_byte_size", file_with(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}})", 12)},
      {"offsets_out_of_range", file_with(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}})", 8)},
      {"overlap", file_with("{" + ok_entry + R"(, "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})", 12)},
      {"hole", file_with("{" + ok_entry + R"(, "v": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}})", 16)},
      {"trailing_bytes", file_with("{" + ok_entry + "}", 12)},
      {"end_before_begin", file_with(R"({"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}})", 8)},
  };
  for (const auto& c : cases) {
    const std::string p = file(c.name + ".safetensors");
    spit(p, built.count(c.name) ? built[c.name] : c.bytes);
    const std::string msg = error_of([&] { SafetensorsReader r(p); });
    EXPECT_CONTAINS(msg, p) << " case " << c.name;
    EXPECT_CONTAINS(msg, c.expect) << " case " << c.name;
  }
  // A tensor-level problem also names the tensor.
  EXPECT_CONTAINS(error_of([&] { SafetensorsReader r(file("unknown_dtype.safetensors")); }), "tensor 'w'");
  EXPECT_CONTAINS(error_of([&] { SafetensorsReader r(file("missing.safetensors")); }), file("missing.safetensors"));
}

TEST_F(SafetensorsTest, TruncatedFileIsRejected) {
  const std::vector<float> a(10, 2.0f), b(10, 3.0f);
  const std::string p = file("trunc.safetensors");
  write_safetensors(p, {{"a", {10}, a.data()}, {"b", {2, 5}, b.data()}});
  { SafetensorsReader ok(p); }
  fs::resize_file(p, fs::file_size(p) - 4);
  const std::string msg = error_of([&] { SafetensorsReader r(p); });
  EXPECT_CONTAINS(msg, p);
  EXPECT_CONTAINS(msg, "tensor 'b'");
  EXPECT_CONTAINS(msg, "truncated");
}

TEST_F(SafetensorsTest, WriteErrorsNameThePathAndKeepTheOldFile) {
  const std::vector<float> a = {1, 2, 3};
  // Unwritable location: the directory does not exist.
  const std::string missing = file("no_such_dir/x.safetensors");
  EXPECT_CONTAINS(error_of([&] { write_safetensors(missing, {{"a", {3}, a.data()}}); }), missing);
  // Invalid requests are refused before anything is written.
  const std::string p = file("w.safetensors");
  EXPECT_CONTAINS(error_of([&] { write_safetensors(p, {{"a", {3}, a.data()}, {"a", {3}, a.data()}}); }), "twice");
  EXPECT_CONTAINS(error_of([&] { write_safetensors(p, {{"__metadata__", {3}, a.data()}}); }), "reserved");
  EXPECT_CONTAINS(error_of([&] { write_safetensors(p, {{"a", {-3}, a.data()}}); }), "negative");
  EXPECT_CONTAINS(error_of([&] { write_safetensors(p, {{"a", {3}, nullptr}}); }), "exactly one");
  EXPECT_FALSE(fs::exists(p));

  // Disk full: the temporary file is /dev/full, so every write fails with ENOSPC.
  write_safetensors(p, {{"a", {3}, a.data()}});
  if (!fs::exists("/dev/full")) GTEST_SKIP() << "no /dev/full";
  fs::create_symlink("/dev/full", p + ".tmp");
  const std::vector<float> big(1000, 9.0f);
  const std::string msg = error_of([&] { write_safetensors(p, {{"a", {1000}, big.data()}}); });
  EXPECT_CONTAINS(msg, p);
  EXPECT_CONTAINS(msg, "write failed");
  EXPECT_FALSE(fs::exists(fs::symlink_status(p + ".tmp")));  // cleaned up
  SafetensorsReader r(p);                                    // the old file is untouched
  std::vector<float> back(3);
  r.read("a", back.data(), 3);
  EXPECT_EQ(back, a);
}
