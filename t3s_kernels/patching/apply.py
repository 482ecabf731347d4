"""``apply_t3s`` / ``revert_t3s``: the patch put on a model (or its class) and taken off."""

from __future__ import annotations

import types
from typing import Optional

import torch

from ..adapters.block_diffusion import check_block_size
from ..api import TEACHER_ROW_INPUTS, T3SLoss
from ..options import TRANSFORM_OPTIONS
from .attention import check_attention
from .equivalence import check_t3s_patch
from .forward import make_forward, patched_signature
from .head import head_math, lm_head, model_configs
from .refusals import ANCHORS, refuse_bypass, refuse_unsupported, refuse_wrappers
from .state import (
    STATE,
    carries_patch,
    describe,
    inner_model,
    original_forward,
    patch_state,
    patched_model,
    shadowing_forward,
)

MODES = ("causal", "masked_diffusion")
# Model types whose own training fixes the masked-diffusion shift: Dream predicts token t from position
# t - 1 ("dream"); LLaDA's models predict it at t (None).
SHIFT_OF_MODEL_TYPE = {"dream": "dream", "llada": None, "lladamoe": None, "llada_moe": None, "llada2_moe": None}
SHIFTS = ("auto", None, "dream")
# The op's arguments the patch sets itself: from the model's head math (the logit transform), from the
# batch (each forward's ignore_index, token weights, teacher rows, normalizer), from the model (its
# bias and, under tensor parallelism, its mesh).
SET_BY_PATCH = (*TRANSFORM_OPTIONS, "ignore_index", "bias", "token_weights", "normalizer", "vocab_parallel",
                *TEACHER_ROW_INPUTS)


def _on_meta(model) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def _model_shift(model) -> tuple[bool, Optional[str]]:
    """(whether the model's type fixes the shift, that shift)."""
    for cfg in model_configs(model):
        kind = str(getattr(cfg, "model_type", "")).lower()
        if kind in SHIFT_OF_MODEL_TYPE:
            return True, SHIFT_OF_MODEL_TYPE[kind]
    return False, None


def _resolve_shift(model, mode: str, shift) -> Optional[str]:
    if shift not in SHIFTS:
        raise ValueError(f"shift must be one of {SHIFTS}; got {shift!r}")
    if mode != "masked_diffusion":
        if shift == "dream":
            raise ValueError("shift='dream' is a masked-diffusion convention; use mode='masked_diffusion'")
        return None
    fixed, own = _model_shift(model)
    if shift == "auto":
        return own
    if fixed and shift != own:
        raise ValueError(f"shift={shift!r} contradicts {type(model).__name__}'s own convention (model_type "
                         f"{model.config.model_type!r} trains with shift={own!r}); leave shift='auto'")
    return shift


def _check_attention_now(model, block_size: Optional[int]) -> None:
    """The attention check (attention.py) on a random unpadded row, at patch time."""
    length = 16 if block_size is None else 2 * block_size + 3
    if length > 512:
        return  # a large block: checked at the first training forward only
    head = lm_head(model)
    vocab = min(head.out_features, head_math(model).vocab_size or head.out_features)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, length), generator=g).to(head.weight.device)
    clean = None if block_size is None else torch.randint(0, vocab, (1, length), generator=g).to(ids.device)
    form = check_attention(model, original_forward(model), dict(input_ids=ids), clean_ids=clean,
                           block_size=block_size, where="a random row at apply_t3s")
    if form is not None:
        patch_state(model)["mask_form"] = form


def apply_t3s(model, *, mode: str = "causal", shift: Optional[str] = "auto", block_size: Optional[int] = None,
              patch_class: bool = False, check: bool = True, anchors: str = "ignore", tensor_parallel: bool = False,
              **loss_options):
    """Patch ``model`` (an instance; with ``patch_class=True`` its class, for every instance) so that
    training forwards with labels use the fused loss. ``loss_options`` are ``fused_linear_t3s_loss``'s
    (``label_smoothing``, ``z_loss``, ``backend``, ...; for distillation
    ``teacher_weight=teacher.lm_head.weight``, ``kd_weight``, ``kd_loss``, ``kd_temperature``, and then
    ``teacher_hidden=`` or ``teacher_topk_ids=``/``teacher_topk_logprobs=`` in each forward call).
    The model's own head math (logit scale, soft cap) and ``ignore_index`` (a forward argument, as
    in HuggingFace) come from the model and the call (``SET_BY_PATCH``).

    ``anchors`` fixes what a weight-0 token (T3S's imitation anchor) means for the normalization.
    ``"ignore"`` (default): as if it had label -100, the usual implementation and what the method's
    loss means: the sum over kept tokens is divided by the kept count (without ``num_items_in_batch``)
    or by ``num_items_in_batch``, which must then not count anchors (``T3SDataCollator`` gives them
    label -100; a forward that would divide by a count including them raises). ``"count"``: divide
    by ``num_items_in_batch`` as given, anchors included.

    ``tensor_parallel=True`` says the LM head is (or will be) sharded over the vocabulary by tensor
    parallelism (a ``Shard(0)`` DTensor on a 1-D mesh, as transformers' ``tp_plan`` and
    ``ColwiseParallel`` make it): the loss then runs vocabulary-parallel over that mesh, exactly.
    It is never inferred from the placements (FSDP2's parameters look the same).

    ``mode="masked_diffusion"``: a LLaDA-style student, its labels aligned with the positions (-100
    where not masked). ``shift``: "auto" (default) takes the model type's own convention (Dream's
    "dream": position t - 1 predicts token t; LLaDA's None), and a contradicting value is refused; for
    other types None or "dream". ``block_size``: a block-diffusion student (LLaDA 2.0, BD3-LM; LLaDA
    2.0 trains with 32): each training forward takes the noisy ``input_ids`` and the clean
    ``t3s_clean_ids``, and the patch feeds ``[x_t ; x_0]`` with its block mask (patching/attention.py,
    adapters/block_diffusion.py). In masked-diffusion mode the patch checks that the model attends as
    declared under the masks it sends (at patch time on a random row, and at the first training
    forward on the batch as sent) and refuses a model that does not.

    ``check`` (default True) runs the equivalence check (``equivalence.check_t3s_patch``: two forward
    passes of a 2 x 16 batch; at the first training forward when the parameters are on the meta
    device) and, in masked-diffusion mode, the attention checks; there, there is no unpatched loss of
    the same meaning to compare with. ``check=False`` trusts the model: a masked-diffusion student then
    gets its padding as a 4-D additive mask, which some released model code takes otherwise (Dream's
    inverts it), so leave the check on unless the model has passed it before. Returns the model; raises
    ``TypeError`` / ``ValueError`` naming the reason where the patch cannot be exact (and leaves the model
    unpatched)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if block_size is not None:
        if mode != "masked_diffusion":
            raise ValueError("block_size is for block-diffusion students; use mode='masked_diffusion'")
        check_block_size(block_size)
    if not isinstance(check, bool):
        raise TypeError(f"check must be a bool; got {check!r}")
    if anchors not in ANCHORS:
        raise ValueError(f"anchors must be one of {ANCHORS}; got {anchors!r}")
    if not isinstance(tensor_parallel, bool):
        raise TypeError(f"tensor_parallel must be a bool; got {tensor_parallel!r}")
    for reserved in SET_BY_PATCH:
        if reserved in loss_options:
            raise ValueError(f"{reserved} is set by the patch from the model and the batch; do not pass it "
                             "(ignore_index and teacher inputs go to each forward call)")
    if patched_model(model) is not None and not carries_patch(model):
        raise ValueError(f"{type(model).__name__} wraps {type(patched_model(model)).__name__}, which apply_t3s already "
                         "patched: nothing more to do, the wrapper's forward calls the patched one (give the wrapper "
                         "to T3SDataCollator and the trainer as it is)")
    refuse_wrappers(model)
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"apply_t3s cannot patch {type(model).__name__}: it patches HuggingFace models (an "
                        "nn.Module with a config and an LM head)")
    lm_head(model)
    head_math(model)
    shift = _resolve_shift(model, mode, shift)
    refuse_unsupported(model, mode)
    if carries_patch(model):
        raise ValueError(f"{type(model).__name__} is already patched; call revert_t3s first")
    if patch_class and "forward" in vars(model):
        raise ValueError(f"apply_t3s(patch_class=True): this {type(model).__name__} has a forward of its own on the "
                         f"instance ({describe(vars(model)['forward'])}, e.g. an accelerate hook), which calls the "
                         "class's old forward, so the patched class would never run; patch the instance: "
                         "apply_t3s(model) without patch_class")
    loss = T3SLoss(**loss_options)  # validates the option names and values now, not at the first step
    forward = make_forward(mode, shift, loss)
    # ``loss``: what the equivalence check swaps for the plain loss; ``patched``: how a forward installed
    # over the patch is told from it; ``instance_forward``: a wrapper already on the instance, put back by revert.
    state = dict(mode=mode, shift=shift, anchors=anchors, tensor_parallel=tensor_parallel, loss=loss, patched=forward,
                 block_size=block_size, attention_pending=frozenset({"plain", "padded"})
                 if mode == "masked_diffusion" and check else frozenset())
    if patch_class:
        cls = type(model)
        forward.__signature__ = patched_signature(cls.forward)
        setattr(cls, STATE, dict(state, original=cls.forward))
        cls.forward = forward
    else:
        forward.__signature__ = patched_signature(model.forward)
        setattr(model, STATE, dict(state, original=model.forward,  # bound to model; deepcopy rebinds it
                                   instance_forward=vars(model).get("forward")))
        model.forward = types.MethodType(forward, model)
    backbone = getattr(model, "base_model", None)
    if isinstance(backbone, torch.nn.Module) and backbone is not model:  # TRL's fused head calls it directly
        backbone.register_forward_pre_hook(refuse_bypass, with_kwargs=True)
    if check:
        if _on_meta(model):
            patch_state(model)["deferred_check"] = check_t3s_patch  # at the first training forward
        else:
            try:
                check_t3s_patch(model)
                if mode == "masked_diffusion":
                    _check_attention_now(model, block_size)
            except Exception:
                revert_t3s(model)
                raise
    return model


def revert_t3s(model):
    """Undo ``apply_t3s``: the forward the model had before comes back (a wrapper that was on the
    instance, such as an accelerate hook, included); returns the model. A forward installed over the
    patch since is refused by name rather than dropped."""
    if not carries_patch(model):
        inner = patched_model(model)
        if inner is not None:
            raise ValueError(f"{type(model).__name__} is not patched itself; its {type(inner).__name__} is: "
                             f"revert_t3s(model.{_inner_path(model)})")
        raise ValueError(f"{type(model).__name__} is not patched by apply_t3s")
    over = shadowing_forward(model)
    if over is not None:
        raise ValueError(f"{type(model).__name__}.forward was replaced after apply_t3s (by {describe(over)}); "
                         "revert_t3s would drop that wrapper with the patch: remove it first (del model.forward)")
    if STATE in vars(model):
        previous = vars(model)[STATE].get("instance_forward")
        del model.forward  # the instance attribute; the class's forward shows through again
        if previous is not None:
            model.forward = previous
        delattr(model, STATE)
    else:
        cls = type(model)
        cls.forward = getattr(cls, STATE)["original"]
        delattr(cls, STATE)
    backbone = getattr(model, "base_model", None)
    if isinstance(backbone, torch.nn.Module):
        for key, hook in list(backbone._forward_pre_hooks.items()):  # by identity: a deep copy has its own dict
            if hook is refuse_bypass:
                del backbone._forward_pre_hooks[key]
                backbone._forward_pre_hooks_with_kwargs.pop(key, None)
    return model


def _inner_path(model) -> str:
    """How to reach the patched model inside ``model``'s wrappers, for a message."""
    steps, inner = [], model
    while inner is not None and not carries_patch(inner):
        nxt = inner_model(inner)
        steps.append("get_base_model()" if nxt is not None and hasattr(inner, "peft_config") else
                     next((n for n in ("module", "_orig_mod") if getattr(inner, n, None) is nxt), "?"))
        inner = nxt
    return ".".join(steps)
