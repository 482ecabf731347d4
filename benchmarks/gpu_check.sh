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

# 1. Correctness on the GPU: compiled kernels, not the interpreter (about 1 minute).
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/ops/test_triton_backends.py tests/test_distill.py \
  tests/backends/test_chunked_engine.py tests/test_fused_loss.py 2>&1 | tee "$out/tests.log"
echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$out/tests.log"

# 2. The benchmark table at Qwen3-8B's head (N=16384, H=4096, V=151936, bf16): all tokens,
#    then half of them at weight 0 (the selection lever).
for sel in 1.0 0.5; do
  timeout 150 python3 -m t3s_kernels.cli bench --select "$sel" --repeat 5 --quiet \
    --json "$out/bench-select-$sel.json" 2>&1 | tee "$out/bench-select-$sel.txt"
done

# 3. Distillation (issue 5): a teacher head of the same shape, generalized JSD + CE, against eager and
#    Liger's fused linear JSD (when its wheel is in .whl/). N=8192 keeps eager's two fp32 logit
#    tensors inside an H100's memory.
timeout 150 python3 benchmarks/bench_distill.py --tokens 8192 --hidden 4096 --vocab 151936 --dtype bf16 \
  --kd-loss jsd --repeat 3 --json "$out/distill.json" 2>&1 | tee "$out/distill.txt"
