#!/usr/bin/env bash
# Create .venv with the package and its test tools. On a machine without CUDA, PyTorch is
# pinned to the CPU build (a bare `torch` would pull a multi-GB CUDA build); the package's
# own metadata keeps an open range for users with CUDA builds.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q -r requirements-cpu.txt
fi
.venv/bin/python -m pip install -q -e ".[test]"
