"""What every backend returns, and the online-softmax state in PyTorch form.

The state of one row over the vocabulary columns seen so far:
    m = max_j s_j,  d = sum_j exp(s_j - m),  u = sum_j exp(s_j - m) * (s_j - m)
Two states merge exactly (the online logsumexp); at the end
    lse = m + log d,  entropy = log d - u / d.
Keeping ``u`` relative to ``m`` (not ``sum p_j s_j``) keeps the entropy exact when the
logits are large. The Triton twin of this merge is ``ops/online_softmax.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from ..options import GradRequest, HeadOptions


@dataclass
class RowStats:
    """Per-row float32 results of one pass over the vocabulary."""

    lse: torch.Tensor
    label_logit: torch.Tensor
    sum_logits: torch.Tensor  # only meaningful with label smoothing, zeros otherwise
    entropy: torch.Tensor
    max_logit: torch.Tensor
    kd: Optional[torch.Tensor] = None  # the per-row distillation divergence, when a teacher is given

    @staticmethod
    def cat(parts: "list[RowStats]") -> "RowStats":
        def join(name):
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values)

        return RowStats(*(join(f) for f in RowStats.__dataclass_fields__))


def per_token_loss(stats: RowStats, opts: HeadOptions) -> torch.Tensor:
    """l_i = ce_weight * CE_eps + z_loss * lse^2 (+ kd_weight * KD) from a row's statistics: the loss
    formula, once (differentiable when the statistics are)."""
    eps = opts.label_smoothing
    ce = stats.lse - (1.0 - eps) * stats.label_logit
    if opts.has_smoothing:
        ce = ce - (eps / opts.vocab_size) * stats.sum_logits
    loss = opts.ce_weight * ce
    if opts.z_loss:
        loss = loss + opts.z_loss * stats.lse.square()
    if stats.kd is not None and opts.kd_weight:
        loss = loss + opts.kd_coef * stats.kd
    return loss


def head_scalars(opts: HeadOptions) -> dict:
    """The head's transform as the native kernels take it, by their parameters' names (Triton's and
    cpu_epilogue.cpp's)."""
    return dict(softcap=float(opts.softcap or 1.0), logit_scale=float(opts.logit_scale))


def grad_scalars(opts: HeadOptions) -> dict:
    """The loss gradient's scalars as the native kernels take them, by their parameters' names."""
    return dict(ce_weight=float(opts.ce_weight), smoothing=float(opts.label_smoothing),
                inv_vocab=1.0 / opts.vocab_size, z_loss=float(opts.z_loss))


@dataclass
class HeadGrads:
    """Gradients of sum_i g_i * l_i over the rows a backend was given (None where not requested)."""

    hidden: Optional[torch.Tensor]  # [rows, H], dtype of hidden
    weight: Optional[torch.Tensor]  # [V, H], the accumulator: float32, or the weight's dtype (grad_accum_dtype)
    bias: Optional[torch.Tensor]  # [V], likewise

    def cast(self, weight_dtype: torch.dtype, bias_dtype: Optional[torch.dtype]) -> "HeadGrads":
        """The accumulators in the parameters' dtypes (dX already is in the hidden states')."""
        return HeadGrads(hidden=self.hidden, weight=None if self.weight is None else self.weight.to(weight_dtype),
                         bias=None if self.bias is None else self.bias.to(bias_dtype))

    # Both scalings multiply in float32 and round once to each gradient's dtype. A scale rounded to
    # bf16 first would bias every element alike (1/3 becomes 0.33398: +0.2%), and fp16 has no 65536,
    # the scale a GradScaler starts at.

    def scale_(self, scale: float) -> "HeadGrads":
        """Times ``scale``, in place: no second dW at the backward's peak."""
        for g in (self.hidden, self.weight, self.bias):
            if g is not None:
                g.mul_(scale)  # a Python scale: the product is formed in float32 for bf16 / fp16
        return self

    def scaled(self, scale: torch.Tensor) -> "HeadGrads":
        """Times the 0-dim ``scale``, out of place (under torch.compile, which fuses the upcast, the
        product and the rounding into one kernel and reads no value on the host)."""
        return HeadGrads(*(None if g is None else (g.float() * scale.float()).to(g.dtype)
                           for g in (self.hidden, self.weight, self.bias)))


class Engine(Protocol):
    """A way to evaluate the head. Rows given to it are already compacted by the caller."""

    # True when ``forward`` with ``row_scale`` computes gradients in the same pass (the chunked
    # engine: 3 matmuls); False for an engine without a fused gradient (the forward tile kernel's
    # statistics-only engine).
    fuses_backward: bool

    # ``teacher`` (a ``distill.TeacherRows`` over the same rows) adds the distillation term.
    def forward(self, x, weight, bias, labels, opts: HeadOptions,
                row_scale: Optional[torch.Tensor] = None,
                grads: GradRequest = GradRequest(), teacher=None) -> "tuple[RowStats, Optional[HeadGrads]]": ...

    def backward(self, x, weight, bias, labels, lse, row_scale, opts: HeadOptions,
                 grads: GradRequest, teacher=None) -> HeadGrads: ...


def rescaled_state(m: torch.Tensor, d: torch.Tensor, u: torch.Tensor, m_new: torch.Tensor):
    """(d, u) of a state (m, d, u) re-expressed at a larger max ``m_new``: the terms a merge adds up
    (two states here, every rank's under tensor parallelism):
        d' = e^(m - m_new) d,   u' = e^(m - m_new) (u + (m - m_new) d).
    An empty state (d = 0, m = -inf) adds nothing: its (m - m_new) * d would be nan."""
    a = torch.exp(m - m_new)
    shift = torch.where(d > 0, m - m_new, torch.zeros_like(m_new))
    return a * d, a * (u + shift * d)


def _plane(k: int) -> property:
    """Row plane k of an ``OnlineState``; assigning writes into it (``+=`` included)."""
    return property(lambda self: self.planes[k], lambda self, value: self.planes[k].copy_(value))


class OnlineState:
    """Running softmax state of a block of rows, merged chunk by chunk over the vocabulary: the
    planes m, d, u, label_logit, sum_logits of one float32 [5, rows] tensor (``planes``, the
    layout the Triton epilogue reads and writes in place)."""

    def __init__(self, rows: int, device: torch.device):
        self.planes = torch.zeros(5, rows, device=device, dtype=torch.float32)
        self.planes[0] = float("-inf")

    m, d, u, label_logit, sum_logits = (_plane(k) for k in range(5))

    def merge(self, m_b: torch.Tensor, d_b: torch.Tensor, u_b: torch.Tensor) -> None:
        m = torch.maximum(self.m, m_b)
        d_self, u_self = rescaled_state(self.m, self.d, self.u, m)
        d_other, u_other = rescaled_state(m_b, d_b, u_b, m)
        self.d, self.u, self.m = d_self + d_other, u_self + u_other, m

    def lse(self) -> torch.Tensor:
        return self.m + torch.log(self.d)

    def finish(self) -> RowStats:
        log_d = torch.log(self.d)
        return RowStats(lse=self.m + log_d, label_logit=self.label_logit, sum_logits=self.sum_logits,
                        entropy=log_d - self.u / self.d, max_logit=self.m)
