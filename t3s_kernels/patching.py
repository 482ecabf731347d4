"""One-call patching of HuggingFace models: ``apply_t3s(model)`` / ``revert_t3s(model)``.

A patched model, in training with labels, runs its backbone, then the fused op on the last
hidden states and the LM head's weight, and returns ``logits=None``: the [tokens x vocab]
logits never exist. In eval mode, or without labels, it is the unpatched model exactly
(logits, ``logits_to_keep``, caches). It accepts ``t3s_weights`` (B, T): a bool mask (True
keeps a token in the loss) or float weights, aligned with ``labels``.

Works for any ``*ForCausalLM`` with a backbone / LM-head split (``model.model`` and
``model.lm_head``, or ``get_decoder()`` and ``get_output_embeddings()``): Qwen2/3, Llama,
Mistral, Gemma-2/3 (their ``final_logit_softcapping`` is passed through), and
bidirectional masked-diffusion students with the same split (LLaDA 2.0's
``LLaDA2MoeModelLM``) through ``mode="masked_diffusion"``: labels already aligned (no
shift; ``shift="dream"`` for Dream's convention), usually from
:mod:`t3s_kernels.adapters.masked_diffusion`.
"""

from __future__ import annotations

import inspect
import types
from typing import Optional

import torch

from .adapters.causal import causal_lm_loss
from .adapters.masked_diffusion import dream_shift
from .api import T3SLoss

MODES = ("causal", "masked_diffusion")
_STATE = "_t3s_patch"


def split_backbone_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    backbone = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    if backbone is None and hasattr(model, "get_decoder"):
        try:
            backbone = model.get_decoder()
        except (AttributeError, NotImplementedError):
            backbone = None
    if head is None and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
    if not isinstance(backbone, torch.nn.Module) or not isinstance(head, torch.nn.Linear):
        raise TypeError(f"apply_t3s cannot patch {type(model).__name__}: it needs a backbone (model.model) and a "
                        "linear LM head (model.lm_head), as HuggingFace *ForCausalLM models have")
    return backbone, head


def final_softcap(config) -> Optional[float]:
    for cfg in (config, getattr(config, "get_text_config", lambda: None)()):
        cap = getattr(cfg, "final_logit_softcapping", None) if cfg is not None else None
        if cap:
            return float(cap)
    return None


def is_t3s_patched(model) -> bool:
    return _STATE in vars(model) or _STATE in vars(type(model))


def _output(outputs, loss):
    """The model's usual output type, with the loss and no logits."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = {k: v for k, v in outputs.items() if k != "last_hidden_state"}
    allowed = set(inspect.signature(CausalLMOutputWithPast).parameters)
    return CausalLMOutputWithPast(loss=loss, logits=None, **{k: v for k, v in fields.items() if k in allowed})


def _original_forward(model):
    """The unpatched forward bound to ``model``. Looked up through the model itself (not a closure),
    so a deep copy of a patched model calls its own original forward, not the source's."""
    if _STATE in vars(model):
        return vars(model)[_STATE]["original"]
    for cls in type(model).__mro__:
        if _STATE in vars(cls):
            return types.MethodType(vars(cls)[_STATE]["original"], model)
    raise ValueError(f"{type(model).__name__} is not patched by apply_t3s")


def _make_forward(mode: str, shift: Optional[str], loss: T3SLoss):
    """The patched forward."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, t3s_weights=None, shift_labels=None,
                num_items_in_batch=None, logits_to_keep=0, teacher_hidden=None, teacher_topk_ids=None,
                teacher_topk_logprobs=None, **kwargs):
        want_fused = self.training and (labels is not None or shift_labels is not None)
        teacher = dict(teacher_hidden=teacher_hidden, teacher_topk_ids=teacher_topk_ids,
                       teacher_topk_logprobs=teacher_topk_logprobs)
        if not want_fused and any(v is not None for v in teacher.values()):
            raise ValueError("teacher inputs are for the training loss; pass labels too (and train mode)")
        if not want_fused:
            if t3s_weights is not None and self.training:
                raise ValueError("t3s_weights were given without labels; pass labels (or shift_labels) too")
            call = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
            if logits_to_keep:
                call["logits_to_keep"] = logits_to_keep
            if num_items_in_batch is not None:
                call["num_items_in_batch"] = num_items_in_batch
            return _original_forward(self)(**call)
        backbone, head = split_backbone_head(self)
        kwargs.pop("return_dict", None)
        outputs = backbone(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)
        hidden = outputs.last_hidden_state
        options = dict(loss.options)
        options.setdefault("softcap", final_softcap(self.config))
        options.update({k: v for k, v in teacher.items() if v is not None})
        if mode == "masked_diffusion":
            # labels are already aligned with the positions (no shift), -100 where not masked.
            targets = labels if shift_labels is None else shift_labels
            if shift == "dream":
                hidden = dream_shift(hidden)
            out = causal_lm_loss(hidden, head.weight, shift_labels=targets, selection=t3s_weights,
                                 num_items_in_batch=num_items_in_batch, bias=head.bias, **options)
        else:
            out = causal_lm_loss(hidden, head.weight, labels if shift_labels is None else None,
                                 shift_labels=shift_labels, selection=t3s_weights,
                                 num_items_in_batch=num_items_in_batch, bias=head.bias, **options)
        return _output(outputs, out.loss)

    return forward


def apply_t3s(model, *, mode: str = "causal", shift: Optional[str] = None, patch_class: bool = False,
              **loss_options):
    """Patch ``model`` (an instance; with ``patch_class=True`` its class, for every instance) so that
    training forwards with labels use the fused loss. ``loss_options`` are ``fused_linear_t3s_loss``'s
    (``label_smoothing``, ``z_loss``, ``backend``, ``strategy``, ...; for distillation
    ``teacher_weight=teacher.lm_head.weight``, ``kd_weight``, ``kd_loss``, ``temperature``, and then
    ``teacher_hidden=`` or ``teacher_topk_ids=``/``teacher_topk_logprobs=`` in each forward call).
    Returns the model."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if shift not in (None, "dream"):
        raise ValueError(f"shift must be None or 'dream'; got {shift!r}")
    if shift is not None and mode != "masked_diffusion":
        raise ValueError("shift='dream' is a masked-diffusion convention; use mode='masked_diffusion'")
    for reserved in ("bias", "token_weights", "normalizer", "teacher_hidden", "teacher_topk_ids",
                     "teacher_topk_logprobs"):
        if reserved in loss_options:
            raise ValueError(f"{reserved} is set by the patch from the model and the batch; do not pass it "
                             "(teacher inputs go to each forward call)")
    split_backbone_head(model)
    if is_t3s_patched(model):
        raise ValueError(f"{type(model).__name__} is already patched; call revert_t3s first")
    loss = T3SLoss(**loss_options)  # validates the option names and values now, not at the first step
    if patch_class:
        cls = type(model)
        setattr(cls, _STATE, dict(original=cls.forward, mode=mode))
        cls.forward = _make_forward(mode, shift, loss)
    else:
        setattr(model, _STATE, dict(original=model.forward, mode=mode))  # bound to model; deepcopy rebinds it
        model.forward = types.MethodType(_make_forward(mode, shift, loss), model)
    return model


def revert_t3s(model):
    """Undo ``apply_t3s``; returns the model."""
    if _STATE in vars(model):
        del model.forward  # the instance attribute; the class's forward shows through again
        delattr(model, _STATE)
    elif _STATE in vars(type(model)):
        cls = type(model)
        cls.forward = getattr(cls, _STATE)["original"]
        delattr(cls, _STATE)
    else:
        raise ValueError(f"{type(model).__name__} is not patched by apply_t3s")
    return model
