"""What ``apply_t3s`` records on a patched model (or class): its mode and options, and the forward it
replaced. Read through the model itself, so a deep copy of a patched model calls its own original
forward, not the source's."""

from __future__ import annotations

import types
from typing import Optional

STATE = "_t3s_patch"


def is_t3s_patched(model) -> bool:
    return STATE in vars(model) or STATE in vars(type(model))


def patch_state(model) -> dict:
    """The record ``apply_t3s`` left on ``model`` or on its class."""
    if STATE in vars(model):
        return vars(model)[STATE]
    for cls in type(model).__mro__:
        if STATE in vars(cls):
            return vars(cls)[STATE]
    raise ValueError(f"{type(model).__name__} is not patched by apply_t3s")


def patch_mode(model) -> Optional[str]:
    """The ``mode`` apply_t3s patched ``model`` with ("causal" or "masked_diffusion"), or None."""
    return patch_state(model)["mode"] if is_t3s_patched(model) else None


def original_forward(model):
    """The unpatched forward bound to ``model``."""
    if STATE in vars(model):
        return vars(model)[STATE]["original"]
    return types.MethodType(patch_state(model)["original"], model)


def unpatched_forward(model):
    """The forward that computes ``model``'s own outputs: the original one of a patched model, else its own."""
    return original_forward(model) if is_t3s_patched(model) else model.forward


def patch_block_size(model) -> Optional[int]:
    """The ``block_size`` a masked-diffusion student was patched with (None: full attention, or not patched)."""
    return patch_state(model).get("block_size") if is_t3s_patched(model) else None
