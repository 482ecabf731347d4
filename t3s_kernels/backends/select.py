"""Which engine evaluates the head: a backend ("torch" or "triton") and, on Triton, a training
strategy ("chunked" or "tile"), resolved for the tensors' device."""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..options import DEFAULT_STRATEGY
from .chunked import ChunkedEngine
from .cpu_epilogue import cpu_epilogue
from .torch_epilogue import TorchEpilogue


def triton_available(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, or anywhere under TRITON_INTERPRET=1 (the tests)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(device: torch.device, backend: str) -> str:
    """"auto" is Triton on CUDA (when installed), PyTorch elsewhere."""
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available(device) else "torch"
    return backend


def make_engine(device: torch.device, backend: str, strategy: str, chunk_budget_bytes: Optional[int] = None,
                chunk_rows: Optional[int] = None, vocab_chunk: Optional[int] = None,
                grad_accum_dtype: str = "float32", logits_dtype: str = "float32"):
    """The engine that evaluates the head for the given backend / strategy on ``device``
    (``chunk_rows`` / ``vocab_chunk`` fix the chunked strategies' chunk shape instead of the budget;
    ``grad_accum_dtype``: options.GRAD_ACCUM_DTYPES; ``logits_dtype``: "float32" or "input")."""
    backend = resolve_backend(device, backend)
    if backend == "torch":
        if strategy == "tile":
            raise ValueError("strategy='tile' needs backend='triton'; the torch backend is chunked")
        epilogue = cpu_epilogue() if device.type == "cpu" else TorchEpilogue()
        return ChunkedEngine(epilogue, chunk_budget_bytes, chunk_rows, vocab_chunk, grad_accum_dtype, logits_dtype)
    if not triton_available(device):
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1) and the triton package; "
                         f"got tensors on {device}")
    from .triton_engines import TileEngine, TritonEpilogue  # they import triton: only when asked

    strategy = DEFAULT_STRATEGY if strategy == "auto" else strategy
    if strategy == "tile":
        return TileEngine()
    return ChunkedEngine(TritonEpilogue(), chunk_budget_bytes, chunk_rows, vocab_chunk, grad_accum_dtype,
                         logits_dtype)
