"""Launchers and launch configurations of the Triton kernels, and the two Triton engines.

``KERNEL_CONFIGS`` is the single source of the block sizes the code launches with; the
ahead-of-time compile test (tests/ops/test_compile.py) builds exactly these for sm_90
and sm_80 and reports their shared memory, registers and spills.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton

from ..backends.base import HeadGrads, OnlineState, RowStats
from ..options import GradRequest, HeadOptions
from .chunk_epilogue import chunk_epilogue_kernel
from .tile_backward import tile_backward_kernel
from .tile_forward import N_STATE, merge_splits_kernel, tile_forward_kernel


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Launch configurations on a GPU, by kernel and by input dtype ("half" = bf16/fp16).
# fp32 inputs use IEEE-exact dots (no TF32), so they get smaller tiles.
# Chosen so that every kernel compiles without register spills on sm_90 and sm_80
# (tests/ops/test_compile.py); throughput tuning waits for GPU measurements.
KERNEL_CONFIGS = {
    "tile_forward": {
        "half": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
        "fp32": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=2),
    },
    "tile_backward": {
        "half": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2),
        "fp32": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=1),
    },
    "chunk_epilogue": {
        "half": dict(BLOCK_R=2, BLOCK_V=2048, num_warps=8, num_stages=1),
        "fp32": dict(BLOCK_R=2, BLOCK_V=2048, num_warps=8, num_stages=1),
    },
    "merge_splits": {
        "half": dict(BLOCK=256, num_warps=4, num_stages=1),
        "fp32": dict(BLOCK=256, num_warps=4, num_stages=1),
    },
    "distill_epilogue": {
        "half": dict(BLOCK_R=1, BLOCK_V=1024, num_warps=8, num_stages=1),
        "fp32": dict(BLOCK_R=1, BLOCK_V=1024, num_warps=8, num_stages=1),
    },
    "tile_distill_forward": {
        "half": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2),
        "fp32": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=1),
    },
    "tile_jsd": {
        "half": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2),
        "fp32": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=1),
    },
    "tile_distill_backward": {
        "half": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=1),
        "fp32": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=1),
    },
    "merge_distill_splits": {
        "half": dict(BLOCK=128, num_warps=4, num_stages=1),
        "fp32": dict(BLOCK=128, num_warps=4, num_stages=1),
    },
}

# Under TRITON_INTERPRET=1 (tests on CPU): small blocks, so odd shapes cross several of them.
INTERPRETER_CONFIGS = {
    "tile_forward": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=16),
    "tile_backward": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=16),
    "chunk_epilogue": dict(BLOCK_R=4, BLOCK_V=64),
    "merge_splits": dict(BLOCK=16),
    "distill_epilogue": dict(BLOCK_R=4, BLOCK_V=64),
    "tile_distill_forward": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=16),
    "tile_jsd": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=16),
    "tile_distill_backward": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=16),
    "merge_distill_splits": dict(BLOCK=16),
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


def _scalar_args(opts: HeadOptions) -> dict:
    return dict(softcap=float(opts.softcap or 1.0), logit_scale=float(opts.logit_scale))


def _grad_args(opts: HeadOptions) -> dict:
    return dict(ce_weight=opts.ce_weight, smoothing=opts.label_smoothing, inv_vocab=1.0 / opts.vocab_size,
                z_loss=opts.z_loss)


def _split_count(n_row_blocks: int, n_vocab_blocks: int, device: torch.device) -> int:
    """Vocabulary splits so that the forward grid has a few waves of programs."""
    if interpreting():
        return min(2, n_vocab_blocks)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-4 * sms // max(n_row_blocks, 1))
    return max(1, min(want, n_vocab_blocks, 32))


def _check_int32_offsets(x: torch.Tensor, weight: torch.Tensor) -> None:
    """The tile kernels address X, W, dX and dW with int32 offsets (half the registers of 64-bit ones)."""
    limit = 2**31 - 1
    if max(x.shape[0] * x.stride(0), weight.shape[0] * weight.stride(0), x.numel(), weight.numel()) > limit:
        raise ValueError("strategy='tile' addresses hidden and weight with 32-bit offsets and they exceed 2**31 "
                         "elements; use strategy='chunked'")


def _vocab_splits(n: int, vocab: int, cfg: dict, device: torch.device) -> tuple[int, int, int]:
    """(row blocks, vocabulary splits, blocks per split) of a forward tile grid."""
    n_row_blocks = triton.cdiv(n, cfg["BLOCK_M"])
    n_vocab_blocks = triton.cdiv(vocab, cfg["BLOCK_N"])
    blocks_per_split = triton.cdiv(n_vocab_blocks, _split_count(n_row_blocks, n_vocab_blocks, device))
    return n_row_blocks, triton.cdiv(n_vocab_blocks, blocks_per_split), blocks_per_split


def tile_forward(x, weight, bias, labels, opts: HeadOptions) -> RowStats:
    _check_int32_offsets(x, weight)
    n, h = x.shape
    vocab = weight.shape[0]
    cfg = kernel_config("tile_forward", x.dtype)
    n_row_blocks, splits, blocks_per_split = _vocab_splits(n, vocab, cfg, x.device)
    part = torch.empty(N_STATE, splits, n, device=x.device, dtype=torch.float32)
    tile_forward_kernel[(n_row_blocks, splits)](
        x, weight, bias if bias is not None else x, labels, part, n, vocab, h,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        blocks_per_split=blocks_per_split, HAS_BIAS=bias is not None, HAS_SOFTCAP=opts.has_softcap,
        HAS_SMOOTHING=opts.has_smoothing, DOT_PRECISION=dot_precision(x.dtype), UPCAST=upcast_dot(x.dtype),
        **_scalar_args(opts), **cfg)
    out = torch.empty(N_STATE, n, device=x.device, dtype=torch.float32)
    mcfg = kernel_config("merge_splits", x.dtype)
    merge_splits_kernel[(triton.cdiv(n, mcfg["BLOCK"]),)](part, out, n, splits, **mcfg)
    lse, label_logit, sum_logits, entropy, max_logit = out.unbind(0)
    return RowStats(lse=lse, label_logit=label_logit, sum_logits=sum_logits, entropy=entropy, max_logit=max_logit)


def tile_backward(x, weight, bias, labels, lse, row_scale, opts: HeadOptions, grads: GradRequest) -> HeadGrads:
    n, h = x.shape
    vocab = weight.shape[0]
    f32 = dict(device=x.device, dtype=torch.float32)
    dx = torch.zeros(n, h, **f32) if grads.hidden else None
    dw = torch.zeros(vocab, h, **f32) if grads.weight else None
    db = torch.zeros(vocab, **f32) if grads.bias and bias is not None else None
    if n:
        cfg = kernel_config("tile_backward", x.dtype)
        grid = (triton.cdiv(n, cfg["BLOCK_M"]) * triton.cdiv(vocab, cfg["BLOCK_N"]),)
        dummy = lse
        tile_backward_kernel[grid](
            x, weight, bias if bias is not None else x, labels, lse, row_scale.float().contiguous(),
            dx if dx is not None else dummy, dw if dw is not None else dummy, db if db is not None else dummy,
            n, vocab, h, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            HAS_BIAS=bias is not None, HAS_SOFTCAP=opts.has_softcap, COMPUTE_DX=dx is not None,
            COMPUTE_DW=dw is not None, COMPUTE_DB=db is not None, DOT_PRECISION=dot_precision(x.dtype),
            UPCAST=upcast_dot(x.dtype),
            **_scalar_args(opts), **_grad_args(opts), **cfg)
    return HeadGrads(hidden=None if dx is None else dx.to(x.dtype), weight=dw, bias=db)


def _kd_scalars(opts: HeadOptions) -> dict:
    mode = kd_mode(opts)
    return dict(inv_temp=1.0 / opts.kd_temperature, log_beta=math.log(opts.jsd_beta) if mode == 3 else 0.0,
                log_1m_beta=math.log(1.0 - opts.jsd_beta) if mode == 3 else 0.0)


def _teacher_args(x, weight, teacher) -> tuple:
    if not teacher.dense:
        raise ValueError("a sparse (top-k) teacher runs on the chunked strategies; use strategy='chunked'")
    _check_int32_offsets(teacher.hidden, teacher.weight)
    th, tw = teacher.hidden, teacher.weight
    return (th, tw, teacher.bias if teacher.bias is not None else th), \
        (th.shape[1], th.stride(0), th.stride(1), tw.stride(0), tw.stride(1))


def tile_distill_forward(x, weight, bias, labels, teacher, opts: HeadOptions):
    """Statistics with the per-row KD, and the per-row terms the backward needs (5 x n)."""
    from .tile_distill import (
        N_FINAL,
        N_PARTIAL,
        merge_distill_splits_kernel,
        tile_distill_forward_kernel,
        tile_jsd_kernel,
    )

    _check_int32_offsets(x, weight)
    n, h = x.shape
    vocab = weight.shape[0]
    t_ptrs, t_dims = _teacher_args(x, weight, teacher)
    cfg = kernel_config("tile_distill_forward", x.dtype)
    n_row_blocks, splits, blocks_per_split = _vocab_splits(n, vocab, cfg, x.device)
    common = (x, weight, bias if bias is not None else x, *t_ptrs)
    shapes = (n, vocab, h, t_dims[0], x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), *t_dims[1:])
    flags = dict(HAS_BIAS=bias is not None, HAS_TEACHER_BIAS=teacher.bias is not None, HAS_SOFTCAP=opts.has_softcap,
                 DOT_PRECISION=dot_precision(x.dtype), UPCAST=upcast_dot(x.dtype))
    kd = _kd_scalars(opts)
    part = torch.empty(N_PARTIAL, splits, n, device=x.device, dtype=torch.float32)
    tile_distill_forward_kernel[(n_row_blocks, splits)](
        *common, labels, part, *shapes, softcap=float(opts.softcap or 1.0), logit_scale=float(opts.logit_scale),
            inv_temp=kd["inv_temp"],
        blocks_per_split=blocks_per_split, HAS_SMOOTHING=opts.has_smoothing, **flags, **cfg)
    final = torch.empty(N_FINAL, n, device=x.device, dtype=torch.float32)
    mcfg = kernel_config("merge_distill_splits", x.dtype)
    merge_distill_splits_kernel[(triton.cdiv(n, mcfg["BLOCK"]),)](part, final, n, splits, **mcfg)
    lse, label_logit, sum_logits, entropy, max_logit, lse_s, lse_t, kl_forward, kl_reverse = final.unbind(0)
    mode = kd_mode(opts)
    kl_pm = torch.zeros_like(lse)
    if mode == 1:
        kd_value = kl_forward
    elif mode == 2:
        kd_value = kl_reverse
    else:
        jcfg = kernel_config("tile_jsd", x.dtype)
        j_row_blocks, j_splits, j_per_split = _vocab_splits(n, vocab, jcfg, x.device)
        jpart = torch.empty(2, j_splits, n, device=x.device, dtype=torch.float32)
        tile_jsd_kernel[(j_row_blocks, j_splits)](
            *common, lse_s, lse_t, jpart, *shapes, softcap=float(opts.softcap or 1.0),
            logit_scale=float(opts.logit_scale), blocks_per_split=j_per_split, **kd, **flags, **jcfg)
        kl_pm, kl_qm = jpart.sum(1).unbind(0)
        kd_value = opts.jsd_beta * kl_qm + (1.0 - opts.jsd_beta) * kl_pm
    stats = RowStats(lse=lse, label_logit=label_logit, sum_logits=sum_logits, entropy=entropy, max_logit=max_logit,
                     kd=kd_value)
    return stats, torch.stack([lse, lse_s, lse_t, kl_reverse, kl_pm])


def tile_distill_backward(x, weight, bias, labels, aux, teacher, row_scale, opts: HeadOptions,
                          grads: GradRequest) -> HeadGrads:
    from .tile_distill import tile_distill_backward_kernel

    n, h = x.shape
    vocab = weight.shape[0]
    t_ptrs, t_dims = _teacher_args(x, weight, teacher)
    f32 = dict(device=x.device, dtype=torch.float32)
    dx = torch.zeros(n, h, **f32) if grads.hidden else None
    dw = torch.zeros(vocab, h, **f32) if grads.weight else None
    db = torch.zeros(vocab, **f32) if grads.bias and bias is not None else None
    if n:
        cfg = kernel_config("tile_distill_backward", x.dtype)
        grid = (triton.cdiv(n, cfg["BLOCK_M"]) * triton.cdiv(vocab, cfg["BLOCK_N"]),)
        t2 = opts.kd_temperature ** 2 if opts.kd_t2_scaling else 1.0
        tile_distill_backward_kernel[grid](
            x, weight, bias if bias is not None else x, *t_ptrs, labels, aux.contiguous(),
            row_scale.float().contiguous(), dx if dx is not None else aux, dw if dw is not None else aux,
            db if db is not None else aux, n, vocab, h, t_dims[0], x.stride(0), x.stride(1), weight.stride(0),
            weight.stride(1), *t_dims[1:], softcap=float(opts.softcap or 1.0), logit_scale=float(opts.logit_scale),
            kd_coef=opts.kd_weight * t2,
            beta=float(opts.jsd_beta), KD_MODE=kd_mode(opts), HAS_BIAS=bias is not None,
            HAS_TEACHER_BIAS=teacher.bias is not None, HAS_SOFTCAP=opts.has_softcap, COMPUTE_DX=dx is not None,
            COMPUTE_DW=dw is not None, COMPUTE_DB=db is not None, DOT_PRECISION=dot_precision(x.dtype),
            UPCAST=upcast_dot(x.dtype), **_kd_scalars(opts),
            **_grad_args(opts), **cfg)
    return HeadGrads(hidden=None if dx is None else dx.to(x.dtype), weight=dw, bias=db)


class TileEngine:
    """Triton tile strategy: forward tile kernel (1 matmul), backward tile kernel (3 more).
    With a teacher: both heads' tiles side by side (tile_distill.py); the backward recomputes
    the forward's per-row terms first (one more forward of both heads)."""

    fuses_backward = False

    def forward(self, x, weight, bias, labels, opts: HeadOptions, row_scale=None,
                grads: GradRequest = GradRequest(), teacher=None):
        want_grads = row_scale is not None and grads.any
        if teacher is not None:
            stats, aux = tile_distill_forward(x, weight, bias, labels, teacher, opts)
            head_grads = tile_distill_backward(x, weight, bias, labels, aux, teacher, row_scale, opts, grads) \
                if want_grads else None
            return stats, head_grads
        stats = tile_forward(x, weight, bias, labels, opts)
        head_grads = None
        if want_grads:
            head_grads = tile_backward(x, weight, bias, labels, stats.lse, row_scale, opts, grads)
        return stats, head_grads

    def backward(self, x, weight, bias, labels, lse, row_scale, opts: HeadOptions, grads: GradRequest,
                 teacher=None):
        if teacher is not None:
            _, aux = tile_distill_forward(x, weight, bias, labels, teacher, opts)
            return tile_distill_backward(x, weight, bias, labels, aux, teacher, row_scale, opts, grads)
        return tile_backward(x, weight, bias, labels, lse, row_scale, opts, grads)


KD_MODES = {"forward_kl": 1, "reverse_kl": 2, "jsd": 3}


def kd_mode(opts: HeadOptions) -> int:
    """The distillation kernel's KD_MODE; JSD with beta 0 / 1 is the forward / reverse KL."""
    if opts.kd_loss == "jsd" and opts.jsd_beta in (0.0, 1.0):
        return 1 if opts.jsd_beta == 0.0 else 2
    return KD_MODES[opts.kd_loss]


class TritonEpilogue:
    """The chunked strategy's per-chunk epilogue as one Triton kernel (see chunk_epilogue.py)."""

    bytes_per_logit = 6  # the fp32 logits, plus a half-precision gradient buffer for half inputs
    distill_bytes_per_logit = 10  # both heads' fp32 logits and the half gradient

    def distill(self, logits, labels, teacher_logits, teacher, row_scale, opts: HeadOptions, out_dtype):
        """Student + dense teacher chunk in one kernel (distill_epilogue.py); a sparse teacher's
        divergence over its top-k support runs in PyTorch on the same chunk."""
        if not teacher.dense:
            from ..backends.distill import distill_chunk

            return distill_chunk(logits, labels, None, teacher, row_scale, opts, out_dtype)
        from .distill_epilogue import distill_epilogue_kernel

        rows, width = logits.shape
        grad = row_scale is not None
        dz = (logits if out_dtype == torch.float32 else torch.empty(rows, width, device=logits.device,
                                                                    dtype=out_dtype)) if grad else None
        out = torch.empty(6, rows, device=logits.device, dtype=torch.float32)
        cfg = kernel_config("distill_epilogue", out_dtype)
        t2 = opts.kd_temperature ** 2 if opts.kd_t2_scaling else 1.0
        mode = kd_mode(opts)
        distill_epilogue_kernel[(triton.cdiv(rows, cfg["BLOCK_R"]),)](
            logits, teacher_logits, logits.stride(0), teacher_logits.stride(0), dz if grad else logits,
            dz.stride(0) if grad else 0, labels, row_scale.float().contiguous() if grad else logits, out,
            rows, width,
            softcap=float(opts.softcap or 1.0), logit_scale=float(opts.logit_scale),
            kd_coef=opts.kd_weight * t2, inv_temp=1.0 / opts.kd_temperature,
            beta=float(opts.jsd_beta), log_beta=math.log(opts.jsd_beta) if mode == 3 else 0.0,
            log_1m_beta=math.log(1.0 - opts.jsd_beta) if mode == 3 else 0.0, KD_MODE=mode, GRAD=grad,
            HAS_SOFTCAP=opts.has_softcap, HAS_SMOOTHING=opts.has_smoothing, **_grad_args(opts), **cfg)
        lse, label_logit, sum_logits, entropy, max_logit, kd = out.unbind(0)
        return RowStats(lse=lse, label_logit=label_logit, sum_logits=sum_logits, entropy=entropy,
                        max_logit=max_logit, kd=kd), dz

    def _launch(self, logits, labels, col0, opts, *, state: Optional[OnlineState] = None, lse=None,
                row_scale=None, out_dtype=None):
        rows, width = logits.shape
        grad = row_scale is not None
        dz = None
        if grad:
            dz = logits if out_dtype == torch.float32 else torch.empty(rows, width, device=logits.device,
                                                                       dtype=out_dtype)
        cfg = kernel_config("chunk_epilogue", out_dtype or torch.float32)
        dummy = logits
        st = state or OnlineState(0, logits.device)
        chunk_epilogue_kernel[(triton.cdiv(rows, cfg["BLOCK_R"]),)](
            logits, logits.stride(0), dz if dz is not None else dummy, dz.stride(0) if dz is not None else 0,
            labels, st.m if state else dummy, st.d if state else dummy, st.u if state else dummy,
            st.label_logit if state else dummy, st.sum_logits if state else dummy,
            lse if lse is not None else dummy, row_scale.float().contiguous() if grad else dummy,
            rows, width, col0, ACCUMULATE=state is not None, GRAD=grad, HAS_SOFTCAP=opts.has_softcap,
            HAS_SMOOTHING=opts.has_smoothing, **_scalar_args(opts), **_grad_args(opts), **cfg)
        return dz

    def accumulate(self, logits, labels, col0, state, opts):
        self._launch(logits, labels, col0, opts, state=state)

    def gradient(self, logits, labels, col0, lse, row_scale, opts, out_dtype):
        return self._launch(logits, labels, col0, opts, lse=lse.contiguous(), row_scale=row_scale,
                            out_dtype=out_dtype)

    def accumulate_and_gradient(self, logits, labels, state, row_scale, opts, out_dtype):
        return self._launch(logits, labels, 0, opts, state=state, row_scale=row_scale, out_dtype=out_dtype)
