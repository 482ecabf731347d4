"""How a masked-diffusion student is made to attend as declared, and the check that it does.

A masked-diffusion student attends bidirectionally over its sequence; a block-diffusion one (``apply_t3s(...,
block_size=s)``) by the block rule over ``[x_t ; x_0]`` (adapters/block_diffusion.py). The patch builds
what the model is given: the block layout and its mask, and for a padded batch a 4-D (or flex) mask in
place of the collator's 2-D one, which a model's own mask builder may turn causal (LLaDA 2.0's code does,
under transformers 4.x). Then it checks, never assumes, that the model attends so under those very
masks: on one row, it changes one token at a time and looks at which positions' head inputs move.

  * full attention: a change at the last position reaches the first (else the model is causal);
  * block rule: a clean token of block 0 reaches the noisy block 1 but not the noisy block 0; a noisy
    token reaches its own block's other positions and nothing else;
  * padding: a change at a padded position reaches no other position (else the model ignores the mask).

The check runs at ``apply_t3s`` on a random unpadded row (two to four forwards of one row), and again at
the first training batch and at the first padded one, on the batch's most padded row, with the masks
the trainer sent. A model that fails it is refused, naming what was seen and the fix, at that batch and
every later one of its kind until one passes.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..adapters.block_diffusion import bidirectional_padding_mask, block_layout
from ..adapters.packing import VARLEN_ATTENTION
from .capture import HeadInputs, capture_head_inputs, run_with_head_captured
from .head import lm_head

# |change| above this fraction of the head inputs' scale counts as a change; unchanged positions
# compute bitwise the same numbers (masked keys get exactly zero weight), so the split is wide.
_CHANGED = 1e-4


def key_valid_of(call: dict) -> Optional[torch.Tensor]:
    """The batch's padding (bool (B, L), True where a token is real) from a 2-D attention mask, or None
    where there is none or it is all ones."""
    mask = call.get("attention_mask")
    if mask is None or mask.dim() != 2 or bool(mask.bool().all()):
        return None
    return mask.bool()


def diffusion_arguments(model, call: dict, clean_ids: Optional[torch.Tensor], block_size: Optional[int]) -> dict:
    """The forward arguments ``call`` of a masked-diffusion training step as the model must be given them
    (module docstring); a new dict."""
    name = type(model).__name__
    attention = getattr(model.config, "_attn_implementation", None)
    call = dict(call)
    mask = call.get("attention_mask")
    if block_size is None:
        if clean_ids is not None:
            raise ValueError("t3s_clean_ids is the clean half of a block-diffusion input; this model was patched "
                             "for full attention: apply_t3s(model, mode='masked_diffusion', block_size=...) for "
                             "block diffusion")
        key_valid = key_valid_of(call)
        if key_valid is not None and attention not in VARLEN_ATTENTION:
            call["attention_mask"] = bidirectional_padding_mask(key_valid, attention=attention,
                                                                dtype=model.dtype, model_name=name)
        return call
    if clean_ids is None:
        raise ValueError(f"{name} is patched for block diffusion (block_size={block_size}): pass the clean "
                         "sequence x_0 as t3s_clean_ids beside the noisy input_ids (masked_diffusion_compute_loss "
                         "does)")
    if mask is not None and mask.dim() != 2:
        raise ValueError("a block-diffusion step takes its padding as a 2-D attention_mask (or none); the patch "
                         "builds the block mask itself")
    if call.get("inputs_embeds") is not None or "input_ids" not in call:
        raise ValueError("a block-diffusion step takes input_ids (the noisy sequence x_t), not inputs_embeds")
    position_ids = call.pop("position_ids", None)
    length = call["input_ids"].shape[1]
    if position_ids is not None and not torch.equal(position_ids.expand(call["input_ids"].shape),
                                                    torch.arange(length, device=position_ids.device).expand(
                                                        call["input_ids"].shape)):
        raise ValueError("a block-diffusion step gives each half positions 0 .. L-1 itself; position_ids other "
                         "than those (a packed batch?) are not supported")
    call.pop("attention_mask", None)
    call.update(block_layout(call["input_ids"], clean_ids, block_size=block_size, key_valid=key_valid_of(
        dict(attention_mask=mask)), attention=attention, dtype=model.dtype, model_name=name))
    return call


def capture_diffusion_head_inputs(model, *, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                                  clean_ids: Optional[torch.Tensor] = None,
                                  block_size: Optional[int] = None) -> HeadInputs:
    """``capture_head_inputs`` of a masked-diffusion student given the masks training gives it (the block
    layout with ``block_size``, the noisy ``input_ids`` beside the ``clean_ids``): what self-scoring
    evaluates. The hidden states are the noisy positions' (the first half in block layout)."""
    call = diffusion_arguments(model, dict(input_ids=input_ids, attention_mask=attention_mask), clean_ids,
                               block_size)
    head = capture_head_inputs(model, **call)
    if block_size is not None:
        head.hidden = head.hidden[:, :input_ids.shape[1]]
    return head


def _head_inputs(model, forward, call: dict) -> torch.Tensor:
    return run_with_head_captured(model, forward, **call).hidden[0].detach().float()


def _moved(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Per position: whether its head input moved."""
    return (a - b).abs().amax(-1) > _CHANGED * scale


def check_attention(model, forward, call: dict, *, clean_ids: Optional[torch.Tensor],
                    block_size: Optional[int], where: str) -> None:
    """Run the checks of the module docstring on the most padded row of the batch ``call`` (the model's
    arguments before ``diffusion_arguments``); raise ``ValueError`` naming what was seen and the fix."""
    name = type(model).__name__
    ids = call["input_ids"]
    key_valid = key_valid_of(call)
    row = 0 if key_valid is None else int(key_valid.sum(1).argmin())
    one = {k: (v[row:row + 1] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == ids.shape[0] else v)
           for k, v in call.items()}
    clean = None if clean_ids is None else clean_ids[row:row + 1]
    valid = torch.ones(ids.shape[1], dtype=torch.bool, device=ids.device) if key_valid is None else key_valid[row]
    length, vocab = ids.shape[1], lm_head(model).out_features
    real = valid.nonzero().squeeze(1)
    if real.numel() < 2:
        return

    def run(noisy, clean_half):
        args = dict(one, input_ids=noisy)
        return _head_inputs(model, forward, diffusion_arguments(model, args, clean_half, block_size))

    def changed(t, pos):
        t = t.clone()
        t[0, pos] = (t[0, pos] + 1) % vocab
        return t

    was_training = model.training
    model.eval()  # dropout off: a position that does not see the change computes the very same numbers
    try:
        with torch.no_grad():
            base = run(one["input_ids"], clean)
            scale = max(float(base.abs().max()), 1e-6)
            seen = []
            if block_size is None:
                first, last = int(real[0]), int(real[-1])
                moved = _moved(run(changed(one["input_ids"], last), clean), base, scale)
                if not bool(moved[first]):
                    seen.append(f"a change at position {last} does not reach position {first}: it attends causally")
            else:
                seen += _block_findings(run, one["input_ids"], clean, base, scale, changed, real, length, block_size)
            pads = (~valid).nonzero().squeeze(1)
            if pads.numel():
                p = int(pads[0])
                moved = _moved(run(changed(one["input_ids"], p), clean), base, scale)
                if block_size is not None:
                    moved = moved[:length] | moved[length:]
                if bool((moved & valid & (torch.arange(length, device=valid.device) != p)).any()):
                    seen.append(f"a change at the padded position {p} reaches real tokens: it ignores the padding "
                                "mask")
    finally:
        model.train(was_training)
    if seen:
        kind = "full (bidirectional) attention" if block_size is None else f"the block rule (block_size={block_size})"
        fix = ("pad with labelled tokens and no attention_mask (MaskedDiffusionTrainer(padding='labelled'), "
               "as LLaDA 2.0 trains), or send unpadded batches" if any("padding" in s for s in seen) else
               "check the model's attention implementation and its config's causal flag, or patch it in causal "
               "mode if it is an autoregressive model")
        raise ValueError(f"apply_t3s: {name} does not attend by {kind} under the masks the patch sends ({where}): "
                         f"{'; '.join(seen)}. The masked-diffusion loss would be silently wrong, so it is refused; "
                         f"{fix}")


def _block_findings(run, noisy, clean, base, scale, changed, real, length, block_size) -> list:
    """What breaks the block rule, from a change of a clean token of block 0 and of the last noisy token."""
    seen = []
    first = int(real[0])
    if first < block_size:  # a real clean token in block 0
        moved = _moved(run(noisy, changed(clean, first)), base, scale)
        if bool(moved[:min(block_size, length)].any()):
            seen.append(f"a change of the clean token {first} (block 0) reaches the noisy block 0, which must not "
                        "see its own clean block")
        if length > block_size and bool(real.ge(block_size).any()) and not bool(moved[block_size]):
            seen.append(f"a change of the clean token {first} (block 0) does not reach the noisy block 1")
    last = int(real[-1])
    moved = _moved(run(changed(noisy, last), clean), base, scale)
    block = last // block_size
    in_block = torch.zeros(2 * length, dtype=torch.bool, device=moved.device)
    in_block[block * block_size:min((block + 1) * block_size, length)] = True
    in_block[last] = True
    if bool((moved & ~in_block).any()):
        seen.append(f"a change of the noisy token {last} reaches positions outside its block {block} (the clean "
                    "half must never see the noisy one)")
    mates = real[(real // block_size == block) & (real != last)]
    if mates.numel() and not bool(moved[int(mates[0])]):
        seen.append(f"a change of the noisy token {last} does not reach its block-mate {int(mates[0])}")
    return seen
