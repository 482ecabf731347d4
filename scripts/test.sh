#!/usr/bin/env bash
# Set up (if needed) and run the test suite. On a CPU-only machine the Triton kernels run
# under TRITON_INTERPRET=1 and are also compiled ahead of time for sm_90 / sm_80.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
export TRITON_DEFAULT_FP_FUSION=1
.venv/bin/python -m pytest "$@"
