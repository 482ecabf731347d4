"""What the patch refuses at ``apply_t3s`` time, or at a forward it cannot make exact, each naming the
reason and the fix."""

from __future__ import annotations

import sys

import torch

from .head import model_configs

# Families whose causal-LM loss compares position t with label t (no shift).
UNSHIFTED_LABELS = ("bart", "mbart", "marian", "pegasus", "plbart", "mvp", "blenderbot", "blenderbot-small",
                    "bigbird_pegasus", "trocr", "whisper", "xlnet", "xlm", "prophetnet", "cpmant")
# What a weight-0 token means for the normalization (apply_t3s's ``anchors``).
ANCHORS = ("ignore", "count")
_WRAPPERS = {"DistributedDataParallel": "DDP", "DataParallel": "DataParallel", "FullyShardedDataParallel": "FSDP1",
             "DeepSpeedEngine": "DeepSpeed", "OptimizedModule": "torch.compile"}


def refuse_wrappers(model) -> None:
    for cls in type(model).__mro__:
        if cls.__name__ in _WRAPPERS:
            raise TypeError(f"apply_t3s got a {_WRAPPERS[cls.__name__]} wrapper ({cls.__name__}); patch the inner "
                            "model before wrapping it: apply_t3s(model), then wrap")


def refuse_unsupported(model, mode: str) -> None:
    """Families and settings whose loss the fused op does not compute."""
    name = type(model).__name__
    for cfg in model_configs(model):
        if mode == "causal" and cfg.model_type in UNSHIFTED_LABELS:
            raise ValueError(f"apply_t3s cannot patch {name} in causal mode: it does not shift its labels (its loss "
                             "scores position t against label t), while the patch shifts them as causal LMs do")
        if getattr(cfg, "z_loss_coefficient", 0):
            raise ValueError(f"apply_t3s cannot patch {name} with z_loss_coefficient={cfg.z_loss_coefficient}: its "
                             "z-loss averages lse^2 over every position, labelled or not, which the fused op does not "
                             "compute; set config.z_loss_coefficient = 0 and pass z_loss= to apply_t3s for the "
                             "per-token z-loss")
    refuse_replaced_loss(model, "apply_t3s cannot patch {name}: its loss_function was replaced by the user; the "
                                "fused op computes causal-LM cross-entropy, not that function")


def refuse_replaced_loss(model, message: str) -> None:
    """A user-set ``model.loss_function`` (an instance attribute): the fused op would ignore it."""
    if "_loss_function" in vars(model):
        raise ValueError(message.format(name=type(model).__name__))


def refuse_counted_anchors(labels, shift_labels, t3s_weights, ignore_index: int) -> None:
    """Under the default ``anchors="ignore"`` a weight-0 token must not carry a label when the caller
    divides by ``num_items_in_batch``: HF counts labels, so the count would include the anchors."""
    target, w = (shift_labels, t3s_weights) if shift_labels is not None else (labels[..., 1:], t3s_weights[..., 1:])
    if bool(((w == 0) & (target != ignore_index)).any()):
        raise ValueError("t3s_weights drops labelled tokens while num_items_in_batch (HF's count of labels) counts "
                         "them, so the loss would shrink by the kept fraction. Give anchors label -100 "
                         "(T3SDataCollator does, by default), or apply_t3s(..., anchors='count') to divide by every "
                         "label token on purpose")


# TRL's SFTTrainer (>= 1.0) replaces ``model.forward`` with its fused LM head (trl's ``add_fused_lm_head``), and
# its compute_loss calls ``model(..., fused_lm_head=True)``: the backbone, then TRL's own loss.
_TRL_FUSED_HEAD = "_fused_forward"
TRL_FIX = ("override SFTTrainer.compute_loss to return model(**inputs, num_items_in_batch=num_items_in_batch).loss, "
           "which runs the patch (integrations/trl_sft_t3s.py), or train with transformers' Trainer")


def _bypassed_by_trl(frame) -> bool:
    """Walking up from ``frame``: TRL's fused head is met before the patched forward (which TRL's
    wrapper calls when it does not take its fused path)."""
    for _ in range(64):
        if frame is None:
            return False
        code, module = frame.f_code, frame.f_globals.get("__name__", "")
        if code.co_name == "forward" and module == f"{__package__}.forward":
            return False
        if code.co_name == _TRL_FUSED_HEAD and module.startswith("trl."):
            return True
        frame = frame.f_back
    return False


def refuse_bypass(backbone, args, kwargs):
    """A forward pre-hook on a patched model's backbone (``model.base_model``): a training forward that
    reaches it through TRL's fused LM head, not through the patch, would ignore ``t3s_weights`` and the
    patch's loss options while the model reads as patched; refused, with the fix."""
    if not (backbone.training and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return None
    if _bypassed_by_trl(sys._getframe(1)):
        raise ValueError(f"TRL's fused LM head (fused_lm_head=True) runs {type(backbone).__name__} and TRL's own loss "
                         "around the T3S patch, so t3s_weights and apply_t3s's loss options would be silently "
                         f"ignored; {TRL_FIX}")
    return None


def refuse_generation_options(kwargs: dict) -> None:
    """Forward options of generation (or of another fused head) that a training loss cannot honour."""
    if kwargs.get("fused_lm_head"):
        raise ValueError("fused_lm_head=True asks TRL's fused LM head (installed under the patch) for its own loss "
                         f"and outputs, which would bypass the T3S loss; {TRL_FIX}")
    keep = kwargs.get("logits_to_keep", 0)
    if not (isinstance(keep, int) and keep == 0):
        raise ValueError("logits_to_keep selects positions for generation; it cannot be combined with labels in "
                         "training (the loss needs every position)")
    if kwargs.get("return_dict") is False:
        raise ValueError("return_dict=False is not supported in a patched training forward (the logits do not "
                         "exist to fill the tuple); use the default return_dict=True")
