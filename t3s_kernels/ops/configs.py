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
# t3s_kernels.ops.aot` under the other). Under 3.6 the tile backward spilled at 2 stages and the
# fp32 distillation forward at 8 warps.
KERNEL_CONFIGS = {
    "tile_forward": _HALF_AND_FP32(dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
                                   dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=2)),
    "tile_backward": _HALF_AND_FP32(dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
                                    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=3)),
    # BLOCK_V 2048 spills in the fused (ACCUMULATE and GRAD) variant once the launch's specialization is modelled.
    "chunk_epilogue": {dtype: dict(BLOCK_R=2, BLOCK_V=1024, num_warps=8, num_stages=1) for dtype in ("half", "fp32")},
    "merge_splits": {dtype: dict(BLOCK=128, num_warps=4, num_stages=1) for dtype in ("half", "fp32")},
    "distill_epilogue": {dtype: dict(BLOCK_R=1, BLOCK_V=1024, num_warps=8, num_stages=1) for dtype in ("half", "fp32")},
    "tile_distill_forward": _HALF_AND_FP32(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2),
                                           dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=1)),
    "tile_jsd": _HALF_AND_FP32(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2),
                               dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=1)),
    "tile_distill_backward": _HALF_AND_FP32(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=1),
                                            dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=1)),
}

# Under TRITON_INTERPRET=1 (tests on CPU): small blocks, so odd shapes cross several of them.
_TILE, _ROWS = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=16), dict(BLOCK_R=4, BLOCK_V=64)
INTERPRETER_CONFIGS = {
    "tile_forward": _TILE, "tile_backward": _TILE, "tile_distill_forward": _TILE, "tile_jsd": _TILE,
    "tile_distill_backward": _TILE, "chunk_epilogue": _ROWS, "distill_epilogue": _ROWS,
    "merge_splits": dict(BLOCK=16),
}


def kernel_config(kernel: str, dtype: torch.dtype) -> dict:
    if interpreting():
        return dict(INTERPRETER_CONFIGS[kernel])
    return dict(KERNEL_CONFIGS[kernel]["fp32" if dtype == torch.float32 else "half"])


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for half inputs


def upcast_dot(dtype: torch.dtype) -> bool:
    """See ``head_tile.tile_dot``: only the interpreter needs half operands upcast."""
    return interpreting() and dtype != torch.float32


def dot_flags(dtype: torch.dtype) -> dict:
    """The tile kernels' dot constexprs for inputs of ``dtype``."""
    return dict(DOT_PRECISION=dot_precision(dtype), UPCAST=upcast_dot(dtype))


def _split_count(n_row_blocks: int, n_vocab_blocks: int, device: torch.device) -> int:
    """Vocabulary splits so that the forward grid has a few waves of programs."""
    if interpreting():
        return min(2, n_vocab_blocks)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-4 * sms // max(n_row_blocks, 1))
    return max(1, min(want, n_vocab_blocks, 32))


def vocab_splits(n: int, vocab: int, cfg: dict, device: torch.device) -> tuple[int, int, int]:
    """(row blocks, vocabulary splits, blocks per split) of a forward tile grid."""
    n_row_blocks = triton.cdiv(n, cfg["BLOCK_M"])
    n_vocab_blocks = triton.cdiv(vocab, cfg["BLOCK_N"])
    blocks_per_split = triton.cdiv(n_vocab_blocks, _split_count(n_row_blocks, n_vocab_blocks, device))
    return n_row_blocks, triton.cdiv(n_vocab_blocks, blocks_per_split), blocks_per_split


def check_int32_offsets(x: torch.Tensor, weight: torch.Tensor) -> None:
    """The tile kernels address X, W, dX and dW with int32 offsets (half the registers of 64-bit ones)."""
    limit = 2**31 - 1
    if max(x.shape[0] * x.stride(0), weight.shape[0] * weight.stride(0), x.numel(), weight.numel()) > limit:
        raise ValueError("strategy='tile' addresses hidden and weight with 32-bit offsets and they exceed 2**31 "
                         "elements; use strategy='chunked'")


def grad_buffers(n: int, h: int, vocab: int, device, compute_dx: bool, compute_dw: bool, compute_db: bool):
    """float32 zero dX, dW, db for the tile backward kernels' atomics (None where not computed)."""
    f32 = dict(device=device, dtype=torch.float32)
    return (torch.zeros(n, h, **f32) if compute_dx else None, torch.zeros(vocab, h, **f32) if compute_dw else None,
            torch.zeros(vocab, **f32) if compute_db else None)


def gradient_buffer(logits: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Where an epilogue writes dL/dz: over the logits themselves where they are of ``out_dtype`` (float32,
    or the inputs' half dtype), else a buffer of ``out_dtype``."""
    if out_dtype == logits.dtype:
        return logits
    return torch.empty(logits.shape, device=logits.device, dtype=out_dtype)
