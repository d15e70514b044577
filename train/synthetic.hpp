// A tiny synthetic data generator, so that the demo needs no outside data. The task
// (documented in docs/data.md) is an arithmetic progression modulo the symbol count:
//   input_ids = [BOS=1, 2+x_0, 2+x_1, ..., 2+x_{L-2}],  x_{t+1} = (x_t + s) mod (V-2),
// with a random start x_0 in [0, V-2) and a random step s in [1, kSyntheticMaxStep]
// per document. Labels mask the "prompt" (BOS and the start symbol) with -100, so the
// targets are x_1 ... : x_1 is one of kSyntheticMaxStep choices, every later symbol is
// a function of the two before it. Token 0 is left for padding.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "train/data.hpp"

namespace moetune {

constexpr int32_t kSyntheticBos = 1;
constexpr int kSyntheticMaxStep = 3;

// One document of length len (>= 2) drawn from the splitmix64 stream `state`.
Document synthetic_document(uint64_t& state, int vocab_size, int len);

// num_docs documents, lengths uniform in [min_len, max_len], in memory (what
// write_synthetic_jsonl writes; `moetune bench` trains on them). Same errors.
std::vector<Document> synthetic_documents(int num_docs, int vocab_size, int min_len, int max_len, uint64_t seed);

// Writes num_docs documents as JSONL ({"input_ids": [...], "labels": [...]} per line),
// lengths uniform in [min_len, max_len]. Deterministic in seed, on every platform.
// Throws moetune::Error on num_docs < 1, vocab_size < 4, min_len < 3, max_len < min_len,
// or a file that cannot be written.
void write_synthetic_jsonl(const std::string& path, int num_docs, int vocab_size, int min_len, int max_len,
                           uint64_t seed);

}  // namespace moetune
