#!/usr/bin/env bash
# Cross-checks moetune's byte-level BPE against an independent Python implementation
# (tests/tokenizer/bpe_reference.py, GPT-2's algorithm with the `regex` module):
# moetune trains a tokenizer on a generated multilingual corpus, then both encode a
# held-out text and the ids must be identical.
#   usage: parity.sh MOETUNE_BINARY SCRATCH_DIR [PYTHON]
set -euo pipefail
MOETUNE=$1 DIR=$2 PY=${3:-/usr/bin/python3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
rm -rf "$DIR" && mkdir -p "$DIR"

gen() {  # seed lines -> a corpus with several scripts, digits, punctuation, odd whitespace
  "$PY" - "$1" "$2" <<'PY'
import random, sys
r = random.Random(int(sys.argv[1]))
words = ["the", "The", "cat", "sat", "on", "mat", "don't", "we'll", "it's", "I'M", "naïve", "café", "Straße",
         "東京", "世界", "Привет", "мир", "γειά", "مرحبا", "٣٤", "१२३", "½", "Ⅻ", "2024", "3.14", "x+=1", "(a,b)",
         "!!", "...", "—", "🙂", "🙂🙂", "<|user|>", "<|eos|>", "e-mail", "https://x.org/a?b=c", "\t", "tab\there"]
spaces = [" ", " ", " ", "  ", "\u00a0", " \u3000", "\t"]
out = []
for _ in range(int(sys.argv[2])):
    n = r.randint(1, 12)
    line = ""
    for i in range(n):
        if i:
            line += r.choice(spaces)
        line += r.choice(words)
    out.append(line + r.choice(["\n", "\n", "\n\n", "  \n", "\n \n"]))
sys.stdout.write("".join(out))
PY
}
gen 1 20000 >"$DIR/corpus.txt"
gen 2 3000 >"$DIR/heldout.txt"
"$MOETUNE" tokenizer train --input "$DIR/corpus.txt" --vocab-size 1200 --out "$DIR/tokenizer.json" --quiet
"$MOETUNE" tokenizer encode --tokenizer "$DIR/tokenizer.json" --file "$DIR/heldout.txt" >"$DIR/moetune.ids"
"$PY" "$HERE/bpe_reference.py" "$DIR/tokenizer.json" "$DIR/heldout.txt" >"$DIR/python.ids"
n=$(wc -w <"$DIR/moetune.ids")
if ! cmp -s "$DIR/moetune.ids" "$DIR/python.ids"; then
  echo "FAIL: moetune and the Python reference disagree (first differing ids below)"
  diff <(tr ' ' '\n' <"$DIR/moetune.ids") <(tr ' ' '\n' <"$DIR/python.ids") | head -10
  exit 1
fi
[[ $n -gt 1000 ]] || { echo "FAIL: only $n ids"; exit 1; }
echo "OK: $n ids identical ($(wc -c <"$DIR/heldout.txt") bytes of held-out text)"
