"""Time ``token_stats`` (the forward tile kernel) at Qwen3-8B's head for several tile_forward
launch configurations, beside one cuBLAS matmul, on a GPU. A tuning aid: a configuration
adopted into ``KERNEL_CONFIGS`` / ``ARCH_CONFIGS`` must still compile without spills
(tests/ops/test_compile.py; `python -m t3s_kernels.ops.aot` under the other Triton). The first
configuration is the one the card launches (ops/configs.py says which compile without spills).

    PYTHONPATH=. python benchmarks/sweep_tile_forward.py
"""

import torch

import t3s_kernels as t3s
from t3s_kernels.bench import time_ms
from t3s_kernels.ops import configs

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, FLAT, TMA, GROUP_ROWS). FLAT runs the vocabulary blocks
# and their K slices as one loop, TMA loads its tiles through tensor descriptors (tile_forward.py). GROUP_ROWS
# 128 (all row blocks at Qwen3-8B's N) is the program order before grouping: the first line is the 1.19x run's
# kernel as it was, the second the shipped sm_90 one in that order.
CONFIGS = [(128, 256, 64, 8, 3, False, False, 128), (128, 256, 64, 8, 3, True, True, 128),
           (128, 256, 64, 8, 3, True, True, 8), (128, 256, 64, 8, 3, True, True, 32),
           (128, 128, 64, 8, 3, True, True, 16), (128, 128, 64, 8, 4, False, False, 16)]


def main():
    n, h, v = 16384, 4096, 151936
    dev = torch.device("cuda")
    x = torch.randn(n, h, device=dev, dtype=torch.bfloat16)
    w = torch.randn(v, h, device=dev, dtype=torch.bfloat16) * 0.03
    y = torch.randint(0, v, (n,), device=dev)
    logits = torch.empty(n, v, device=dev, dtype=torch.bfloat16)
    torch.mm(x, w.t(), out=logits)
    print(f"one matmul: {time_ms(lambda: torch.mm(x, w.t(), out=logits), dev, 3):.1f} ms", flush=True)
    logits = None  # free the N x V buffer before the sweep
    ref = t3s.token_stats(x, w, y).lse
    launched = configs.kernel_config("tile_forward", torch.bfloat16, dev, "plain")
    ms = time_ms(lambda: t3s.token_stats(x, w, y), dev, 3)
    print(f"as launched {launched}: {ms:.1f} ms", flush=True)
    configs.ARCH_CONFIGS.clear()  # the table below is then what every card launches
    for bm, bn, bk, warps, stages, flat, tma, group in CONFIGS:
        configs.KERNEL_CONFIGS["tile_forward"]["half"] = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                                                              num_stages=stages, FLAT=flat, TMA=tma, GROUP_ROWS=group)
        err = (t3s.token_stats(x, w, y).lse - ref).abs().max().item()  # also the warm-up (compile)
        ms = time_ms(lambda: t3s.token_stats(x, w, y), dev, 3)
        loop = ("FLAT" if flat else "loop") + (" TMA" if tma else "")
        print(f"{(bm, bn, bk, warps, stages, loop, f'group {group}')}: {ms:.1f} ms, max |lse - default's| {err:.1e}",
              flush=True)


if __name__ == "__main__":
    main()
