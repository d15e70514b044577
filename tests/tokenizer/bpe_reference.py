#!/usr/bin/env python3
"""Independent byte-level BPE encoder for a Hugging Face tokenizer.json, written after
GPT-2's original encoder.py (the `regex` module's \\p{L}/\\p{N}, bytes_to_unicode, and
"merge the lowest-ranked pair everywhere, repeat"). Used to cross-check moetune's C++
tokenizer: tests/tokenizer/parity.sh.

usage: bpe_reference.py TOKENIZER_JSON TEXT_FILE    -> prints the ids, space-separated
"""
import json
import sys

import regex

PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def main():
    tok = json.load(open(sys.argv[1], encoding="utf-8"))
    text = open(sys.argv[2], "rb").read().decode("utf-8")
    model = tok["model"]
    assert model["type"] == "BPE" and tok["pre_tokenizer"]["type"] == "ByteLevel"
    vocab = model["vocab"]
    ranks = {}
    for i, m in enumerate(model["merges"]):
        a, b = m.split(" ") if isinstance(m, str) else m
        ranks[(a, b)] = i
    b2u = bytes_to_unicode()
    if tok["pre_tokenizer"].get("add_prefix_space", True) and not text.startswith(" "):
        text = " " + text
    ids = []
    cache = {}
    for word in PATTERN.findall(text):
        if word in cache:
            ids.extend(cache[word])
            continue
        parts = [b2u[b] for b in word.encode("utf-8")]
        while len(parts) > 1:
            best = min((ranks.get(p, 1 << 62), p) for p in zip(parts, parts[1:]))
            if best[0] == 1 << 62:
                break
            a, b = best[1]
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        cache[word] = [vocab[p] for p in parts]
        ids.extend(cache[word])
    print(" ".join(map(str, ids)))


if __name__ == "__main__":
    main()
