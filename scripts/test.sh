#!/usr/bin/env bash
# Set up (if needed) and run the test suite. On a CPU-only machine the Triton kernels run
# under TRITON_INTERPRET=1 and are also compiled ahead of time for sm_90 / sm_80.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
export TRITON_DEFAULT_FP_FUSION=1
# Native builds (the CPU epilogue, DeepSpeed's ops) in the environment's own folder: a run does not
# depend on, or leave anything in, the user's cache.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}"
.venv/bin/python -m pytest "$@"
