#!/usr/bin/env bash
# Live parity check: a checkpoint written by this build's `moetune init` is read by the
# PyTorch reference (its own safetensors parser), which computes the expected loss
# terms, logits, gradients and 3 AdamW steps; the C++ Parity tests then compare this
# build against those fresh results (MOETUNE_FIXTURE_ROOT).
# usage: live_parity.sh <moetune binary> <moetune_tests binary> <scratch dir>
set -euo pipefail
moetune=$1 tests=$2 dir=$3
src=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
rm -rf "$dir" && mkdir -p "$dir"
trap 'rm -rf "$dir"' EXIT
for case in parity_sigmoid parity_softmax parity_v4routing parity_v4attn parity_mhc parity_mhc_mtp parity_v4; do
  seed=39
  [ "$case" = parity_v4 ] && seed=41  # 39 puts an expert pre-activation 3e-5 from swiglu_limit
  mkdir -p "$dir/$case"
  cp "$src/tests/fixtures/$case/batch.json" "$dir/$case/"
  "$moetune" init --config "$src/tests/fixtures/$case/config.json" --seed $seed --out "$dir/$case/ckpt"
  /usr/bin/python3 "$src/tests/reference/make_fixture.py" --ckpt "$dir/$case/ckpt" \
      --batch "$dir/$case/batch.json" --out "$dir/$case/expected.safetensors"
done
# parity_muon: optim.name = "muon" on parity_sigmoid's checkpoint (its batch.json names it).
mkdir -p "$dir/parity_muon"
cp "$src/tests/fixtures/parity_muon/batch.json" "$dir/parity_muon/"
/usr/bin/python3 "$src/tests/reference/make_fixture.py" --ckpt "$dir/parity_sigmoid/ckpt" \
    --batch "$dir/parity_muon/batch.json" --out "$dir/parity_muon/expected.safetensors"
# parity_v4_muon: the same on parity_v4's checkpoint.
mkdir -p "$dir/parity_v4_muon"
cp "$src/tests/fixtures/parity_v4_muon/batch.json" "$dir/parity_v4_muon/"
/usr/bin/python3 "$src/tests/reference/make_fixture.py" --ckpt "$dir/parity_v4/ckpt" \
    --batch "$dir/parity_v4_muon/batch.json" --out "$dir/parity_v4_muon/expected.safetensors"
MOETUNE_FIXTURE_ROOT=$dir "$tests" --gtest_filter='Parity.*'
