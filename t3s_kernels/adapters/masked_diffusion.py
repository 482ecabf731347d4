"""Masked-diffusion (LLaDA-style) adapter: the forward (noising) process and the loss.

Noising, per sequence b:
  * LLaDA: ``t ~ U(0, 1)``, ``p_mask = (1 - eps) t + eps`` (eps = 1e-3);
  * LLaDA 2.0: a rate drawn from ``U(low, high)`` (its trainer: U(0.3, 0.8)), pass ``rate_range``;
(or, with ``rate_block_size``, one rate per block of that many positions, as BD3-LM draws it);
each answer token is replaced by the mask token with probability ``p_mask``; prompt tokens
are never masked; ``force_mask`` (T3S's selected yet-to-learn tokens) is unioned in, so
those positions are always masked and always reconstructed.

Loss: cross-entropy at masked positions only, no shift (``shift="dream"`` predicts token t
from position t-1, as Dream does), weighted by ``1 / p_mask`` (``weighting="inverse_p"``,
LLaDA) or not (``"none"``, LLaDA 2.0), normalized by
  * ``"llada_pretrain"``: batch x length;
  * ``"llada_sft"``: each token's term divided by its sequence's answer length, then by batch;
  * ``"masked_tokens"``: the number of masked tokens (a mean over the step's masked tokens);
  * ``"sequence_masked_mean"``: each token's term divided by its sequence's masked count, then by
    the number of sequences (LLaDA 2.0's trainer, dFactory: each micro-batch's masked mean, averaged
    over micro-batches, which at one sequence a micro-batch is this);
  * ``"answer_tokens"``: the number of answer (maskable) tokens (dLLM's "token" normalization).
Why a forced token gets weight 1 under ``"inverse_p"``: the 1/t weight is an importance weight.
A token masked with probability t contributes ``1[masked] / t * l`` to the loss, whose
expectation over the masking is ``l``: every answer token counts once on average, whatever t.
A token force-masked by T3S is masked with probability 1, so the same argument gives it weight
``1 / 1 = 1``; weighting it by 1/t instead would count it ``1/t`` times on average (7x an
ordinary token at LLaDA's t ~ U(0, 1), unbounded as t -> 0). ``"inverse_p_all"`` keeps that
older convention, as an explicit choice.

The mask token keeps its softmax column (LLaDA's convention); ``exclude_mask_token=True``
drops it (MDLM's), at the cost of one copy of the head without that row.
Only masked positions are gathered into the head, so its cost scales with the masked fraction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..api import T3SLossOutput, fused_linear_t3s_loss

NORMALIZATIONS = ("llada_pretrain", "llada_sft", "masked_tokens", "sequence_masked_mean", "answer_tokens")
WEIGHTINGS = ("inverse_p", "none", "inverse_p_all")


@dataclass
class NoisedBatch:
    noisy_ids: torch.Tensor  # (B, T) with mask_token_id at masked positions
    masked: torch.Tensor  # (B, T) bool
    p_mask: torch.Tensor  # (B, T) float32, each sequence's masking probability (0 on prompts)
    answer_mask: torch.Tensor  # (B, T) bool, positions that may be masked (not prompt, not padding)
    forced: Optional[torch.Tensor] = None  # (B, T) bool, positions masked with probability 1 (T3S's force set)
    segments: Optional[torch.Tensor] = None  # (B, T) long, each token's sequence within a packed row (None: one)


def _answer_mask(input_ids: torch.Tensor, prompt_lengths, attention_mask, maskable=None) -> torch.Tensor:
    b, t = input_ids.shape
    answer = torch.ones(b, t, dtype=torch.bool, device=input_ids.device)
    if maskable is not None:
        if tuple(maskable.shape) != (b, t) or maskable.dtype != torch.bool:
            raise ValueError(f"maskable must be a bool tensor of shape (B, T) = {(b, t)}; "
                             f"got {maskable.dtype} {tuple(maskable.shape)}")
        answer &= maskable
    if prompt_lengths is not None:
        prompt_lengths = torch.as_tensor(prompt_lengths, device=input_ids.device)
        if prompt_lengths.shape != (b,):
            raise ValueError(f"prompt_lengths must have shape (B,) = ({b},); got {tuple(prompt_lengths.shape)}")
        if bool(((prompt_lengths < 0) | (prompt_lengths > t)).any()):
            raise ValueError(f"prompt_lengths must lie in [0, T] = [0, {t}]")
        answer &= torch.arange(t, device=input_ids.device)[None, :] >= prompt_lengths[:, None]
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (b, t):
            raise ValueError(f"attention_mask must have input_ids' shape {(b, t)}; got {tuple(attention_mask.shape)}")
        answer &= attention_mask.bool()
    return answer


def noise(input_ids: torch.Tensor, *, mask_token_id: int, vocab_size: Optional[int] = None,
          prompt_lengths=None, attention_mask: Optional[torch.Tensor] = None,
          maskable: Optional[torch.Tensor] = None, force_mask: Optional[torch.Tensor] = None, eps: float = 1e-3,
          rate_range: Optional[tuple[float, float]] = None, segments: Optional[torch.Tensor] = None,
          rate_block_size: Optional[int] = None, generator: Optional[torch.Generator] = None) -> NoisedBatch:
    """The forward process: mask answer tokens with a per-sequence probability, force-mask the
    T3S-selected ones. The answer is what ``prompt_lengths``, ``attention_mask`` and ``maskable``
    (bool (B, T), e.g. ``labels != -100``) all allow. ``segments`` (long (B, T), from
    ``adapters.packing.segment_ids``) marks packed sequences: each draws its own rate, as it would
    in a row of its own. ``rate_block_size`` draws one rate per block of that many positions instead
    of one per sequence (BD3-LM). ``generator`` (on input_ids' device) makes it reproducible."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (B, T); got {tuple(input_ids.shape)}")
    if vocab_size is not None and not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"mask_token_id must lie in [0, vocab_size) = [0, {vocab_size}); got {mask_token_id}")
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must lie in (0, 1); got {eps}")
    b, t = input_ids.shape
    device = input_ids.device
    answer = _answer_mask(input_ids, prompt_lengths, attention_mask, maskable)
    if segments is not None:
        if tuple(segments.shape) != (b, t):
            raise ValueError(f"segments must have shape (B, T) = {(b, t)}; got {tuple(segments.shape)}")
        if prompt_lengths is not None:
            raise ValueError("prompt_lengths describe one sequence per row; a packed row takes maskable (labels)")
        u = torch.rand(b, t, generator=generator, device=device).gather(1, segments)  # one draw per sequence
    elif rate_block_size is not None:
        if not isinstance(rate_block_size, int) or isinstance(rate_block_size, bool) or rate_block_size < 1:
            raise ValueError(f"rate_block_size must be an int >= 1; got {rate_block_size!r}")
        blocks = torch.arange(t, device=device) // rate_block_size
        u = torch.rand(b, int(blocks[-1]) + 1, generator=generator, device=device)[:, blocks]  # one draw per block
    else:
        u = torch.rand(b, generator=generator, device=device)[:, None]
    if rate_range is None:
        p = (1.0 - eps) * u + eps
    else:
        low, high = rate_range
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"rate_range must satisfy 0 <= low <= high <= 1; got {rate_range}")
        p = low + (high - low) * u
    masked = (torch.rand(b, t, generator=generator, device=device) < p) & answer
    if force_mask is not None:
        if tuple(force_mask.shape) != (b, t) or force_mask.dtype != torch.bool:
            raise ValueError(f"force_mask must be a bool tensor of shape (B, T) = {(b, t)}; "
                             f"got {force_mask.dtype} {tuple(force_mask.shape)}")
        if bool((force_mask & ~answer).any()):
            raise ValueError("force_mask selects prompt or padding positions, which are never masked")
        masked |= force_mask
    noisy = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    p_mask = torch.where(answer, p.expand(b, t), torch.zeros(b, t, device=device))
    return NoisedBatch(noisy_ids=noisy, masked=masked, p_mask=p_mask.float(), answer_mask=answer, forced=force_mask,
                       segments=segments)


def loss_weights(batch: NoisedBatch, *, weighting: str = "inverse_p",
                 normalization: str = "llada_sft") -> tuple[torch.Tensor, float]:
    """Per-token weights (B, T) and the divisor of their weighted sum, for each convention."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}; got {normalization!r}")
    b, t = batch.masked.shape
    w = torch.ones(b, t, device=batch.masked.device)
    if weighting in ("inverse_p", "inverse_p_all"):
        importance = batch.masked
        if weighting == "inverse_p" and batch.forced is not None:
            importance = importance & ~batch.forced  # masked with probability 1: weight 1 (module docstring)
        w = torch.where(importance, 1.0 / batch.p_mask.clamp(min=1e-12), w)
    if normalization == "llada_sft":  # each sequence's answer length, then the number of sequences
        return _per_sequence(w, batch, batch.answer_mask)
    if normalization == "sequence_masked_mean":  # each sequence's masked count, then the number of sequences
        return _per_sequence(w, batch, batch.masked)
    if normalization == "llada_pretrain":
        return w, float(b * t)
    if normalization == "answer_tokens":
        return w, float(max(int(batch.answer_mask.sum()), 1))
    return w, float(max(int(batch.masked.sum()), 1))


def _per_sequence(w: torch.Tensor, batch: NoisedBatch, counted: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``w`` divided by each sequence's count of ``counted`` positions, and the number of sequences
    (a packed row's each count as one)."""
    b, t = counted.shape
    if batch.segments is None:
        return w / counted.sum(1, keepdim=True).clamp(min=1).float(), float(b)
    seg = batch.segments
    counts = torch.zeros(b, t, device=w.device).scatter_add_(1, seg, counted.float())
    return w / counts.gather(1, seg).clamp(min=1), float(int((seg.max(1).values + 1).sum()))


def loss_rows(hidden: torch.Tensor, input_ids: torch.Tensor, batch: NoisedBatch, *,
              weighting: str = "inverse_p", normalization: str = "llada_sft", shift: Optional[str] = None):
    """(hidden rows, targets, weights, normalizer, row index): only masked positions."""
    weights, normalizer = loss_weights(batch, weighting=weighting, normalization=normalization)
    if shift not in (None, "dream"):
        raise ValueError(f"shift must be None or 'dream'; got {shift!r}")
    b, t = input_ids.shape
    if tuple(hidden.shape[:2]) != (b, t):
        raise ValueError(f"hidden must have shape (B, T, H) with (B, T) = {(b, t)}; got {tuple(hidden.shape)}")
    if shift == "dream":  # Dream: the logits at t-1 predict token t (position 0 predicts itself)
        hidden = dream_shift(hidden)
    index = batch.masked.reshape(-1).nonzero().squeeze(1)
    rows = hidden.reshape(b * t, -1).index_select(0, index)
    targets = input_ids.reshape(-1).index_select(0, index)
    return rows, targets, weights.reshape(-1).index_select(0, index), normalizer, index


def dream_shift(hidden: torch.Tensor) -> torch.Tensor:
    """Dream's convention: the hidden state at t-1 predicts token t (position 0 predicts itself)."""
    return torch.cat([hidden[:, :1], hidden[:, :-1]], dim=1)


def _without_row(weight: torch.Tensor, bias: Optional[torch.Tensor], row: int):
    keep = torch.cat([weight[:row], weight[row + 1:]])
    return keep, None if bias is None else torch.cat([bias[:row], bias[row + 1:]])


def masked_diffusion_loss(hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor,
                          batch: NoisedBatch, *, mask_token_id: int, weighting: str = "inverse_p",
                          normalization: str = "llada_sft", shift: Optional[str] = None,
                          exclude_mask_token: bool = False, bias: Optional[torch.Tensor] = None,
                          **loss_options) -> T3SLossOutput:
    """The masked-diffusion loss of the student's hidden states on the noisy input.

    ``input_ids`` are the clean tokens (the targets); ``batch`` comes from :func:`noise`."""
    vocab = weight.shape[0]
    if not 0 <= mask_token_id < vocab:
        raise ValueError(f"mask_token_id must lie in [0, V) = [0, {vocab}); got {mask_token_id}")
    rows, targets, w, normalizer, _ = loss_rows(hidden, input_ids, batch, weighting=weighting,
                                                normalization=normalization, shift=shift)
    if exclude_mask_token:
        if bool((targets == mask_token_id).any()):
            raise ValueError("exclude_mask_token=True but a target token is the mask token")
        weight, bias = _without_row(weight, bias, mask_token_id)
        targets = targets - (targets > mask_token_id).long()
    return fused_linear_t3s_loss(rows, weight, targets, bias=bias, token_weights=w, reduction="sum",
                                 normalizer=normalizer, **loss_options)
