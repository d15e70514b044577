#!/usr/bin/env bash
# The bad-input corpus (docs/hardening.md, "Bad-input corpus"): every case of
# tests/corpus/bad/cases.tsv through the moetune CLI, checked for exit status 1, the
# expected message naming the file/line/key, no crash, no hang and no modified file.
# usage: run_bad_corpus.sh <moetune binary> <corpus dir> <scratch dir>
#        BAD_CORPUS_ONLY=<regex> runs a subset; BAD_CORPUS_TIMEOUT=<s> (default 20) per case.
set -euo pipefail
if [[ $# -ne 3 ]]; then
  echo "usage: $0 <moetune binary> <corpus dir> <scratch dir>" >&2
  exit 2
fi
exec python3 "$(dirname "$0")/run_bad_corpus.py" "$@"
