"""The Triton engines over the kernels' launchers (ops/): the forward tile kernel (statistics only),
and the chunked engine's Triton epilogue. Here a head's options (``HeadOptions``) become the
kernels' scalar arguments, and their output planes become ``RowStats``."""

from __future__ import annotations

import math
from typing import Optional

from ..ops.chunk_epilogue import chunk_epilogue
from ..ops.distill_epilogue import distill_epilogue
from ..ops.merge_splits import STATE_PLANES
from ..ops.tile_forward import tile_forward
from ..options import GradRequest, HeadOptions
from .base import OnlineState, RowStats, grad_scalars, head_scalars
from .distill import distill_chunk

KD_MODES = {"forward_kl": 1, "reverse_kl": 2, "jsd": 3}


def kd_mode(opts: HeadOptions) -> int:
    """The distillation kernels' KD_MODE; JSD with beta 0 / 1 is the forward / reverse KL."""
    if opts.kd_loss == "jsd" and opts.jsd_beta in (0.0, 1.0):
        return 1 if opts.jsd_beta == 0.0 else 2
    return KD_MODES[opts.kd_loss]


def kd_scalars(opts: HeadOptions) -> dict:
    """The distillation epilogue's KD scalars: the KD term's coefficient (``HeadOptions.kd_coef``),
    beta, inv_temp, and log(beta), log(1 - beta) for the JSD (finite there: 0 < beta < 1)."""
    jsd = kd_mode(opts) == 3
    return dict(kd_coef=opts.kd_coef, beta=float(opts.jsd_beta), inv_temp=1.0 / opts.kd_temperature,
                log_beta=math.log(opts.jsd_beta) if jsd else 0.0,
                log_1m_beta=math.log(1.0 - opts.jsd_beta) if jsd else 0.0)


def row_stats(planes, kd=None) -> RowStats:
    """``RowStats`` from a kernel's final-state planes (``STATE_PLANES`` order)."""
    return RowStats(**dict(zip(STATE_PLANES, planes)), kd=kd)


class TileForwardEngine:
    """Forward only, by the forward tile kernel (ops/tile_forward.py): one matmul's FLOPs, the logits
    never stored, O(N) memory. What ``token_stats`` runs on Triton; it computes no gradient."""

    fuses_backward = False

    def forward(self, x, weight, bias, labels, opts: HeadOptions, row_scale=None,
                grads: GradRequest = GradRequest(), teacher=None):
        if teacher is not None or (row_scale is not None and grads.any):
            raise ValueError("the forward tile kernel gives statistics only: no teacher, no gradient")
        return row_stats(tile_forward(x, weight, bias, labels, head_scalars(opts), opts.has_softcap,
                                      opts.has_smoothing)), None

    def backward(self, *args, **kwargs):
        raise ValueError("the forward tile kernel gives statistics only: no gradient")


class TritonEpilogue:
    """The chunked engine's per-chunk epilogue as one Triton kernel (ops/chunk_epilogue.py)."""

    bytes_per_logit = 6  # the fp32 logits, plus a half-precision gradient buffer for half inputs
    distill_bytes_per_logit = 10  # both heads' fp32 logits and the half gradient
    reads_half_logits = True  # upcast as loaded; dL/dz written over them

    def distill(self, logits, labels, teacher_logits, teacher, row_scale, opts: HeadOptions, out_dtype):
        """Student + dense teacher chunk in one kernel (ops/distill_epilogue.py); a sparse teacher's
        divergence over its top-k support runs in PyTorch on the same chunk."""
        if not teacher.dense:
            return distill_chunk(logits, labels, None, teacher, row_scale, opts, out_dtype)
        scalars = {**head_scalars(opts), **grad_scalars(opts), **kd_scalars(opts)}
        out, dz = distill_epilogue(logits, teacher_logits, labels, row_scale, scalars, kd_mode(opts),
                                   opts.has_softcap, opts.has_smoothing, out_dtype)
        return row_stats(out[:len(STATE_PLANES)], kd=out[len(STATE_PLANES)]), dz

    def _launch(self, logits, labels, col0, opts, *, state: Optional[OnlineState] = None, lse=None,
                row_scale=None, out_dtype=None):
        return chunk_epilogue(logits, labels, col0, {**head_scalars(opts), **grad_scalars(opts)}, opts.has_softcap,
                              opts.has_smoothing, state=None if state is None else state.planes, lse=lse,
                              row_scale=row_scale, out_dtype=out_dtype)

    def accumulate(self, logits, labels, col0, state, opts):
        self._launch(logits, labels, col0, opts, state=state)

    def gradient(self, logits, labels, col0, lse, row_scale, opts, out_dtype):
        return self._launch(logits, labels, col0, opts, lse=lse.contiguous(), row_scale=row_scale,
                            out_dtype=out_dtype)

    def accumulate_and_gradient(self, logits, labels, state, row_scale, opts, out_dtype):
        return self._launch(logits, labels, 0, opts, state=state, row_scale=row_scale, out_dtype=out_dtype)
