"""Running a model with its LM head captured: the head's input (the hidden states after whatever the
model does to them first: a BERT-style transform, MiniCPM3's hidden scale, ...) is kept, and the head
returns a (1, 1, V) *probe* row instead of the [tokens x vocab] logits. What the model then does to
the probe row must equal its declared head math (``head.head_math``); anything else is refused.

``capture_head_inputs`` is the public entry: the patched forward and scoring (pipeline/scoring.py)
both evaluate the head through what it returns, so that scoring sees the same head math as training.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch

from ..api import TokenStats, token_stats
from .head import HeadMath, TiedHead, head_math, kept_vocabulary, lm_head
from .state import unpatched_forward


def accepts(fn, name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name`` (by name, or through ``**kwargs``)."""
    params = inspect.signature(fn).parameters.values()
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the spacing of the dtype's numbers at 1 (0 for float32, whose rounding the tolerances absorb)."""
    return {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}.get(dtype, 0.0)


def probe_row(vocab: int, device: torch.device) -> torch.Tensor:
    """A fixed (1, 1, V) float32 row of distinct values in [-4, 4): what the capture returns as logits.
    The fractional parts of i * (golden ratio), computed in float64, are distinct and spread evenly;
    plain arithmetic, so a compiled forward traces it."""
    i = torch.arange(vocab, dtype=torch.float64, device=device)
    return (torch.frac(i * 0.6180339887498949) * 8 - 4).float().view(1, 1, vocab)


class _HeadStandIn(torch.nn.Module):
    """Stands in for the LM head: records its input and returns a copy of the probe row. Other
    attributes (``weight``, for a model that reads the head's dtype) come from the head."""

    def __init__(self, head: torch.nn.Linear):
        super().__init__()
        self.out_features, self.inputs = head.out_features, []
        self.__dict__["_head"] = head  # not registered as a submodule

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_head"], name)

    def forward(self, x):
        self.inputs.append(x)
        return probe_row(self.out_features, x.device)  # a fresh row: the model may write into it


class _HeadSwapped:
    """Within the context, the model's LM head module is replaced in its parent by a stand-in.

    The head module itself is not called, so hooks on it (FSDP2's unshard / reshard, for a head
    sharded in a group of its own or with the final norm) do not run: its parameters stay as the
    rest of the forward left them, for the fused op to use."""

    def __init__(self, model, head: torch.nn.Linear):
        self.head, self.stand_in = head, _HeadStandIn(head)
        if isinstance(head, TiedHead):  # the model untied for this forward, the stand-in its untied head
            self.parent, self.attr = head.parent, head.attr
            return
        for name, module in model.named_modules():
            if module is head and name:
                parent_name, _, self.attr = name.rpartition(".")
                self.parent = model.get_submodule(parent_name) if parent_name else model
                break
        else:
            raise ValueError(f"apply_t3s: {type(model).__name__}'s LM head is not one of its submodules")

    def __enter__(self) -> _HeadStandIn:
        if isinstance(self.head, TiedHead):
            setattr(self.head.flag_owner, self.head.flag, False)
        setattr(self.parent, self.attr, self.stand_in)
        return self.stand_in

    def __exit__(self, *exc):
        if isinstance(self.head, TiedHead):
            delattr(self.parent, self.attr)
            setattr(self.head.flag_owner, self.head.flag, True)
        else:
            setattr(self.parent, self.attr, self.head)
        return False


@dataclass
class HeadInputs:
    """What the fused op needs to evaluate a model's head: the head's input, its weight and bias (of the
    real vocabulary), the head math, and the model's output without logits."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    math: HeadMath
    outputs: object

    def token_stats(self, hidden: torch.Tensor, targets: torch.Tensor) -> TokenStats:
        """``token_stats`` of ``hidden`` (these hidden states, or a slice of them) against ``targets``,
        through this head and its head math, as training evaluates it."""
        return token_stats(hidden, self.weight, targets, bias=self.bias, **self.math.transform())


def run_with_head_captured(model, forward, *args, **kwargs) -> HeadInputs:
    """Call ``forward`` (an unpatched forward of ``model``; labels are not passed) with the LM head
    captured, check what the model did to the probe row against :func:`head_math`, and return the
    head's inputs. Raises ``ValueError`` where the model does something else."""
    name = type(model).__name__
    head = lm_head(model)
    math_ = head_math(model)
    with _HeadSwapped(model, head) as stand_in:
        outputs = forward(*args, **kwargs)
    if len(stand_in.inputs) != 1:
        raise ValueError(f"apply_t3s: {name} called its LM head {len(stand_in.inputs)} times in one forward; the "
                         "patch supports models that call it once")
    logits = outputs.get("logits") if hasattr(outputs, "get") else None
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"apply_t3s: {name}'s forward returned no logits tensor; cannot verify its head math")
    probe = probe_row(head.out_features, logits.device)
    expected = math_.apply(probe)
    if tuple(logits.shape) != tuple(expected.shape):
        raise ValueError(f"apply_t3s: {name} reshapes its LM head's output ({tuple(probe.shape)} became "
                         f"{tuple(logits.shape)}, the head math expects {tuple(expected.shape)}); not supported")
    err = (logits.float() - expected).abs().max()
    tol = 2 * unit_roundoff(logits.dtype) or 1e-5  # a half-precision output rounds each probe value once
    agrees = err <= tol * expected.abs().max().clamp(min=1.0)
    if torch.compiler.is_compiling():  # no host sync in a compiled graph: the check raises when it runs
        torch._assert_async(agrees, "apply_t3s: the model transforms its LM head's output in a way the patch does "
                            "not model; the fused loss would be silently wrong, so it is refused")
    elif not bool(agrees):
        raise ValueError(f"apply_t3s: {name} transforms its LM head's output in a way the patch does not model "
                         f"(model_type {model.config.model_type!r}, declared head math {math_}; the probe row "
                         f"differs by {err.item():.3g}); the fused loss would be silently wrong, so it is refused")
    weight, bias = kept_vocabulary(head.weight, head.bias, math_.vocab_size)
    return HeadInputs(stand_in.inputs[0], weight, bias, math_, outputs)


def capture_head_inputs(model, **forward_kwargs) -> HeadInputs:
    """The head's inputs for a forward of ``model`` (patched or not; no labels, no cache): what scoring
    evaluates ``token_stats`` on, with the head math training uses."""
    forward = unpatched_forward(model)
    if accepts(forward, "use_cache"):
        forward_kwargs.setdefault("use_cache", False)
    return run_with_head_captured(model, forward, **forward_kwargs)
