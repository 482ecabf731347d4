"""Block diffusion (LLaDA 2.0's SFT, BD3-LM): what a block-diffusion student reads, and the mask it attends by.

The student reads the noisy sequence and the clean one side by side, ``[x_t ; x_0]`` (length 2L), with
position ids ``[0 .. L-1, 0 .. L-1]``. Cut each half into blocks of ``block_size`` positions (block b of
a half: positions [b s, (b + 1) s)); then, queries in rows, keys in columns:

  * an x_t query of block b sees the x_t keys of block b and the x_0 keys of blocks < b;
  * an x_0 query of block b sees the x_0 keys of blocks <= b (block-causal);
  * x_0 never sees x_t.

So each noisy block is denoised from itself and the clean blocks before it, and the clean half is a
block-causal encoding of the context. The loss is the masked-diffusion loss at x_t's masked positions,
read from the first half's hidden states (adapters/masked_diffusion.py); x_0's outputs are not scored.

Padding. LLaDA 2.0 and BD3-LM pad with a labelled token (pad or EOS) that is maskable, trained and
attended like any other ("labelled": no key padding, pass no attention mask). Otherwise padding is
"dropped": its keys are invisible to every query (``key_valid``), and it is never masked or scored.
A padded query attends to itself alone, so that no row of the mask is empty (an empty row is a NaN
in some attention kernels); its output is read by nothing.

The mask reaches the model in the form its attention implementation takes (``attention_mask_for``):
a ``flex_attention`` ``BlockMask`` (about 4 (2L / 128)^2 bytes a row of the batch, plus its index
lists: under 2 MiB at L = 32K), else a 4-D additive mask of the model's dtype for SDPA and eager
attention ((2L)^2 elements a row: 128 MiB at L = 4096 in bf16, 8 GiB at L = 32K, where flex attention
is the only practical form). flash-attn's varlen kernels cannot express it and are refused.
"""

from __future__ import annotations

from typing import Optional

import torch

BLOCK_PADDINGS = ("labelled", "dropped")
# Attention implementations that take a 4-D additive mask as given, and the one that takes a BlockMask.
DENSE_MASK_ATTENTION = ("eager", "sdpa", None)
FLEX_ATTENTION = "flex_attention"
# The forms a dense 4-D mask can be given in: "additive" (0 where a query may attend, the dtype's minimum
# elsewhere: what transformers' eager and SDPA paths add to the scores) or "bool" (True where it may: what
# a model that casts its 4-D mask to bool takes, as Dream's released code does).
DENSE_MASK_FORMS = ("additive", "bool")


def check_block_size(block_size) -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1 (LLaDA 2.0 trains with 32); got {block_size!r}")


def block_allowed(q: torch.Tensor, k: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Whether query position ``q`` may see key position ``k`` of ``[x_t ; x_0]`` (module docstring);
    elementwise over broadcast index tensors (what flex attention's mask function receives too)."""
    q_clean, k_clean = q >= length, k >= length
    q_block = torch.where(q_clean, q - length, q) // block_size
    k_block = torch.where(k_clean, k - length, k) // block_size
    same_half_block = (q_block == k_block) & (q_clean == k_clean)  # x_t: its own block; x_0: its own block
    context = (q_block > k_block) & k_clean  # earlier clean blocks, for either half
    return same_half_block | context


def dense_block_mask(length: int, block_size: int, key_valid: Optional[torch.Tensor] = None,
                     device=None) -> torch.Tensor:
    """bool (B or 1, 1, 2L, 2L): True where a query may attend."""
    positions = torch.arange(2 * length, device=device)
    q, k = positions[:, None], positions[None, :]
    allowed = block_allowed(q, k, length, block_size)[None, None]
    if key_valid is None:
        return allowed
    k_index = torch.where(positions >= length, positions - length, positions)
    k_valid = key_valid.bool()[:, k_index][:, None, None, :]  # (B, 1, 1, 2L)
    return (allowed & k_valid) | torch.eye(2 * length, dtype=torch.bool, device=device)[None, None]


def key_padding_mask(key_valid: torch.Tensor) -> torch.Tensor:
    """bool (B, 1, L, L) of full (bidirectional) attention over the valid keys, each query seeing itself:
    a padded batch as a masked-diffusion student attends."""
    length = key_valid.shape[1]
    eye = torch.eye(length, dtype=torch.bool, device=key_valid.device)
    return key_valid.bool()[:, None, None, :] | eye[None, None]


def bidirectional_padding_mask(key_valid: torch.Tensor, *, attention: Optional[str], dtype: torch.dtype,
                               model_name: str = "the model", form: str = "additive"):
    """A padded batch's 2-D mask as a full-attention student must take it: a 4-D mask (or a BlockMask),
    which models take as given, where a 2-D one may be turned into a causal mask by the model's own
    mask builder (LLaDA 2.0's code does, under transformers 4.x)."""
    b, length = key_valid.shape

    def allowed(kind):
        if kind == "flex":
            return flex_block_mask(length, None, key_valid, b, key_valid.device)
        return key_padding_mask(key_valid)

    return attention_mask_for(attention, allowed, dtype=dtype, model_name=model_name, what="padding", form=form)


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as the additive mask eager and SDPA attention take: 0 allowed, the dtype's min elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed,
                                                                                      torch.finfo(dtype).min)


def flex_block_mask(length: int, block_size: Optional[int], key_valid: Optional[torch.Tensor], batch: int,
                    device) -> object:
    """The same rule as a flex_attention ``BlockMask`` (``block_size`` None: full attention over L)."""
    from torch.nn.attention.flex_attention import create_block_mask

    total = length if block_size is None else 2 * length
    valid = None if key_valid is None else key_valid.bool()

    def mask_mod(b, h, q, k):
        allowed = (q >= 0) if block_size is None else block_allowed(q, k, length, block_size)
        if valid is None:
            return allowed
        key = torch.where(k >= length, k - length, k)
        return (allowed & valid[b, key]) | (q == k)

    return create_block_mask(mask_mod, B=None if valid is None else batch, H=None, Q_LEN=total, KV_LEN=total,
                             device=device)


def attention_mask_for(attention: Optional[str], allowed_dense, *, dtype: torch.dtype, model_name: str,
                       what: str, form: str = "additive"):
    """The mask ``allowed_dense`` (a function giving the bool 4-D mask, or a BlockMask builder for flex)
    in the form the attention implementation ``attention`` takes (a dense one in ``form``, of
    ``DENSE_MASK_FORMS``), or a refusal naming the fix."""
    if form not in DENSE_MASK_FORMS:
        raise ValueError(f"form must be one of {DENSE_MASK_FORMS}; got {form!r}")
    if attention == FLEX_ATTENTION:
        return allowed_dense("flex")
    if attention in DENSE_MASK_ATTENTION:
        dense = allowed_dense("dense")
        return dense if form == "bool" else additive(dense, dtype)
    raise ValueError(f"{model_name} uses attn_implementation={attention!r}, which cannot take the {what} mask; "
                     "load it with attn_implementation='sdpa', 'eager' or 'flex_attention'")


def block_layout(noisy_ids: torch.Tensor, clean_ids: torch.Tensor, *, block_size: int,
                 key_valid: Optional[torch.Tensor] = None, attention: Optional[str], dtype: torch.dtype,
                 model_name: str = "the model", form: str = "additive") -> dict:
    """The forward arguments of a block-diffusion student: ``input_ids`` ``[x_t ; x_0]`` (B, 2L),
    ``position_ids`` ``[0..L-1, 0..L-1]``, and the attention mask in the form ``attention`` takes (a
    dense one in ``form``)."""
    check_block_size(block_size)
    if noisy_ids.dim() != 2 or tuple(clean_ids.shape) != tuple(noisy_ids.shape):
        raise ValueError(f"the noisy and the clean ids must both have shape (B, L); got {tuple(noisy_ids.shape)} "
                         f"and {tuple(clean_ids.shape)}")
    b, length = noisy_ids.shape
    if key_valid is not None and tuple(key_valid.shape) != (b, length):
        raise ValueError(f"the padding mask must have the ids' shape {(b, length)}; got {tuple(key_valid.shape)}")
    device = noisy_ids.device
    positions = torch.arange(length, device=device).repeat(2)[None].expand(b, -1)

    def allowed(kind):
        if kind == "flex":
            return flex_block_mask(length, block_size, key_valid, b, device)
        return dense_block_mask(length, block_size, key_valid, device)

    mask = attention_mask_for(attention, allowed, dtype=dtype, model_name=model_name, what="block-diffusion",
                              form=form)
    return dict(input_ids=torch.cat([noisy_ids, clean_ids], 1), position_ids=positions, attention_mask=mask)
