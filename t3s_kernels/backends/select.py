"""Which engine evaluates the head: a backend ("torch" or "triton") resolved for the tensors' device,
the chunked engine for the loss, and for forward-only statistics on Triton the forward tile kernel."""

from __future__ import annotations

import os
from typing import Optional

import torch

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


def make_engine(device: torch.device, backend: str, chunk_budget_bytes: Optional[int] = None,
                chunk_rows: Optional[int] = None, vocab_chunk: Optional[int] = None,
                grad_accum_dtype: str = "float32", logits_dtype: str = "float32"):
    """The chunked engine of the loss for the given backend on ``device`` (``chunk_rows`` /
    ``vocab_chunk`` fix its chunk shape instead of the budget; ``grad_accum_dtype``:
    options.GRAD_ACCUM_DTYPES; ``logits_dtype``: "float32" or "input")."""
    backend = resolve_backend(device, backend)
    if backend == "torch":
        epilogue = cpu_epilogue() if device.type == "cpu" else TorchEpilogue()
        return ChunkedEngine(epilogue, chunk_budget_bytes, chunk_rows, vocab_chunk, grad_accum_dtype, logits_dtype)
    _check_triton(device)
    from .triton_engines import TritonEpilogue  # it imports triton: only when asked

    return ChunkedEngine(TritonEpilogue(), chunk_budget_bytes, chunk_rows, vocab_chunk, grad_accum_dtype,
                         logits_dtype)


def stats_engine(device: torch.device, backend: str, chunk_budget_bytes: Optional[int] = None):
    """The engine of forward-only statistics (``token_stats``): on Triton the forward tile kernel (one
    matmul's FLOPs, O(N) memory), on the torch backend the chunked one."""
    if resolve_backend(device, backend) == "torch":
        return make_engine(device, "torch", chunk_budget_bytes=chunk_budget_bytes)
    _check_triton(device)
    from .triton_engines import TileForwardEngine

    return TileForwardEngine()


def _check_triton(device: torch.device) -> None:
    if not triton_available(device):
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1) and the triton package (a "
                         f"CUDA build of torch ships it; elsewhere the 'triton' extra); got tensors on {device}")
