"""The autograd function around a backend: compaction, token weights, reductions.

Rows are sorted into three kinds before any matmul:
  * ignored (label == ignore_index): never reach the head; statistics 0.
  * scored only (weight 0): forward only, for their statistics.
  * contributing: forward, and the only rows any backward matmul sees.
So the backward cost scales with the selected fraction of tokens.

For "mean"/"sum" the upstream gradient is a scalar, so a backend that fuses the backward
into its forward pass (the chunked strategies) computes dX, dW for ``g_i = w_i / divisor``
right away and the backward only rescales them. For "none", and for the tile strategy,
the backward runs from the saved logsumexp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .backends.base import Engine, HeadGrads, RowStats, per_token_loss
from .options import GradRequest, HeadOptions


@dataclass(frozen=True)
class LossConfig:
    engine: Engine
    opts: HeadOptions
    ignore_index: int
    reduction: str
    normalizer: Optional[float]
    grad_enabled: bool = True  # grad mode where the op was called: without it, no gradient is computed


def _scatter_rows(values: torch.Tensor, index: Optional[torch.Tensor], n: int) -> torch.Tensor:
    """Place per-row ``values`` of the compacted rows at ``index`` in a zero [n, ...] tensor."""
    if index is None:
        return values
    out = values.new_zeros((n,) + values.shape[1:])
    out[index] = values
    return out


def _select(t: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
    return t if index is None else t[index]


def scatter_stats(parts: "list[tuple[RowStats, torch.Tensor]]", n: int, device: torch.device):
    """(lse, logprob, entropy, correct, kd) over all n rows from the statistics of row subsets;
    0 / False at rows no part covers (ignored labels)."""
    f32 = dict(device=device, dtype=torch.float32)
    lse, logprob, entropy, kd = (torch.zeros(n, **f32) for _ in range(4))
    correct = torch.zeros(n, device=device, dtype=torch.bool)
    for st, idx in parts:
        lse[idx], logprob[idx], entropy[idx] = st.lse, st.label_logit - st.lse, st.entropy
        correct[idx] = st.label_logit >= st.max_logit
        if st.kd is not None:
            kd[idx] = st.kd
    return lse, logprob, entropy, correct, kd


def no_autocast(device: torch.device):
    """The backends choose their own precisions; an outer autocast must not recast their matmuls."""
    return torch.autocast(device.type, enabled=False)


class FusedLinearT3SFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, labels, token_weights, cfg: LossConfig, teacher=None):
        with no_autocast(x.device):
            return FusedLinearT3SFunction._forward(ctx, x, weight, bias, labels, token_weights, cfg, teacher)

    @staticmethod
    @once_differentiable  # a gradient of the gradient would be silently wrong: PyTorch raises instead
    def backward(ctx, grad_loss, *_unused_stat_grads):
        with no_autocast(grad_loss.device):
            return FusedLinearT3SFunction._backward(ctx, grad_loss)

    @staticmethod
    def _forward(ctx, x, weight, bias, labels, token_weights, cfg: LossConfig, teacher):
        n = x.shape[0]
        # The teacher's rows follow the student's through every compaction; it gets no gradient.
        teacher_kw = (lambda index: {} if teacher is None else {"teacher": teacher.rows(index)})  # noqa: E731
        on = cfg.grad_enabled
        grads = GradRequest(hidden=on and ctx.needs_input_grad[0], weight=on and ctx.needs_input_grad[1],
                            bias=on and bias is not None and ctx.needs_input_grad[2])
        valid = labels != cfg.ignore_index
        contributing = valid if token_weights is None else valid & (token_weights != 0)
        n_contrib = int(contributing.sum())
        n_valid = int(valid.sum())
        # index None means "all n rows", which skips a gather of the hidden states.
        contrib_idx = None if n_contrib == n else contributing.nonzero().squeeze(1)
        if cfg.normalizer is not None:
            if cfg.normalizer == 0 and n_contrib:  # 0 is HF's count for a step without label tokens
                raise ValueError(f"normalizer is 0 but {n_contrib} tokens contribute to the loss")
            divisor = cfg.normalizer if cfg.normalizer != 0 else 1.0
        elif cfg.reduction == "mean":
            divisor = float(max(n_contrib, 1))
        else:
            divisor = 1.0

        row_w = torch.ones(n_contrib, device=x.device) if token_weights is None \
            else _select(token_weights, contrib_idx).float()
        eager_grads = grads.any and cfg.engine.fuses_backward and cfg.reduction != "none" and n_contrib > 0
        x_c, y_c = _select(x, contrib_idx), _select(labels, contrib_idx)

        stats_parts, index_parts = [], []
        head_grads: Optional[HeadGrads] = None
        if n_contrib:
            st, head_grads = cfg.engine.forward(x_c, weight, bias, y_c, cfg.opts,
                                                row_scale=row_w / divisor if eager_grads else None, grads=grads,
                                                **teacher_kw(contrib_idx))
            stats_parts.append(st)
            index_parts.append(contributing.nonzero().squeeze(1) if contrib_idx is None else contrib_idx)
        if n_valid > n_contrib:
            scored_idx = (valid & ~contributing).nonzero().squeeze(1)
            st, _ = cfg.engine.forward(x[scored_idx], weight, bias, labels[scored_idx], cfg.opts,
                                       **teacher_kw(scored_idx))
            stats_parts.append(st)
            index_parts.append(scored_idx)

        lse, logprob, entropy, correct, kd = scatter_stats(list(zip(stats_parts, index_parts)), n, x.device)
        per_row = torch.zeros(n, device=x.device, dtype=torch.float32)
        if n_contrib:
            contrib_stats = stats_parts[0]
            per_row[index_parts[0]] = row_w * per_token_loss(contrib_stats, cfg.opts)
        loss = per_row if cfg.reduction == "none" else per_row.sum() / divisor

        ctx.cfg, ctx.n, ctx.grads, ctx.divisor = cfg, n, grads, divisor
        ctx.contrib_idx, ctx.n_contrib, ctx.eager = contrib_idx, n_contrib, eager_grads
        # Shapes of the inputs, for the all-zero gradients of a batch with no contributing token.
        ctx.input_meta = [(t.shape, t.dtype, t.device) if t is not None else None for t in (x, weight, bias)]
        if eager_grads:
            # Keep dW in the weight's dtype between forward and backward: half the memory. Saved as
            # tensors for backward, so PyTorch frees them after it (unless retain_graph) and refuses
            # a second backward as it does for any graph.
            cast = head_grads.cast(weight.dtype, None if bias is None else bias.dtype)
            ctx.head_grad_present = [g is not None for g in (cast.hidden, cast.weight, cast.bias)]
            ctx.save_for_backward(*(g for g in (cast.hidden, cast.weight, cast.bias) if g is not None))
        elif grads.any and n_contrib:
            lse_c = stats_parts[0].lse
            ctx.save_for_backward(x_c, weight, bias, y_c, lse_c, row_w)
            ctx.teacher_kw = teacher_kw(contrib_idx)
        ctx.mark_non_differentiable(logprob, entropy, correct, lse, kd)
        return loss, logprob, entropy, correct, lse, kd

    @staticmethod
    def _backward(ctx, grad_loss):
        cfg, n, grads = ctx.cfg, ctx.n, ctx.grads
        if ctx.n_contrib == 0:
            hg = None
        elif ctx.eager:
            saved = iter(ctx.saved_tensors)
            hg = HeadGrads(*(next(saved) if present else None for present in ctx.head_grad_present)).scaled(grad_loss)
        else:
            x_c, weight, bias, y_c, lse_c, row_w = ctx.saved_tensors
            if cfg.reduction == "none":
                row_scale = _select(grad_loss, ctx.contrib_idx).float() * row_w
            else:
                row_scale = grad_loss.float() * row_w / ctx.divisor
            hg = cfg.engine.backward(x_c, weight, bias, y_c, lse_c, row_scale, cfg.opts, grads,
                                     **ctx.teacher_kw).cast(weight.dtype, None if bias is None else bias.dtype)
        if hg is None:
            wants = (grads.hidden, grads.weight, grads.bias)
            hg = HeadGrads(*(torch.zeros(meta[0], dtype=meta[1], device=meta[2]) if want else None
                             for want, meta in zip(wants, ctx.input_meta)))
        else:
            hg.hidden = None if hg.hidden is None else _scatter_rows(hg.hidden, ctx.contrib_idx, n)
        dx = hg.hidden if grads.hidden else None
        dw = hg.weight if grads.weight else None
        db = hg.bias if grads.bias else None
        return dx, dw, db, None, None, None, None
