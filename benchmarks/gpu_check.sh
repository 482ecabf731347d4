#!/usr/bin/env bash
# The prepared GPU check: the GPU test subset, the AOT compile report and the benchmark table,
# in one command, under 6 minutes on one H100/H200. Logs and JSON go to the folder given
# (default: gpu-check-out/); copy the table into benchmarks/RESULTS.md with the card and date.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Peers: Liger-Kernel and Cut Cross-Entropy wheels placed in .whl/ (see benchmarks/README.md)
# are installed into /tmp/site first; without them their rows say "not installed".
set -uo pipefail
out=${1:-gpu-check-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; date -u +%F;
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  2>&1 | tee "$out/machine.txt"

# Budget: about 8 minutes of commands (a lent machine gives 15 minutes in all, start included).
# 1. The benchmark table at Qwen3-8B's head (N=16384, H=4096, V=151936, bf16), every provider
#    (torch.compile included), with the float64 error column.
timeout 220 python3 -m t3s_kernels.cli bench --select 1.0 --repeat 5 --quiet \
  --json "$out/bench-select-1.0.json" 2>&1 | tee "$out/bench-select-1.0.txt"

# 2. The selection lever: half the tokens at weight 0 (ignored labels for the peers).
timeout 100 python3 -m t3s_kernels.cli bench --select 0.5 --repeat 5 --quiet --no-error \
  --providers eager liger cce t3s-triton-chunked t3s-triton-tile \
  --json "$out/bench-select-0.5.json" 2>&1 | tee "$out/bench-select-0.5.txt"

# 3. Distillation: a teacher head of the same shape, generalized JSD + CE, against eager,
#    Liger's fused linear and chunked JSD and TRL's chunked divergence where present. N=8192 keeps
#    eager's two fp32 logit tensors inside an H100's memory.
timeout 90 python3 benchmarks/bench_distill.py --tokens 8192 --hidden 4096 --vocab 151936 --dtype bf16 \
  --kd-loss jsd --repeat 3 --json "$out/distill.json" 2>&1 | tee "$out/distill.txt"

# 4. Correctness on the GPU, compiled kernels (not the interpreter): a subset that exercises every
#    kernel and option family, in the time left.
#    The packed (padding-free) path runs with flash-attn's varlen kernels where flash-attn is carried.
timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ops tests/backends \
  tests/adapters/test_packing.py \
  2>&1 | tee "$out/tests.log"
echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$out/tests.log"
