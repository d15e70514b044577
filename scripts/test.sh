#!/usr/bin/env bash
# The whole test suite: install what is missing (PyTorch included, for the parity
# check against tests/reference/), build, and run every test with ctest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Open MPI refuses root without these; tests pin their own thread counts.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

scripts/setup.sh
ctest --test-dir build --output-on-failure -j2 "$@"
