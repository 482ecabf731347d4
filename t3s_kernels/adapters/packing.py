"""Packed (padding-free) batches: several sequences concatenated in one row, told apart by
``position_ids`` that restart at 0 for each, as HF's ``DataCollatorWithFlattening`` and
``T3SDataCollator(packed=True)`` make them.

One source of truth for the boundaries: a sequence starts where the position does not follow
the previous one (``position_ids[t] != position_ids[t-1] + 1``). Attention must not cross a
boundary: transformers' causal mask builder honours that when no 2D attention mask and no cache
are given; flash-attn's varlen kernels take the boundaries from the same position ids; a
bidirectional (masked-diffusion) student on eager/SDPA attention needs the block-diagonal mask
built here.
"""

from __future__ import annotations

from typing import Optional

import torch


def sequence_starts(position_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """bool (B, T): True at the first token of every packed sequence after a row's first (where the
    position restarts), among attended tokens (a padded row's pad positions are not boundaries)."""
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must have shape (B, T) to carry packed sequences; got "
                         f"{tuple(position_ids.shape)}")
    starts = torch.zeros_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if attention_mask is not None and attention_mask.dim() == 2:
        attended = attention_mask.bool()
        starts[:, 1:] &= attended[:, 1:] & attended[:, :-1]
    return starts


def is_packed(position_ids, attention_mask: Optional[torch.Tensor] = None) -> bool:
    """Whether a row holds more than one sequence."""
    return (torch.is_tensor(position_ids) and position_ids.dim() == 2
            and bool(sequence_starts(position_ids, attention_mask).any()))


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """long (B, T): each token's sequence index within its row (0, 1, ...)."""
    return sequence_starts(position_ids).long().cumsum(1)


def block_diagonal_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive 4D mask (B, 1, T, T) that lets each token attend to every token of its own
    sequence and to nothing else (bidirectional within a sequence): 0 allowed, dtype's min elsewhere.
    Additive masks are what both eager and SDPA attention take as given."""
    seg = segment_ids(position_ids)
    same = seg[:, None, :, None] == seg[:, None, None, :]
    return torch.zeros(same.shape, dtype=dtype, device=position_ids.device).masked_fill(~same, torch.finfo(dtype).min)


# Attention implementations whose varlen kernels take packed sequences from position_ids.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


def prepare_packed_forward(call: dict, labels, shift_labels, *, causal: bool, attention: Optional[str],
                           dtype: torch.dtype, takes_use_cache: bool, ignore_index: int, counted: bool,
                           model_name: str):
    """A packed batch's forward arguments ``call`` (changed in place) and labels, so that the model's own
    forward keeps the sequences apart and no sequence's last token predicts the next one's first (the
    causal shift across a boundary). ``attention`` is the model's attention implementation; ``counted``
    says the caller divides by a count of labels (num_items_in_batch). Returns (labels, shift_labels)
    with those targets ignored."""
    position_ids, mask = call["position_ids"], call.get("attention_mask")
    if mask is not None:
        if mask.dim() == 2 and bool(mask.bool().all()):
            call.pop("attention_mask")  # all ones says nothing, and would switch off transformers' packing
        else:
            raise ValueError("a packed batch (position_ids restart inside a row) came with an attention_mask: "
                             "transformers then ignores the packing and lets the sequences attend to each other. "
                             "Pass position_ids without attention_mask (T3SDataCollator(packed=True) does)")
    if not takes_use_cache:
        raise ValueError(f"{model_name}'s forward takes no use_cache, so a cache may switch off the packed attention "
                         "mask: packed batches are not supported for it; pad instead")
    call["use_cache"] = False  # with a cache, transformers' mask builder ignores packed position_ids
    if not causal and attention not in VARLEN_ATTENTION:
        call["attention_mask"] = block_diagonal_mask(position_ids, dtype)
    if not causal:
        return labels, shift_labels
    starts = sequence_starts(position_ids)
    if shift_labels is not None:
        crossing = torch.zeros_like(starts)
        crossing[:, :-1] = starts[:, 1:]  # shift_labels[t] is the label of token t + 1
        target = shift_labels
    else:
        crossing, target = starts, labels
    if counted and bool((target[crossing] != ignore_index).any()):
        raise ValueError("a packed batch labels the first token of a sequence, which the previous sequence's last "
                         "token would predict; num_items_in_batch counts it. Label each sequence's first token "
                         "-100 (T3SDataCollator(packed=True) and DataCollatorWithFlattening do)")
    target = target.masked_fill(crossing, ignore_index)
    return (labels, target) if shift_labels is not None else (target, shift_labels)
