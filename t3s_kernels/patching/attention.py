"""How a masked-diffusion student is made to attend as declared, and the check that it does.

A masked-diffusion student attends bidirectionally over its sequence; a block-diffusion one (``apply_t3s(...,
block_size=s)``) by the block rule over ``[x_t ; x_0]`` (adapters/block_diffusion.py). The patch builds
what the model is given: the block layout and its mask, and for a padded batch the padding in the form
the model honours. Model code differs there, and the check finds out which form it is (``MASK_FORMS``):

  * "2d", the collator's 2-D mask as sent: key padding in LLaDA 1's and LLaDA-MoE's released code (which
    take no 4-D mask: LLaDA 1's reshapes it to 2-D, LLaDA-MoE's hands it to a 2-D helper, and both raise),
    and in transformers' own models with a non-causal config;
  * "additive", a 4-D additive mask (0 where a query may attend, the dtype's minimum elsewhere): a 2-D
    mask would be turned causal by LLaDA 2.0's code under transformers 4.x, which takes a 4-D one as given;
  * "bool", a 4-D boolean mask: Dream's code casts a 4-D mask to bool, which inverts an additive one.

(A flex_attention model takes a ``BlockMask``, whatever the form.) Then it checks, never assumes, that the
model attends as declared under those very masks: on one row, it changes one token at a time and looks at
which positions' head inputs move.

  * full attention: a change at the last position reaches the first (else the model is causal);
  * block rule: a clean token of block 0 reaches the noisy block 1 but not the noisy block 0; a noisy
    token reaches its own block's other positions and nothing else;
  * padding: a change at a padded position reaches no other position (else the model ignores the mask).

The check runs at ``apply_t3s`` on a random unpadded row (two to four forwards of one row), and again at
the first training batch and at the first padded one, on the batch's most padded row, with the masks
the trainer sent. Where the mask's form matters (a padded batch, or any block-diffusion batch) it tries
the forms in the order above, a model that raises on one counting as failing it, and keeps the first
that passes for every later batch (``patch_state(model)["mask_form"]``). A model that passes under none
is refused, naming what each form showed and the fix, at that batch and every later one of its kind
until one passes. Unchecked (``apply_t3s(check=False)``), the form is "additive".
"""

from __future__ import annotations

from typing import Optional

import torch

from ..adapters.block_diffusion import FLEX_ATTENTION, bidirectional_padding_mask, block_layout
from ..adapters.packing import VARLEN_ATTENTION
from .capture import HeadInputs, capture_head_inputs, run_with_head_captured
from .head import lm_head
from .state import carries_patch, patch_state

MASK_FORMS = ("2d", "additive", "bool")
UNCHECKED_FORM = "additive"

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


def mask_form(model) -> str:
    """The padding's form the attention check chose for ``model`` (module docstring), or "additive"."""
    return (patch_state(model).get("mask_form") if carries_patch(model) else None) or UNCHECKED_FORM


def diffusion_arguments(model, call: dict, clean_ids: Optional[torch.Tensor], block_size: Optional[int],
                        form: Optional[str] = None) -> dict:
    """The forward arguments ``call`` of a masked-diffusion training step as the model must be given them
    (module docstring), the padding in ``form`` (default: the one the check chose); a new dict."""
    name = type(model).__name__
    form = form or mask_form(model)
    attention = getattr(model.config, "_attn_implementation", None)
    call = dict(call)
    mask = call.get("attention_mask")
    if block_size is None:
        if clean_ids is not None:
            raise ValueError("t3s_clean_ids is the clean half of a block-diffusion input; this model was patched "
                             "for full attention: apply_t3s(model, mode='masked_diffusion', block_size=...) for "
                             "block diffusion")
        key_valid = key_valid_of(call)
        if key_valid is not None and attention not in VARLEN_ATTENTION and form != "2d":
            call["attention_mask"] = bidirectional_padding_mask(key_valid, attention=attention,
                                                                dtype=model.dtype, model_name=name, form=form)
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
        dict(attention_mask=mask)), attention=attention, dtype=model.dtype, model_name=name, form=form))
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
                    block_size: Optional[int], where: str) -> Optional[str]:
    """Run the checks of the module docstring on the most padded row of the batch ``call`` (the model's
    arguments before ``diffusion_arguments``). Returns the mask form the model attends as declared under
    (None where the form does not matter: an unpadded full-attention batch); raises ``ValueError`` naming
    what each form showed and the fix."""
    name = type(model).__name__
    key_valid = key_valid_of(call)
    forms = MASK_FORMS[1:] if block_size is not None else MASK_FORMS if key_valid is not None else (None,)
    if getattr(model.config, "_attn_implementation", None) in (FLEX_ATTENTION, *VARLEN_ATTENTION):
        forms = forms[-1:]  # one form: the BlockMask (or no mask) whatever the form
    shown, raised = {}, set()
    for form in forms:
        try:
            seen = _findings(model, forward, call, clean_ids=clean_ids, block_size=block_size,
                             form=form or UNCHECKED_FORM)
        except _ModelRaised as e:  # the model's code cannot take the mask in this form
            error = e.__cause__
            first_line = str(error).splitlines()[0][:200] if str(error) else ""
            seen = [f"its forward raised {type(error).__name__}: {first_line}"]
            raised.add(form)
        if seen is None:
            return None  # a row of fewer than two real tokens: nothing to tell
        if not seen:
            return form
        shown[form] = seen
    kind = "full (bidirectional) attention" if block_size is None else f"the block rule (block_size={block_size})"
    if not raised and all("padding" in s for seen in shown.values() for s in seen):
        fix = ("pad with labelled tokens and no attention_mask (MaskedDiffusionTrainer(padding='labelled'), "
               "as LLaDA 2.0 trains), or send unpadded batches")
    elif raised == set(shown) and block_size is not None:
        fix = ("block diffusion needs a model whose forward takes a 4-D attention mask (additive or boolean) and "
               "position_ids; train this model with full attention (no block_size) or with its own trainer")
    elif raised == set(shown):
        fix = ("pad with labelled tokens and no attention_mask (MaskedDiffusionTrainer(padding='labelled')), or "
               "send unpadded batches")
    else:
        fix = ("check the model's attention implementation and its config's causal flag, or patch it in causal "
               "mode if it is an autoregressive model")
    told = "; ".join(f"with {_FORM_WORDS[f]}: {', '.join(seen)}" if f else ", ".join(seen) for f, seen in shown.items())
    raise ValueError(f"apply_t3s: {name} does not attend by {kind} under the masks the patch sends ({where}): "
                     f"{told}. The masked-diffusion loss would be silently wrong, so it is refused; {fix}")


class _ModelRaised(Exception):
    """The model's own forward raised (its cause): the check's finding for that form, not an error of ours."""


_FORM_WORDS = {"2d": "the 2-D padding mask", "additive": "a 4-D additive mask", "bool": "a 4-D boolean mask"}


def _findings(model, forward, call: dict, *, clean_ids: Optional[torch.Tensor], block_size: Optional[int],
              form: str) -> Optional[list]:
    """What breaks the declared attention on the batch's most padded row with the masks in ``form`` ([]:
    nothing; None: a row too short to tell)."""
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
        return None

    def run(noisy, clean_half):
        args = diffusion_arguments(model, dict(one, input_ids=noisy), clean_half, block_size, form=form)
        try:
            return _head_inputs(model, forward, args)
        except Exception as e:  # anything the model's code raises; the arguments' own errors pass above
            raise _ModelRaised from e

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
    return seen


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
