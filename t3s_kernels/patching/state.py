"""What ``apply_t3s`` records on a patched model (or class): its mode and options, the forward it
replaced, and the patched function. Read through the model itself, so a deep copy of a patched model
calls its own original forward, not the source's.

A model that carries no record itself but wraps one that does, in a wrapper whose forward calls the
inner model's (PEFT's ``PeftModel``, DDP / FSDP1 / DeepSpeed's ``module``, torch.compile's
``_orig_mod``), is patched as far as the functions here say: ``T3SDataCollator(model=peft_model)``
and trainers see the patch of the model inside."""

from __future__ import annotations

import types
from typing import Optional

STATE = "_t3s_patch"


# Wrappers whose forward calls the model they hold: the attribute that holds it.
_INNER = {"DistributedDataParallel": "module", "DataParallel": "module", "FullyShardedDataParallel": "module",
          "DeepSpeedEngine": "module", "OptimizedModule": "_orig_mod"}


def carries_patch(model) -> bool:
    """Whether ``model`` itself (or its class) carries apply_t3s's record; wrappers are not looked through."""
    return STATE in vars(model) or STATE in vars(type(model))


def inner_model(model):
    """The model a wrapper of ``_INNER`` or a PEFT model (``get_base_model``) calls, or None."""
    for cls in type(model).__mro__:
        if cls.__name__ in _INNER:
            return getattr(model, _INNER[cls.__name__], None)
    get_base_model = getattr(type(model), "get_base_model", None)
    if callable(get_base_model) and hasattr(model, "peft_config"):
        inner = model.get_base_model()
        return inner if inner is not model else None
    return None


def patched_model(model):
    """The module that carries the patch: ``model``, or the model inside its wrappers; None if none does."""
    for _ in range(8):  # wrappers nest a few deep at most (DDP of a compiled PEFT model)
        if model is None or carries_patch(model):
            return model
        model = inner_model(model)
    return None


def is_t3s_patched(model) -> bool:
    """Whether ``model``, or the model inside its wrappers (PEFT, DDP, torch.compile), is patched."""
    return patched_model(model) is not None


def patch_state(model) -> dict:
    """The record ``apply_t3s`` left on ``model`` or on its class."""
    if STATE in vars(model):
        return vars(model)[STATE]
    for cls in type(model).__mro__:
        if STATE in vars(cls):
            return vars(cls)[STATE]
    raise ValueError(f"{type(model).__name__} is not patched by apply_t3s")


def patch_mode(model) -> Optional[str]:
    """The ``mode`` apply_t3s patched ``model`` (or the model inside its wrappers) with ("causal" or
    "masked_diffusion"), or None."""
    inner = patched_model(model)
    return None if inner is None else patch_state(inner)["mode"]


def shadowing_forward(model):
    """The forward that ``model(...)`` calls instead of the patch, installed on the instance after
    apply_t3s (TRL's fused LM head, a hook), or None when calling the model reaches the patch first."""
    instance = vars(model).get("forward")
    if instance is None:
        return None
    if STATE in vars(model):
        return None if getattr(instance, "__func__", None) is vars(model)[STATE]["patched"] else instance
    return instance  # the class is patched; an instance forward hides it


def describe(fn) -> str:
    """A forward's qualified name, for messages."""
    fn = getattr(fn, "__func__", fn)
    fn = getattr(fn, "func", fn)  # functools.partial (accelerate's hooks)
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def original_forward(model):
    """The unpatched forward bound to ``model``."""
    if STATE in vars(model):
        return vars(model)[STATE]["original"]
    return types.MethodType(patch_state(model)["original"], model)


def unpatched_forward(model):
    """The forward that computes ``model``'s own outputs: the original one of a patched model, else its own."""
    return original_forward(model) if carries_patch(model) else model.forward


def patch_block_size(model) -> Optional[int]:
    """The ``block_size`` a masked-diffusion student (or the model inside its wrappers) was patched with
    (None: full attention, or not patched)."""
    inner = patched_model(model)
    return None if inner is None else patch_state(inner).get("block_size")
