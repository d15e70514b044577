// moetune data prepare (prepare.hpp): documents -> parallel encoding -> token file.
#include "train/prepare.hpp"

#include <omp.h>

#include <chrono>
#include <cstdio>

#include "io/token_file.hpp"
#include "moe/error.hpp"

namespace moetune {

PrepareStats prepare_token_file(const PrepareOptions& opt, const Tokenizer& tok) {
  const auto t0 = std::chrono::steady_clock::now();
  if (opt.inputs.empty()) throw Error("data prepare: no --input files");
  if (opt.out.empty()) throw Error("data prepare: --out is required");
  const int32_t bos = opt.bos ? tok.special_id("<|bos|>") : -1;
  const int32_t eos = opt.eos.empty() ? -1 : tok.special_id(opt.eos);
  TokenFileWriter writer(opt.out, uint64_t(tok.vocab_size()), sha256_from_hex(tok.sha256_hex()));

  PrepareStats st;
  // Documents are gathered into batches of ~16 MB, encoded in parallel (each thread has
  // its own word cache), then written in order.
  constexpr int64_t kBatchBytes = 16 << 20;
  std::vector<std::string> batch;
  int64_t batch_bytes = 0, next_report = 64 << 20;
  const auto flush = [&] {
    std::vector<std::vector<int32_t>> ids(batch.size());
#pragma omp parallel for schedule(dynamic, 16)
    for (size_t i = 0; i < batch.size(); ++i) {
      std::vector<int32_t>& v = ids[i];
      if (bos >= 0) v.push_back(bos);
      const auto t = tok.encode(batch[i]);
      v.insert(v.end(), t.begin(), t.end());
      if (eos >= 0) v.push_back(eos);
    }
    for (const auto& v : ids) {
      writer.add(v);
      st.tokens += int64_t(v.size());
    }
    batch.clear();
    batch_bytes = 0;
    if (opt.progress && st.bytes >= next_report) {
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("data prepare: %.0f MB, %lld documents, %lld tokens (%.1f MB/s)\n", double(st.bytes) / 1e6,
                  static_cast<long long>(st.documents), static_cast<long long>(st.tokens), double(st.bytes) / 1e6 / s);
      std::fflush(stdout);
      while (next_report <= st.bytes) next_report += 64 << 20;
    }
  };
  for (const auto& path : opt.inputs) {
    const auto cs = for_each_text_document(path, opt.corpus, [&](std::string&& doc, const std::string&) {
      ++st.documents;
      st.bytes += int64_t(doc.size());
      batch_bytes += int64_t(doc.size());
      batch.push_back(std::move(doc));
      if (batch_bytes >= kBatchBytes) flush();
    });
    st.empty += cs.empty;
  }
  if (!batch.empty()) flush();
  if (st.documents == 0) throw Error("data prepare: the --input files hold no non-empty document");
  writer.finish();
  st.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return st;
}

}  // namespace moetune
