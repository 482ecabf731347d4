"""Input checks: every error names the argument and what was expected. The checks of the declared
options (options.py) are built from the primitives at the top."""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The dtypes by the names the command line and the tools take.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_number(name: str, value, *, low=None, high=None, low_open=False, high_open=False,
                 allow_none=False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite real number; got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}; got {value!r}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}; got {value!r}")


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {value!r}")


def check_whole_number(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int; got {value!r}")


def check_positive_int(name: str, value) -> None:
    """A positive int, or None (the default)."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ValueError(f"{name} must be a positive int; got {value!r}")


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def check_not_distributed(name: str, t: torch.Tensor) -> None:
    """Refuse the distributed parameter kinds the op cannot read as a plain (V, H) tensor: it would
    see the global shape of a DTensor but only the local rows (silently wrong), or the empty
    placeholder of a ZeRO-3 partition."""
    if is_dtensor(t):
        raise TypeError(f"{name} is a DTensor (placements {tuple(t.placements)}); the op takes plain tensors. "
                        "Under FSDP2, call it through the patched model (apply_t3s), whose head runs inside FSDP2's "
                        f"all-gather; a head sharded over the vocabulary (tensor parallelism): say so with "
                        f"vocab_parallel={name}.device_mesh")
    if is_zero3_partitioned(t):
        raise ValueError(f"{name} is a DeepSpeed ZeRO-3 partitioned parameter (ds_id {t.ds_id}, shape "
                         f"{tuple(t.shape)}) that was not gathered: call the op inside the engine's forward")


def is_zero3_partitioned(t) -> bool:
    """A DeepSpeed ZeRO-3 parameter whose data is partitioned away (an empty placeholder with ``ds_id``)."""
    return isinstance(t, torch.Tensor) and hasattr(t, "ds_id") and t.numel() == 0


def _check_float_tensor(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    check_not_distributed(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16; got {t.dtype}")


def check_head_inputs(hidden, weight, labels, bias, token_weights) -> None:
    """Shapes, dtypes and devices of the op's tensor arguments (their values: ``check_head_values``)."""
    _check_float_tensor("hidden", hidden)
    _check_float_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (V, H); got shape {tuple(weight.shape)}")
    rows, h = weight.shape
    if hidden.dim() < 1 or hidden.shape[-1] != h:
        raise ValueError(f"hidden must have shape (..., H) with H = weight.shape[1] = {h}; "
                         f"got shape {tuple(hidden.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must share a dtype; got hidden {hidden.dtype}, weight {weight.dtype} "
                        "(cast one, or call inside torch.autocast)")
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an int64 or int32 tensor; got "
                        f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}; "
                         f"got {tuple(labels.shape)}")
    if bias is not None:
        _check_float_tensor("bias", bias)
        if tuple(bias.shape) != (rows,):
            raise ValueError(f"bias must have shape (V,) = ({rows},), the weight's rows; got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias must have the weight's dtype {weight.dtype}; got {bias.dtype}")
    if token_weights is not None:
        if not isinstance(token_weights, torch.Tensor) or not token_weights.is_floating_point():
            raise TypeError("token_weights must be a floating-point tensor")
        if tuple(token_weights.shape) != tuple(labels.shape):
            raise ValueError(f"token_weights must have the labels' shape {tuple(labels.shape)}; "
                             f"got {tuple(token_weights.shape)}")
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias), ("token_weights", token_weights)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")


def check_head_values(labels: torch.Tensor, token_weights: Optional[torch.Tensor], ignore_index: int,
                      vocab: int) -> None:
    """The checks that read the tensors' values (the label range, the weights' signs): inside the
    operator, where they do not break a compiled graph."""
    if labels.numel():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            first = labels[bad][0].item()
            raise ValueError(f"labels must lie in [0, V) = [0, {vocab}) or equal ignore_index={ignore_index}; "
                             f"found {first}")
    if token_weights is not None and token_weights.numel():
        w = token_weights
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError("token_weights must be finite and >= 0 (0 drops a token from the loss)")


def check_normalizer(normalizer, reduction: str) -> None:
    """A number >= 0 or a 0-d real tensor (whose value the operator checks: ``normalizer_value``), and
    not with reduction='none'."""
    if normalizer is None:
        return
    if reduction == "none":
        raise ValueError("normalizer divides a summed loss; it cannot be used with reduction='none'")
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a number or a 0-d tensor; got a tensor of shape "
                             f"{tuple(normalizer.shape)}")
        if normalizer.is_complex() or normalizer.dtype == torch.bool:
            raise TypeError(f"normalizer must be a real number; got a {normalizer.dtype} tensor")
    else:
        check_number("normalizer", normalizer, low=0)  # 0: HF's count for a step without label tokens


def normalizer_value(normalizer: torch.Tensor) -> float:
    """A tensor normalizer's value, checked as a number is by ``check_normalizer``."""
    value = float(normalizer.item())
    check_number("normalizer", value, low=0)
    return value


def check_teacher(hidden, weight, *, teacher_hidden=None, teacher_weight=None, teacher_bias=None,
                  teacher_topk_ids=None, teacher_topk_logprobs=None, kd_weight=0.0) -> bool:
    """The teacher's inputs; True when a teacher is given. A dense teacher's head has the student's
    vocabulary. (A sparse teacher's values: ``check_teacher_values``.)"""
    dense = any(t is not None for t in (teacher_hidden, teacher_weight, teacher_bias))
    sparse = teacher_topk_ids is not None or teacher_topk_logprobs is not None
    if dense and sparse:
        raise ValueError("give a dense teacher (teacher_hidden, teacher_weight) or a sparse one "
                         "(teacher_topk_ids, teacher_topk_logprobs), not both")
    if not dense and not sparse:
        if kd_weight:
            raise ValueError("kd_weight > 0 needs a teacher: teacher_hidden and teacher_weight, or "
                             "teacher_topk_ids and teacher_topk_logprobs")
        return False
    lead, vocab = tuple(hidden.shape[:-1]), weight.shape[0]
    if dense:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("a dense teacher needs both teacher_hidden and teacher_weight")
        _check_float_tensor("teacher_hidden", teacher_hidden)
        _check_float_tensor("teacher_weight", teacher_weight)
        if teacher_weight.dim() != 2 or teacher_weight.shape[0] != vocab:
            raise ValueError(f"teacher_weight must have shape (V, Ht) with the student's V = {vocab}; "
                             f"got {tuple(teacher_weight.shape)}")
        if tuple(teacher_hidden.shape) != lead + (teacher_weight.shape[1],):
            raise ValueError(f"teacher_hidden must have shape hidden.shape[:-1] + (Ht,) = "
                             f"{lead + (teacher_weight.shape[1],)}; got {tuple(teacher_hidden.shape)}")
        if teacher_hidden.dtype != teacher_weight.dtype:
            raise TypeError(f"teacher_hidden and teacher_weight must share a dtype; got {teacher_hidden.dtype} "
                            f"and {teacher_weight.dtype}")
        if teacher_bias is not None and tuple(teacher_bias.shape) != (vocab,):
            raise ValueError(f"teacher_bias must have shape (V,) = ({vocab},); got {tuple(teacher_bias.shape)}")
        if teacher_bias is not None and teacher_bias.dtype != teacher_weight.dtype:
            raise TypeError(f"teacher_bias must have teacher_weight's dtype {teacher_weight.dtype}; "
                            f"got {teacher_bias.dtype}")
        tensors = (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                   ("teacher_bias", teacher_bias))
    else:
        if teacher_topk_ids is None or teacher_topk_logprobs is None:
            raise ValueError("a sparse teacher needs both teacher_topk_ids and teacher_topk_logprobs")
        if teacher_topk_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"teacher_topk_ids must be int64 or int32; got {teacher_topk_ids.dtype}")
        if teacher_topk_ids.dim() != len(lead) + 1 or tuple(teacher_topk_ids.shape[:-1]) != lead:
            raise ValueError(f"teacher_topk_ids must have shape hidden.shape[:-1] + (K,) = {lead} + (K,); "
                             f"got {tuple(teacher_topk_ids.shape)}")
        if tuple(teacher_topk_logprobs.shape) != tuple(teacher_topk_ids.shape):
            raise ValueError(f"teacher_topk_logprobs must have teacher_topk_ids' shape "
                             f"{tuple(teacher_topk_ids.shape)}; got {tuple(teacher_topk_logprobs.shape)}")
        if not teacher_topk_logprobs.is_floating_point():
            raise TypeError("teacher_topk_logprobs must be floating point")
        if teacher_topk_ids.shape[-1] == 0:
            raise ValueError("teacher_topk_ids must hold K >= 1 tokens per position; got K = 0")
        tensors = (("teacher_topk_ids", teacher_topk_ids), ("teacher_topk_logprobs", teacher_topk_logprobs))
    for name, t in tensors:
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    return True


def check_teacher_values(topk_ids: Optional[torch.Tensor], topk_logprobs: Optional[torch.Tensor],
                         vocab: int) -> None:
    """A sparse teacher's values: ids in [0, vocab) and distinct, log-probabilities finite, <= 0 and
    of total mass <= 1 (inside the operator, as ``check_head_values``)."""
    if topk_ids is None or not topk_ids.numel():
        return
    if bool(((topk_ids < 0) | (topk_ids >= vocab)).any()):
        raise ValueError(f"teacher_topk_ids must lie in [0, V) = [0, {vocab})")
    lp = topk_logprobs
    if not bool(torch.isfinite(lp).all()) or bool((lp > 1e-6).any()):
        raise ValueError("teacher_topk_logprobs must be finite log-probabilities (<= 0)")
    ordered = topk_ids.sort(-1).values
    if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
        raise ValueError("teacher_topk_ids repeats a token within a position; each of the K ids must differ")
    mass = lp.double().exp().sum(-1)
    if bool((mass > 1 + 1e-4).any()):
        raise ValueError(f"teacher_topk_logprobs sum to more than probability 1 at some position "
                         f"(up to {float(mass.max()):.6f}); they must be log-probabilities of distinct tokens")
