#!/usr/bin/env bash
# Set up (if needed) and run the main job: `t3s bench` on its defaults (CPU: about a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
export TRITON_DEFAULT_FP_FUSION=1
.venv/bin/t3s bench "$@"
