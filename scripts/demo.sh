#!/usr/bin/env bash
# The main job: install what is missing, build, generate the synthetic demo data and
# train the tiny example; the loss falls from about log(64) = 4.2.
#
# usage: scripts/demo.sh [tiny|small] [extra `moetune train` arguments, e.g. --set train.steps=50]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

example=tiny
if [[ $# -gt 0 && $1 != -* ]]; then example=$1; shift; fi
case "$example" in
  tiny) vocab=64; docs=4000; min=12; max=64 ;;
  small) vocab=512; docs=8000; min=32; max=256 ;;
  *) echo "demo.sh: unknown example '$example' (tiny or small)" >&2; exit 2 ;;
esac

scripts/setup.sh --no-torch
data=examples/$example.jsonl
if [[ ! -f $data ]]; then
  ./build/moetune gen-data --out "$data" --docs "$docs" --vocab "$vocab" --min-len "$min" --max-len "$max"
fi
out=runs/$example
echo "+ ./build/moetune train --config examples/$example.json --out $out $*"
./build/moetune train --config "examples/$example.json" --out "$out" "$@"
