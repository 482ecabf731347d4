"""Matmuls with float32 results from half-precision operands.

On CUDA, cuBLAS multiplies bf16/fp16 operands into an fp32 output directly
(``out_dtype``, PyTorch >= 2.8); the logits then never pass through a bf16 rounding and
the dW accumulator stays fp32 across chunks. Where that overload is missing (the CPU,
older PyTorch) the operands are upcast instead, which is exact and only slower.
"""

from __future__ import annotations

import torch

_OUT_DTYPE_OK: dict[str, bool] = {}


def _out_dtype_supported(t: torch.Tensor) -> bool:
    if t.dtype == torch.float32 or t.device.type != "cuda":
        return False
    key = str(t.dtype)
    if key not in _OUT_DTYPE_OK:
        try:
            a = torch.ones(2, 2, device=t.device, dtype=t.dtype)
            torch.mm(a, a, out_dtype=torch.float32)
            acc = torch.zeros(2, 2, device=t.device)
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            _OUT_DTYPE_OK[key] = True
        except (TypeError, RuntimeError):
            _OUT_DTYPE_OK[key] = False
    return _OUT_DTYPE_OK[key]


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as float32, accumulated in float32."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if _out_dtype_supported(a):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` in place, with ``acc`` float32 and ``a``, ``b`` of any float dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif _out_dtype_supported(a):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())
