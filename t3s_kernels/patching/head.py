"""The model's LM head and its head math, read from its config: what the model does to the head's
output before its loss (a logit scale, a soft cap, a padded vocabulary's extra entries dropped)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..options import TRANSFORM_OPTIONS, LogitTransform
from .distributed import is_plain_linear

SOFTCAP_NAMES = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
# model_type -> how the model scales the head's output: logits * f(config, model).
LOGIT_SCALES = {
    **{t: lambda cfg, m: 1.0 / cfg.logits_scaling  # logits / logits_scaling
       for t in ("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared", "granitemoehybrid")},
    **{t: lambda cfg, m: getattr(m, "logit_scale", None) or cfg.logit_scale or 1.0  # logits * logit_scale
       for t in ("cohere", "cohere2", "cohere2_moe", "cohere_compass_text")},
    "hyperclovax": lambda cfg, m: cfg.logits_scaling,  # logits * logits_scaling (not a divisor here)
    "falcon_h1": lambda cfg, m: m.model.lm_head_multiplier,
    "llada": lambda cfg, m: 1.0 / math.sqrt(cfg.d_model) if getattr(cfg, "scale_logits", False) else 1.0,
}
# Models whose LM head may be their input embedding applied as a linear map inside the forward, with no
# module call to capture (LLaDA with weight_tying: ``F.linear(x, transformer.wte.weight)``): model_type ->
# (the object holding the tie flag, the flag, the module the untied head would be an attribute of, that
# attribute, the embedding), or None when the model's head is untied.
TIED_HEADS = {
    "llada": lambda m: (m.model.config, "weight_tying", m.model.transformer, "ff_out", m.model.transformer.wte)
    if getattr(getattr(getattr(m, "model", None), "config", None), "weight_tying", False) else None,
}


class TiedHead(torch.nn.Module):
    """An input embedding used as the LM head, as a Linear without a module call: its ``weight`` is the
    embedding's (the gradient reaches the one parameter from both uses), and the capture (capture.py)
    unties the model for one forward, this module's stand-in in the untied head's place."""

    def __init__(self, flag_owner, flag: str, parent: torch.nn.Module, attr: str, embedding: torch.nn.Embedding):
        super().__init__()
        self.__dict__.update(flag_owner=flag_owner, flag=flag, parent=parent, attr=attr, embedding=embedding)
        self.out_features, self.in_features = embedding.weight.shape
        self.bias = None

    @property
    def weight(self) -> torch.nn.Parameter:
        return self.embedding.weight


@dataclass(frozen=True, kw_only=True)
class HeadMath(LogitTransform):
    """What the model does to the head's output z: the logit transform (the op's own options of that name,
    ``options.LogitTransform``), on the first ``vocab_size`` entries only (None: all of the head's)."""

    vocab_size: Optional[int] = None

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        return super().apply(z[..., :self.vocab_size] if self.vocab_size is not None else z)

    def transform(self) -> dict:
        """The op's logit-transform options (``softcap``, ``logit_scale``) that reproduce this head math."""
        return {name: getattr(self, name) for name in TRANSFORM_OPTIONS}


def model_configs(model) -> tuple:
    """The model's config, and its text config where a multimodal model has one."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return (config, text) if text is not config else (config,)


def head_math(model) -> HeadMath:
    """The model's head math, from its config (see ``LOGIT_SCALES``, ``SOFTCAP_NAMES``)."""
    scale, cap, vocab = 1.0, None, None
    for cfg in model_configs(model):
        if cfg.model_type in LOGIT_SCALES:
            scale = float(LOGIT_SCALES[cfg.model_type](cfg, model))
        for name in SOFTCAP_NAMES:
            if getattr(cfg, name, None):
                cap = float(getattr(cfg, name))
        if getattr(cfg, "unpadded_vocab_size", None):
            vocab = int(cfg.unpadded_vocab_size)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"apply_t3s: {type(model).__name__}'s logit scale is {scale}; expected a finite number > 0")
    return HeadMath(logit_scale=scale, softcap=cap, vocab_size=vocab)


def lm_head(model) -> torch.nn.Linear:
    """The model's LM head: the module whose output is the logits (``get_output_embeddings()``), or for a
    model in ``TIED_HEADS`` with a tied head, its ``TiedHead``."""
    for cfg in model_configs(model):
        tied = TIED_HEADS.get(getattr(cfg, "model_type", None))
        form = tied(model) if tied is not None else None
        if form is not None:
            return TiedHead(*form)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        head = getattr(model, "lm_head", None)
    if head is None:
        raise TypeError(f"apply_t3s cannot patch {type(model).__name__}: it has no LM head "
                        "(get_output_embeddings() / lm_head), as HuggingFace causal LMs have")
    if not is_plain_linear(head):
        kind = f"{type(head).__module__}.{type(head).__qualname__}"
        if type(head).__module__.startswith("peft."):
            raise TypeError(f"apply_t3s cannot patch {type(model).__name__}: its LM head carries a PEFT adapter "
                            f"({kind}), whose extra term the fused op does not compute; leave the head out of the "
                            "adapter (target_modules without lm_head; modules_to_save trains it in full), or merge "
                            "the adapter first (merge_and_unload)")
        raise TypeError(f"apply_t3s cannot patch {type(model).__name__}: its LM head is a {kind}, not exactly "
                        "torch.nn.Linear, so its forward may scale or transform the logits in ways the fused op does "
                        "not reproduce; use a plain nn.Linear head")
    return head


def kept_vocabulary(weight, bias, vocab_size: Optional[int]):
    """The head's weight rows and bias entries of the real vocabulary: a model that pads its vocabulary
    drops the extra entries' logits (``HeadMath.vocab_size``), and so does the loss."""
    if vocab_size is not None and weight.shape[0] > vocab_size:
        return weight[:vocab_size], None if bias is None else bias[:vocab_size]
    return weight, bias
