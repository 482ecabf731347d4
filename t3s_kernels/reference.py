"""The eager reference: the same function as the fused op, written the obvious way.

It materializes the full [tokens x vocab] logits (in float64 by default), so it is only
for tests, the benchmark's error column and small inputs. It shares no code with the
backends on purpose: cross-entropy and its label smoothing come from
``torch.nn.functional.cross_entropy``.
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
                       dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss (differentiable w.r.t. hidden/weight/bias in ``dtype``) and the detached statistics.

    ``temperature`` divides the logits of the statistics only, as in ``token_stats``.
    """
    lead = labels.shape
    x = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    y = labels.reshape(-1)
    z = x @ weight.to(dtype).t()
    if bias is not None:
        z = z + bias.to(dtype)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z * logit_scale
    valid = y != ignore_index
    safe_y = torch.where(valid, y, torch.zeros_like(y))

    ce = F.cross_entropy(z, y, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none")
    lse = torch.logsumexp(z, dim=-1)
    per_token = ce_weight * ce + z_loss * lse.square()
    w = torch.ones_like(lse) if token_weights is None else token_weights.reshape(-1).to(dtype)
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
    return loss, stats
