"""Distillation in the same pass: the student's loss plus a divergence from a teacher, per token.

With ``T = kd_temperature``, student ``p = softmax(s / T)`` and teacher ``q = softmax(t / T)``
(both heads' logits after the softcap), per token:
  * ``forward_kl``: KL(q || p) = sum_j q_j (log q_j - log p_j)
  * ``reverse_kl``: KL(p || q)
  * ``jsd``: generalized JSD with mixture ``m = (1 - beta) p + beta q``:
    ``beta * KL(q || m) + (1 - beta) * KL(p || m)``; beta = 0 is the forward KL and beta = 1 the
    reverse KL (TRL's convention).
A sparse teacher (an offline top-k cache: ``teacher_topk_ids``, ``teacher_topk_logprobs`` at
temperature 1) gives the divergence over its support S, with the rest of the mass either
renormalized away (``sparse_tail="renormalize"``: both distributions restricted to S,
teacher ``q_S ~ q^(1/T)``) or kept as one tail bucket (``"bucket"``: the student's full
softmax folded into S plus one "rest" entry; the teacher's tail is ``1 - sum_S q``, both
tempered as ``q^(1/T)`` and renormalized over the K + 1 entries).

This module is the PyTorch backend of it: each token chunk holds whole vocabulary rows of
both heads (within the chunk budget) and the gradient of the chunk's loss comes from autograd
on that chunk alone, so nothing outside a chunk is ever held. The teacher gets no gradient.

Every sum, max and pick over the vocabulary goes through a ``VocabAxis``: ``WHOLE_VOCAB`` when a
row's whole vocabulary is here, ``ShardedVocab`` when the ranks of a tensor-parallel group each
hold a slice of it (backends/vocab_parallel.py). Every divergence above is a sum over the
vocabulary of terms that need only each distribution's logsumexp, so the sharded form is exact:
the logsumexps merge across ranks, then the per-rank sums add up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

from ..options import HeadOptions
from .base import RowStats, per_token_loss


class VocabAxis:
    """Reductions over the vocabulary axis (the last) of rows whose whole vocabulary is here."""

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t.sum(-1)

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return t.amax(-1)

    def pick(self, s: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``s`` at the vocabulary ids ``ids`` ((n,) or (n, K), whole-vocabulary numbering)."""
        return s.gather(1, ids[:, None]).squeeze(1) if ids.dim() == 1 else s.gather(1, ids)

    def log_softmax(self, t: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(t, -1)

    def logsumexp(self, t: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(t, -1)


WHOLE_VOCAB = VocabAxis()


@dataclass
class TeacherRows:
    """The teacher's side of a batch of rows: a dense head, or a sparse top-k cache."""

    hidden: Optional[torch.Tensor] = None  # (n, Ht)
    weight: Optional[torch.Tensor] = None  # (V, Ht)
    bias: Optional[torch.Tensor] = None  # (V,)
    topk_ids: Optional[torch.Tensor] = None  # (n, K) int64
    topk_logprobs: Optional[torch.Tensor] = None  # (n, K) float, <= 0

    @property
    def dense(self) -> bool:
        return self.hidden is not None

    def rows(self, index) -> "TeacherRows":
        """The rows ``index`` (a slice, an index tensor, or None for all)."""
        if index is None:
            return self
        pick = (lambda t: None if t is None else t[index])
        return replace(self, hidden=pick(self.hidden), topk_ids=pick(self.topk_ids),
                       topk_logprobs=pick(self.topk_logprobs))


def _xlogy_terms(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """a_j (log a_j - log b_j), 0 where a_j = 0 (and NaN where a is NaN, as eager propagates it)."""
    term = a * (log_a - log_b)
    return torch.where(a == 0, torch.zeros_like(term), term)


def kd_divergence(log_p: torch.Tensor, log_q: torch.Tensor, kd_loss: str, beta: float,
                  axis: VocabAxis = WHOLE_VOCAB) -> torch.Tensor:
    """Per-row divergence between student log-probs ``log_p`` and teacher log-probs ``log_q``,
    summed over the vocabulary by ``axis``."""
    p, q = log_p.exp(), log_q.exp()
    if kd_loss == "forward_kl" or (kd_loss == "jsd" and beta == 0.0):
        return axis.sum(_xlogy_terms(q, log_q, log_p))
    if kd_loss == "reverse_kl" or (kd_loss == "jsd" and beta == 1.0):
        return axis.sum(_xlogy_terms(p, log_p, log_q))
    log_m = torch.logaddexp(log_p + math.log(1.0 - beta), log_q + math.log(beta))
    return axis.sum(beta * _xlogy_terms(q, log_q, log_m) + (1.0 - beta) * _xlogy_terms(p, log_p, log_m))


def _softcap(z: torch.Tensor, opts: HeadOptions) -> torch.Tensor:
    return opts.softcap * torch.tanh(z / opts.softcap) if opts.has_softcap else z


def sparse_log_probs(s: torch.Tensor, ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                     opts: HeadOptions, axis: VocabAxis = WHOLE_VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) log-probabilities over the teacher's support (+ a tail bucket); these
    K (+ 1) entries are whole on every rank, whatever ``axis`` holds of the student's row."""
    inv_t = 1.0 / opts.kd_temperature
    s_support = axis.pick(s, ids) * inv_t
    if opts.sparse_tail == "renormalize":
        return torch.log_softmax(s_support, -1), torch.log_softmax(teacher_logprobs * inv_t, -1)
    lse = axis.logsumexp(s * inv_t)[:, None]
    log_p_support = s_support - lse
    p_tail = (1.0 - log_p_support.exp().sum(-1, keepdim=True)).clamp(min=1e-12)
    log_p = torch.cat([log_p_support, p_tail.log()], -1)
    q_tail = (1.0 - teacher_logprobs.exp().sum(-1, keepdim=True)).clamp(min=1e-12)
    log_q = torch.log_softmax(torch.cat([teacher_logprobs, q_tail.log()], -1) * inv_t, -1)
    return log_p, log_q


def _own_autograd():
    """Autograd for this function's own graph. Inside the fused operator (a torch.library op, below
    its autograd layer) autograd's dispatch keys are excluded; the chunk's graph is built and
    differentiated here and never seen outside, so they are re-included for it alone."""
    excluded = torch._C._dispatch_tls_local_exclude_set()
    autograd = torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradFunctionality)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded - autograd)


def distill_chunk(z: torch.Tensor, labels: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                  teacher: TeacherRows, row_scale: Optional[torch.Tensor], opts: HeadOptions,
                  out_dtype: torch.dtype, axis: VocabAxis = WHOLE_VOCAB) -> tuple[RowStats, Optional[torch.Tensor]]:
    """Statistics (with the per-row KD) of vocabulary rows ``z`` (float32 logits; whole, or this
    rank's slice with ``axis`` a ``ShardedVocab``), and dL/dz for ``L = sum_i row_scale_i * l_i``
    when ``row_scale`` is given. ``labels`` and top-k ids number the whole vocabulary."""
    want_grad = row_scale is not None
    with torch.enable_grad(), _own_autograd():
        z = z.detach().requires_grad_(want_grad)
        s = _softcap(z, opts) * opts.logit_scale
        lse = axis.logsumexp(s)
        label_logit = axis.pick(s, labels)
        sum_logits = axis.sum(s) if opts.has_smoothing else torch.zeros_like(lse)
        inv_t = 1.0 / opts.kd_temperature
        if teacher.dense:
            log_p = axis.log_softmax(s * inv_t)
            log_q = axis.log_softmax(_softcap(teacher_logits, opts) * inv_t)
            kd = kd_divergence(log_p, log_q.detach(), opts.kd_loss, opts.jsd_beta, axis)
        else:
            log_p, log_q = sparse_log_probs(s, teacher.topk_ids, teacher.topk_logprobs.float(), opts, axis)
            kd = kd_divergence(log_p, log_q.detach(), opts.kd_loss, opts.jsd_beta)
        with torch.no_grad():
            sd = s.detach()
            shifted = sd - lse.detach()[:, None]
            entropy = -axis.sum(shifted.exp() * shifted)
            max_logit = axis.max(sd)
        stats = RowStats(lse=lse, label_logit=label_logit, sum_logits=sum_logits, entropy=entropy,
                         max_logit=max_logit, kd=kd)
        dz = None
        if want_grad:
            (dz,) = torch.autograd.grad((per_token_loss(stats, opts) * row_scale).sum(), z)
            dz = dz.to(out_dtype)
    detached = RowStats(*(None if v is None else v.detach() for v in
                          (stats.lse, stats.label_logit, stats.sum_logits, stats.entropy, stats.max_logit, stats.kd)))
    return detached, dz
