"""Causal-LM adapter: (B, T, H) hidden states + (B, T) labels -> the fused op's rows.

Position t predicts token t+1 (the usual shift), unless the caller passes ``shift_labels``
already aligned with the hidden states. Per-token ``token_weights`` are aligned with ``labels``
(the tokens being predicted): True / a positive weight keeps token t in the loss; T3S's
AR rule drops the imitation anchors by giving them False / 0. Only rows that carry a label
and a nonzero weight reach the LM head's matmuls (the fused op gathers them).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..api import TEACHER_ROW_INPUTS, T3SLossOutput, fused_linear_t3s_loss


def as_token_weights(mask: Optional[torch.Tensor], like: torch.Tensor, name: str) -> Optional[torch.Tensor]:
    """A bool keep-mask or float weights, as float weights of the labels' shape (errors name ``name``)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a tensor (bool mask or float weights); got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(like.shape):
        short = like.shape[-1] - mask.shape[-1] if mask.dim() == like.dim() and mask.shape[:-1] == like.shape[:-1] \
            else 0
        hint = (f": the labels have {short} more positions, as when a PEFT prompt-learning model (prompt tuning, "
                f"p-tuning, prefix) prepends its {short} virtual tokens to the labels but not to {name}; prepend "
                f"{short} zeros to {name} (torch.nn.functional.pad({name}, ({short}, 0)))") if short > 0 else ""
        raise ValueError(f"{name} must have the labels' shape {tuple(like.shape)}; got {tuple(mask.shape)}{hint}")
    if mask.dtype == torch.bool:
        return mask.float()
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be bool (True keeps a token) or floating point (a weight); got {mask.dtype}")
    return mask


def shift_for_causal_lm(labels: torch.Tensor, token_weights: Optional[torch.Tensor] = None,
                        ignore_index: int = -100) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Labels (and token_weights) shifted so that position t holds the target t+1; the last
    position gets ``ignore_index`` (HF's convention)."""
    pad = torch.full_like(labels[..., :1], ignore_index)
    shifted = torch.cat([labels[..., 1:], pad], dim=-1)
    if token_weights is not None:
        token_weights = torch.cat([token_weights[..., 1:], torch.zeros_like(token_weights[..., :1])], dim=-1)
    return shifted, token_weights


def causal_lm_targets(hidden: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                      token_weights: Optional[torch.Tensor] = None, shift_labels: Optional[torch.Tensor] = None,
                      ignore_index: int = -100) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(targets, weights or None), aligned with ``hidden``'s positions: position t's target, or
    ``ignore_index`` where it has none or its weight is 0 (no data-dependent shapes: the fused op
    gathers the remaining rows itself).

    ``token_weights`` is aligned with ``labels``, or with ``shift_labels`` when those are given."""
    if (labels is None) == (shift_labels is None):
        raise ValueError("pass exactly one of labels (to be shifted) or shift_labels (already aligned)")
    target = shift_labels if shift_labels is not None else labels
    if hidden.dim() < 2 or tuple(hidden.shape[:-1]) != tuple(target.shape):
        name = "shift_labels" if shift_labels is not None else "labels"
        raise ValueError(f"{name} must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}; "
                         f"got {tuple(target.shape)}")
    weights = as_token_weights(token_weights, target, "token_weights")
    if shift_labels is None:
        target, weights = shift_for_causal_lm(labels, weights, ignore_index)
    if weights is not None:
        target = target.masked_fill(weights == 0, ignore_index)
    return target, weights


def causal_lm_rows(hidden: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                   token_weights: Optional[torch.Tensor] = None, shift_labels: Optional[torch.Tensor] = None,
                   ignore_index: int = -100):
    """(hidden rows, label rows, weight rows or None, row index): only rows that carry a label
    and a nonzero weight, gathered (``causal_lm_targets`` without the gather)."""
    target, weights = causal_lm_targets(hidden, labels, token_weights=token_weights, shift_labels=shift_labels,
                                        ignore_index=ignore_index)
    flat_target = target.reshape(-1)
    index = (flat_target != ignore_index).nonzero().squeeze(1)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    w = None if weights is None else weights.reshape(-1).index_select(0, index)
    return rows, flat_target.index_select(0, index), w, index


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                   token_weights: Optional[torch.Tensor] = None, shift_labels: Optional[torch.Tensor] = None,
                   num_items_in_batch: Union[None, int, float, torch.Tensor] = None, ignore_index: int = -100,
                   **loss_options) -> T3SLossOutput:
    """The causal-LM loss of ``hidden`` (B, T, H) through the head ``weight`` (V, H).

    With ``num_items_in_batch`` (HF Trainer's count of label tokens over the whole
    gradient-accumulation step) the summed loss is divided by it, so accumulated
    micro-batches give the gradients of one large batch; otherwise the mean over the kept
    tokens. For the mean over kept tokens under accumulation, the count must leave the
    dropped tokens out (give them label -100, as ``T3SDataCollator`` does). Weight-0 tokens
    are dropped before the head, so they get no statistics here;
    score them with ``token_stats``. With ``reduction="none"`` and ``return_stats`` the results
    have the positions' shape (B, T) (0 where a position has no target).

    Per-position teacher inputs (``teacher_hidden`` (B, T, Ht), ``teacher_topk_ids`` /
    ``teacher_topk_logprobs`` (B, T, K)), aligned with ``hidden`` (position t predicts t+1 for
    both models), follow the same positions; ``teacher_weight`` and the KD options pass through.
    """
    targets, weights = causal_lm_targets(hidden, labels, token_weights=token_weights, shift_labels=shift_labels,
                                         ignore_index=ignore_index)
    for name in TEACHER_ROW_INPUTS:
        t = loss_options.get(name)
        if t is not None and tuple(t.shape[:hidden.dim() - 1]) != tuple(hidden.shape[:-1]):
            raise ValueError(f"{name} must be aligned with hidden: shape {tuple(hidden.shape[:-1])} + (...,); "
                             f"got {tuple(t.shape)}")
    if num_items_in_batch is not None:  # 0 (HF's count for a step without label tokens) gives a zero loss
        loss_options["normalizer"] = num_items_in_batch
    return fused_linear_t3s_loss(hidden, weight, targets, token_weights=weights, ignore_index=ignore_index,
                                 **loss_options)
