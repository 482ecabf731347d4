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
