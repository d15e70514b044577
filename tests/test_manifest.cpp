// SHA-256 against the FIPS 180-4 test vectors; checkpoint manifests catch missing,
// truncated, altered and unlisted files.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "io/manifest.hpp"
#include "io/sha256.hpp"
#include "moe/error.hpp"

using namespace moetune;
namespace fs = std::filesystem;

TEST(Sha256, KnownVectors) {
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(sha256_hex(std::string(1000000, 'a')),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Manifest, DetectsEveryKindOfDamage) {
  const fs::path dir = fs::temp_directory_path() / ("moetune_manifest_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::ofstream(dir / "a.bin") << "hello world";
  std::ofstream(dir / "b.json") << "{}";
  EXPECT_THROW(verify_manifest(dir.string()), Error);  // no manifest yet
  write_manifest(dir.string());
  EXPECT_NO_THROW(verify_manifest(dir.string()));
  auto expect_error = [&](const char* needle) {
    try {
      verify_manifest(dir.string());
      ADD_FAILURE() << "no error, expected " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  std::ofstream(dir / "a.bin") << "hello world";  // same bytes: still valid
  EXPECT_NO_THROW(verify_manifest(dir.string()));
  std::ofstream(dir / "a.bin") << "hello worle";  // same size, one byte changed
  expect_error("SHA-256 differs");
  std::ofstream(dir / "a.bin") << "hello";  // truncated
  expect_error("size 5");
  std::ofstream(dir / "a.bin") << "hello world";
  std::ofstream(dir / "extra.txt") << "x";
  expect_error("not listed");
  fs::remove(dir / "extra.txt");
  fs::remove(dir / "b.json");
  expect_error("missing");
  // Entries of the wrong type, or naming files outside the directory.
  const auto manifest = [&](const std::string& files) {
    std::ofstream(dir / "manifest.json") << "{\"format\": \"moetune-checkpoint-manifest-1\", \"files\": " << files << "}";
  };
  manifest(R"({"a.bin": {"bytes": "11", "sha256": ""}})");
  expect_error("entry 'a.bin': 'bytes' must be a non-negative integer");
  manifest(R"({"a.bin": {"bytes": 11, "sha256": 5}})");
  expect_error("entry 'a.bin': 'sha256' must be a string");
  manifest(R"({"a.bin": [11]})");
  expect_error("entry 'a.bin' needs bytes and sha256");
  manifest(R"({"../a.bin": {"bytes": 11, "sha256": ""}})");
  expect_error("entry '../a.bin' is not a file of the checkpoint directory");
  manifest(R"({"a.bin": {"bytes": 11, "sha256": ""}, "a.bin": {"bytes": 11, "sha256": ""}})");
  expect_error("duplicate key 'files.a.bin'");
  fs::remove_all(dir);
}

// Entries name files of the checkpoint with integer bytes and string sha256; anything
// else is an Error naming manifest.json (found by fuzz_manifest).
TEST(Manifest, MalformedEntriesAreErrors) {
  const fs::path dir = fs::temp_directory_path() / ("moetune_manifest_bad_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::ofstream(dir / "a.bin") << "hello world";
  const auto error_with = [&](const std::string& manifest) {
    std::ofstream(dir / "manifest.json") << manifest;
    try {
      verify_manifest(dir.string());
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const std::string sha = sha256_hex("hello world");
  EXPECT_NE(error_with(R"({"files": {"a.bin": {"bytes": "11", "sha256": ")" + sha + R"("}}})").find("'bytes' must be a non-negative integer"),
            std::string::npos);
  EXPECT_NE(error_with(R"({"files": {"a.bin": {"bytes": 11, "sha256": 5}}})").find("'sha256' must be a string"), std::string::npos);
  for (const char* name : {"", ".", "..", "../a.bin", "/etc/hostname"})
    EXPECT_NE(error_with(std::string(R"({"files": {")") + name + R"(": {"bytes": 1, "sha256": "x"}}})")
                  .find("is not a file of the checkpoint directory"),
              std::string::npos)
        << name;
  EXPECT_NE(error_with(R"({"files": {")" + std::string(300, 'x') + R"(": {"bytes": 1, "sha256": "x"}}})")
                .find("listed in the manifest but cannot be read"),
            std::string::npos);
  EXPECT_EQ(error_with(R"({"files": {"a.bin": {"bytes": 11, "sha256": ")" + sha + R"("}}})"), "no error");
  fs::remove_all(dir);
}
