#!/usr/bin/env bash
# The prepared GPU check, one command, at most 8 minutes on one H100/H200: the benchmark table at
# Qwen3-8B's head (the peers, QuACK included where carried, and PyTorch's own linear_cross_entropy),
# the statistics paths (Liger's against ours) with Liger's CuTe-DSL backend, the selection lever, a
# reduced sweep with its plots, distillation, the forward tile kernel's launch configurations, and the
# GPU test subset.
# Logs, JSON and PNGs go to the folder given (default: gpu-check-out/); copy the figures into
# benchmarks/RESULTS.md with the card and date.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Peers: wheels placed in .whl/ (benchmarks/README.md says which) are installed into /tmp/site
# first; without them their rows say "not installed", with the reason.
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

# Budget (seconds, each a hard timeout): 150 + 45 + 30 + 100 + 60 + 45 + 50 = 480 s of commands. The H200
# run's table fit in 150 s with the tile strategy's row (about 8 s), now gone, and the torch backend's
# row (the CPU path), now left out, in place of PyTorch's two rows; the GPU tests took 40 s there; the
# configuration sweep prints each configuration as it is timed, so a timeout keeps what was measured.
# 1. The table at Qwen3-8B's head (N=16384, H=4096, V=151936, bf16), with the float64 error column;
#    the implementation each row ran (PyTorch's resolved policy, a peer's version and kernels) is
#    printed under the table.
timeout 150 python3 -m t3s_kernels.cli bench --select 1.0 --repeat 5 --quiet \
  --providers eager compile torch-lce torch-lce-chunked liger cce quack t3s-triton-chunked \
  t3s-triton-chunked-weight-accum t3s-triton-chunked-float32-logits t3s-triton-chunked-lean t3s-token-stats \
  --json "$out/bench-select-1.0.json" 2>&1 | tee "$out/bench-select-1.0.txt"

# 1b. The statistics paths at the same shape: Liger's fused scaled cross-entropy (NLL and entropy) against
#     ours with return_stats (fwd+bwd) and token_stats (forward), and Liger's CuTe-DSL fused linear CE.
timeout 45 python3 -m t3s_kernels.cli bench --select 1.0 --repeat 3 --quiet \
  --providers liger-stats t3s-triton-stats t3s-token-stats liger-cute \
  --json "$out/bench-stats.json" 2>&1 | tee "$out/bench-stats.txt"

# 2. The selection lever: half the tokens at weight 0 (ignored labels for the peers).
timeout 30 python3 -m t3s_kernels.cli bench --select 0.5 --repeat 3 --quiet --no-error \
  --providers liger cce quack t3s-triton-chunked t3s-triton-chunked-weight-accum t3s-triton-chunked-lean \
  --json "$out/bench-select-0.5.json" 2>&1 | tee "$out/bench-select-0.5.txt"

# 3. The sweep, reduced: time and peak memory against N at V=151936, with the small-N row
#    (N=2048, where fixed costs show), and the two other vocabularies at N=8192; JSON and PNGs.
timeout 70 python3 -m t3s_kernels.cli bench --sweep --sweep-tokens 2048 8192 32768 --sweep-vocab 151936 \
  --providers compile torch-lce-chunked liger cce quack t3s-triton-chunked t3s-triton-chunked-lean --repeat 2 --quiet \
  --no-error --out "$out" \
  2>&1 | tee "$out/sweep-v151936.txt"
timeout 30 python3 -m t3s_kernels.cli bench --sweep --sweep-tokens 8192 --sweep-vocab 32768 262144 \
  --providers compile liger quack t3s-triton-chunked --repeat 2 --quiet --no-error --out "$out/vocab" \
  2>&1 | tee "$out/sweep-vocab.txt"

# 4. Distillation: a teacher head of the same shape, generalized JSD + CE, against eager and
#    Liger's fused linear JSD where present. N=8192 keeps eager's two fp32 logit tensors in memory.
timeout 60 python3 benchmarks/bench_distill.py --tokens 8192 --hidden 4096 --vocab 151936 --dtype bf16 \
  --kd-loss jsd --repeat 3 --json "$out/distill.json" 2>&1 | tee "$out/distill.txt"

# 5. token_stats (the forward tile kernel) under the launch configurations that compile without spills,
#    beside one matmul: which one to ship for this card (the GPU tests took 40 s on the H200).
timeout 45 python3 benchmarks/sweep_tile_forward.py 2>&1 | tee "$out/tile-forward-configs.txt"

# 6. Correctness on the GPU, compiled kernels (not the interpreter): the `gpu` marker's subset, which
#    exercises every kernel and option family; the packed path with flash-attn's varlen kernels
#    where flash-attn is carried.
timeout 50 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ops tests/backends \
  tests/adapters/test_packing.py \
  2>&1 | tee "$out/tests.log"
echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$out/tests.log"
