"""Launch configurations of the Triton kernels, and the launch-side helpers every launcher shares.

``KERNEL_CONFIGS`` is the single source of the block sizes the code launches with; the
ahead-of-time compile check (aot.py, tests/ops/test_compile.py) builds every launch variant with
exactly these, specialized as at launch, for sm_90 and sm_80 and reports their shared memory,
registers and spills.
"""

from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_HALF_AND_FP32 = lambda half, fp32: {"half": half, "fp32": fp32}

# Launch configurations on a GPU, by kernel and by input dtype ("half" = bf16/fp16).
# fp32 inputs use IEEE-exact dots (no TF32), so they get smaller tiles. Chosen so that every
# launch variant compiles without register spills on sm_90 and sm_80, with Triton 3.6 (the GPU
# image's) and 3.9 (tests/ops/test_compile.py runs the installed one; `python -m
# t3s_kernels.ops.aot` under the other).
KERNEL_CONFIGS = {
    "tile_forward": _HALF_AND_FP32(dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3, FLAT=False,
                                        TMA=False, GROUP_ROWS=16),
                                   dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=2, FLAT=False,
                                        TMA=False, GROUP_ROWS=16)),
    # BLOCK_V 2048 spills in the fused (ACCUMULATE and GRAD) variant once the launch's specialization is modelled.
    "chunk_epilogue": {dtype: dict(BLOCK_R=2, BLOCK_V=1024, num_warps=8, num_stages=1) for dtype in ("half", "fp32")},
    "merge_splits": {dtype: dict(BLOCK=128, num_warps=4, num_stages=1) for dtype in ("half", "fp32")},
    "distill_epilogue": {dtype: dict(BLOCK_R=1, BLOCK_V=1024, num_warps=8, num_stages=1) for dtype in ("half", "fp32")},
}

# Where a card or a variant allows more: by compute capability (major), then by input kind, optionally
# narrowed to a variant ("half:plain": no bias, softcap or smoothing), the most specific entry first.
# The forward tile kernel at 128 x 128 x 64 (8 warps, 3 stages) compiles without spills on sm_90 in every
# variant (Triton 3.6 and 3.9) and on sm_80 in the plain one (its variant with bias, softcap and smoothing
# spills 16 bytes there, so it keeps the table above). On sm_90 the plain variant takes 128 x 256 x 64 tiles
# (the size of the 1.19x-of-one-matmul H200 run in benchmarks/RESULTS.md) through tensor descriptors in the
# FLAT loop: spill-free under 3.6 and 3.9, where the pointer-loaded loop at that size spills under 3.9.
_TILE_FORWARD_128 = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, FLAT=False, TMA=False,
                         GROUP_ROWS=16)
_TILE_FORWARD_TMA_256 = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3, FLAT=True, TMA=True,
                             GROUP_ROWS=16)
ARCH_CONFIGS = {
    9: {"tile_forward": {"half:plain": _TILE_FORWARD_TMA_256, "half": _TILE_FORWARD_128}},
    8: {"tile_forward": {"half:plain": _TILE_FORWARD_128}},
}

# Under TRITON_INTERPRET=1 (tests on CPU): small blocks, so odd shapes cross several of them.
INTERPRETER_CONFIGS = {
    "tile_forward": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=16, FLAT=False, TMA=False, GROUP_ROWS=2),
    "chunk_epilogue": dict(BLOCK_R=4, BLOCK_V=64), "distill_epilogue": dict(BLOCK_R=4, BLOCK_V=64),
    "merge_splits": dict(BLOCK=16),
}


def kernel_config(kernel: str, dtype: torch.dtype, device: torch.device | None = None, variant: str = "") -> dict:
    """The launch configuration of ``kernel`` for inputs of ``dtype``: on ``device``'s architecture and for
    ``variant`` (e.g. "plain") where ``ARCH_CONFIGS`` has one, else ``KERNEL_CONFIGS``'."""
    if interpreting():
        return dict(INTERPRETER_CONFIGS[kernel])
    kind = "fp32" if dtype == torch.float32 else "half"
    if device is not None:
        by_kind = ARCH_CONFIGS.get(torch.cuda.get_device_properties(device).major, {}).get(kernel, {})
        for key in ([f"{kind}:{variant}"] if variant else []) + [kind]:
            if key in by_kind:
                return dict(by_kind[key])
    return dict(KERNEL_CONFIGS[kernel][kind])


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for half inputs


def upcast_dot(dtype: torch.dtype) -> bool:
    """See ``head_tile.tile_dot``: only the interpreter needs half operands upcast."""
    return interpreting() and dtype != torch.float32


def dot_flags(dtype: torch.dtype) -> dict:
    """The tile kernels' dot constexprs for inputs of ``dtype``."""
    return dict(DOT_PRECISION=dot_precision(dtype), UPCAST=upcast_dot(dtype))


MAX_SPLITS = 64  # partial states: 5 floats a row a split; the merge reads them once


def wave_aligned_blocks_per_split(n_row_blocks: int, n_vocab_blocks: int, slots: int) -> int:
    """Vocabulary blocks per program of a forward grid that fills the card's ``slots`` (SMs, one
    program each: the large-tile configurations hold one per SM) in whole waves.

    Programs of equal work run in ceil(programs / slots) waves of ``blocks_per_split`` blocks each;
    among the splittings of the vocabulary into at most MAX_SPLITS parts, the one with the fewest
    block-times wins, the fewest splits on a tie. At Qwen3-8B's head on an H200 (128 row blocks,
    1187 vocabulary blocks of 128, 132 SMs) 33 splits run 32 full waves of 36 blocks (1152 block-times,
    the ideal 1151), where 5 splits ran 5 waves of 238 (1190) with the last one 85% full."""
    best = None
    for splits in range(1, min(MAX_SPLITS, n_vocab_blocks) + 1):
        per_split = -(-n_vocab_blocks // splits)
        programs = n_row_blocks * -(-n_vocab_blocks // per_split)
        cost = -(-programs // slots) * per_split
        if best is None or cost < best[0]:
            best = (cost, per_split)
    return best[1]


def vocab_splits(n: int, vocab: int, cfg: dict, device: torch.device) -> tuple[int, int, int]:
    """(row blocks, vocabulary splits, blocks per split) of a forward tile grid."""
    n_row_blocks = triton.cdiv(n, cfg["BLOCK_M"])
    n_vocab_blocks = triton.cdiv(vocab, cfg["BLOCK_N"])
    if interpreting():  # two splits, so the tests merge partial states
        blocks_per_split = triton.cdiv(n_vocab_blocks, min(2, n_vocab_blocks))
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        blocks_per_split = wave_aligned_blocks_per_split(n_row_blocks, n_vocab_blocks, sms)
    return n_row_blocks, triton.cdiv(n_vocab_blocks, blocks_per_split), blocks_per_split


def check_int32_offsets(x: torch.Tensor, weight: torch.Tensor) -> None:
    """The forward tile kernel addresses X and W with int32 offsets (half the registers of 64-bit ones)."""
    limit = 2**31 - 1
    if max(x.shape[0] * x.stride(0), weight.shape[0] * weight.stride(0), x.numel(), weight.numel()) > limit:
        raise ValueError("token_stats on Triton addresses hidden and weight with 32-bit offsets and they exceed "
                         "2**31 elements; score fewer tokens a call, or pass backend='torch'")


def gradient_buffer(logits: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Where an epilogue writes dL/dz: over the logits themselves where they are of ``out_dtype`` (float32,
    or the inputs' half dtype), else a buffer of ``out_dtype``."""
    if out_dtype == logits.dtype:
        return logits
    return torch.empty(logits.shape, device=logits.device, dtype=out_dtype)
