"""How ``t3s bench`` measures: median time (CUDA events on a GPU), peak memory above the inputs
(the CUDA allocator, or the CPU profiler's allocation events), the matmul floor, and the error
against a float64 reference computed in row chunks."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from typing import Callable

import torch

from ..reference import reference_t3s_loss
from .providers import Inputs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Median wall time in ms (CUDA events on a GPU); the caller has warmed ``fn`` up."""
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's native start/stop lines, which bypass Python's sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device):
    """(result of fn, peak bytes allocated during fn above what was allocated before it)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        _sync(device)
        return result, torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return result, peak


def reference_grads(inputs: Inputs, chunk_rows: int = 1024):
    """float64 loss, dX, dW of the mean selected cross-entropy, row chunk by row chunk
    (exact: the mean's divisor is known up front), so it fits where the full logits would not."""
    x, w, y, tw = inputs.hidden, inputs.weight, inputs.labels, inputs.token_weights
    divisor = max(int((tw != 0).sum()), 1)
    w64 = w.detach().double().requires_grad_()
    dx = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    loss = torch.zeros((), dtype=torch.float64, device=x.device)
    for r0 in range(0, x.shape[0], chunk_rows):
        xc = x[r0:r0 + chunk_rows].detach().double().requires_grad_()
        part, _ = reference_t3s_loss(xc, w64, y[r0:r0 + chunk_rows], token_weights=tw[r0:r0 + chunk_rows],
                                     reduction="sum")
        part = part / divisor
        part.backward()
        dx[r0:r0 + chunk_rows] = xc.grad
        loss += part.detach()
    return loss, dx, w64.grad


def max_rel_error(got: tuple, want: tuple) -> float:
    errs = []
    for g, r in zip(got, want):
        if g is None:
            continue
        g, r = g.detach().double(), r.detach().double()
        errs.append(((g - r).abs().max() / r.abs().max().clamp(min=1e-30)).item())
    return max(errs) if errs else float("nan")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def matmul_floor(inputs: Inputs, device: torch.device, repeat: int) -> tuple[float, float]:
    """Time of the logits matmul, and of the three a fwd+bwd needs (logits, dX, dW)."""
    x, w = inputs.hidden, inputs.weight
    with torch.no_grad():
        dz = torch.empty(x.shape[0], w.shape[0], device=device, dtype=x.dtype)

        def three():
            torch.mm(x, w.t(), out=dz)
            torch.mm(dz, w)
            torch.mm(dz.t(), x)

        torch.mm(x, w.t(), out=dz)
        one_ms = time_ms(lambda: torch.mm(x, w.t(), out=dz), device, repeat)
        three()
        three_ms = time_ms(three, device, repeat)
    return one_ms, three_ms
