"""The eager reference: the same function as the fused op, written the obvious way.

It materializes the full [tokens x vocab] logits (in float64 by default), so it is only
for tests, the benchmarks' error columns and small inputs; with ``dtype=None`` and
``with_stats=False`` it is also the benchmarks' "eager PyTorch" provider (the matmul in the inputs'
dtype, the rest in float32, as a user writes it). It shares no code with the backends on
purpose: cross-entropy and its label smoothing come from ``torch.nn.functional.cross_entropy``,
the divergences from their definitions.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def reference_t3s_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                       bias: Optional[torch.Tensor] = None, token_weights: Optional[torch.Tensor] = None,
                       ce_weight: float = 1.0, ignore_index: int = -100, label_smoothing: float = 0.0,
                       z_loss: float = 0.0, softcap: Optional[float] = None, logit_scale: float = 1.0,
                       temperature: float = 1.0,
                       reduction: str = "mean", normalizer=None,
                       teacher_logits: Optional[torch.Tensor] = None, kd_weight: float = 0.0,
                       kd_loss: str = "forward_kl", jsd_beta: float = 0.5, kd_temperature: float = 1.0,
                       kd_t2_scaling: bool = False,
                       dtype: Optional[torch.dtype] = torch.float64,
                       round_logits: Optional[torch.dtype] = None,
                       with_stats: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss (differentiable w.r.t. hidden/weight/bias in ``dtype``) and the detached statistics.

    ``temperature`` divides the logits of the statistics only, as in ``token_stats``. A dense
    teacher is given by its logits ``teacher_logits`` (..., V) (softcapped as the student's, without
    its logit scale); the statistics then include the per-token ``kd``. ``dtype=None``: the matmul
    in the inputs' dtype and the rest in float32. ``round_logits``: the logits ``hidden @ weight.T +
    bias`` rounded to that dtype, as a model that computes them in its own dtype has them (the
    gradient passes through the rounding unchanged). ``with_stats=False`` returns no statistics.
    """
    lead = labels.shape
    y = labels.reshape(-1)
    if dtype is None:
        z = (hidden.reshape(-1, hidden.shape[-1]) @ weight.t()).float()
        dtype = torch.float32
        if bias is not None:
            z = z + bias.float()
    else:
        z = hidden.reshape(-1, hidden.shape[-1]).to(dtype) @ weight.to(dtype).t()
        if bias is not None:
            z = z + bias.to(dtype)
    if round_logits is not None:
        z = z + (z.detach().to(round_logits).to(dtype) - z.detach())
    cap = (lambda v: softcap * torch.tanh(v / softcap)) if softcap is not None else (lambda v: v)
    z = cap(z) * logit_scale
    valid = y != ignore_index
    safe_y = torch.where(valid, y, torch.zeros_like(y))

    ce = F.cross_entropy(z, y, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none")
    per_token = ce_weight * ce
    if z_loss:
        per_token = per_token + z_loss * torch.logsumexp(z, dim=-1).square()
    kd = None
    if teacher_logits is not None:
        t = cap(teacher_logits.reshape(-1, z.shape[-1]).to(dtype)).detach()
        kd = divergence(torch.log_softmax(z / kd_temperature, -1), torch.log_softmax(t / kd_temperature, -1),
                        kd_loss, jsd_beta)
        per_token = per_token + kd_weight * (kd_temperature ** 2 if kd_t2_scaling else 1.0) * kd
    w = torch.ones_like(ce) if token_weights is None else token_weights.reshape(-1).to(dtype)
    contributing = valid & (w != 0)
    per_token = torch.where(contributing, w * per_token, torch.zeros_like(per_token))

    if reduction == "none":
        loss = per_token.view(lead)
    else:
        total = per_token.sum()
        if normalizer is not None:
            loss = total / normalizer
        elif reduction == "mean":
            loss = total / contributing.sum().clamp(min=1)
        else:
            loss = total

    if not with_stats:
        return loss, {}
    with torch.no_grad():
        s = z / temperature
        logp = torch.log_softmax(s, dim=-1)
        label_logp = logp.gather(1, safe_y[:, None]).squeeze(1)
        entropy = -(logp.exp() * logp).sum(-1)
        correct = s.gather(1, safe_y[:, None]).squeeze(1) >= s.max(-1).values
        stat_lse = torch.logsumexp(s, dim=-1)
        zero = torch.zeros_like(stat_lse)
        stats = {
            "logprob": torch.where(valid, label_logp, zero).view(lead),
            "entropy": torch.where(valid, entropy, zero).view(lead),
            "correct": (valid & correct).view(lead),
            "lse": torch.where(valid, stat_lse, zero).view(lead),
        }
        if kd is not None:
            stats["kd"] = torch.where(valid, kd.detach(), zero).view(lead)
    return loss, stats


def divergence(log_p: torch.Tensor, log_q: torch.Tensor, kd_loss: str, beta: float) -> torch.Tensor:
    """Per-row KL(q || p) ("forward_kl"), KL(p || q) ("reverse_kl"), or the generalized JSD
    ``beta KL(q || m) + (1 - beta) KL(p || m)``, ``m = (1 - beta) p + beta q`` (beta 0 / 1: the two KLs)."""
    p, q = log_p.exp(), log_q.exp()
    if kd_loss == "forward_kl" or (kd_loss == "jsd" and beta == 0):
        return (q * (log_q - log_p)).sum(-1)
    if kd_loss == "reverse_kl" or (kd_loss == "jsd" and beta == 1):
        return (p * (log_p - log_q)).sum(-1)
    log_m = ((1 - beta) * p + beta * q).log()
    return beta * (q * (log_q - log_m)).sum(-1) + (1 - beta) * (p * (log_p - log_m)).sum(-1)
