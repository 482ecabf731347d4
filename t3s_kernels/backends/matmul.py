"""Matmuls with float32 results from half-precision operands.

On CUDA, cuBLAS multiplies bf16/fp16 operands into an fp32 output directly
(``out_dtype``, PyTorch >= 2.8): the logits never pass through a bf16 rounding and the dW
accumulator stays fp32 across chunks, at tensor-core speed. Each overload is probed once;
where ``mm`` lacks it on CUDA the product is rounded to the operands' dtype and upcast (the
precision of the matmul itself), never recomputed in slow fp32. On the CPU the operands
are upcast, which is exact.
"""

from __future__ import annotations

from typing import Optional

import torch

_SUPPORT: dict[tuple, bool] = {}


def _supports(kind: str, t: torch.Tensor) -> bool:
    key = (kind, t.device.type, t.dtype)
    if key not in _SUPPORT:
        try:
            a = torch.ones(2, 2, device=t.device, dtype=t.dtype)
            if kind == "mm":
                torch.mm(a, a, out_dtype=torch.float32)
            elif kind == "mm_out":
                torch.mm(a, a, out_dtype=torch.float32, out=torch.empty(2, 2, device=t.device))
            else:
                acc = torch.zeros(2, 2, device=t.device)
                torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            _SUPPORT[key] = True
        except (TypeError, RuntimeError, NotImplementedError):
            _SUPPORT[key] = False
    return _SUPPORT[key]


def mm_f32(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a @ b`` as float32 (into ``out``, float32, for float32 operands)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    assert out is None, "out= is only for float32 operands"
    if a.device.type != "cuda":
        return torch.mm(a.float(), b.float())
    if _supports("mm", a):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).float()


def mm_into_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """``out = a @ b`` (or ``out += a @ b`` with ``accumulate``) in place, ``out`` float32 or of the
    operands' dtype. Writing the first product instead of adding it to zeros saves a fill and a read."""
    if accumulate:
        if out.dtype == a.dtype:
            out.addmm_(a, b)
        else:
            addmm_f32_(out, a, b)
    elif out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    elif a.device.type != "cuda":
        torch.mm(a.float(), b.float(), out=out)
    elif _supports("mm_out", a):
        torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:
        out.copy_(mm_f32(a, b))


def addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` in place, with ``acc`` float32 and ``a``, ``b`` of any float dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.device.type != "cuda":
        acc.addmm_(a.float(), b.float())
    elif _supports("addmm", a):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += mm_f32(a, b)
