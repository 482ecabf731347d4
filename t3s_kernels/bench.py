"""``t3s bench``: the fused loss against PyTorch eager, torch.compile and the peers.

Every provider computes the same function: mean cross-entropy over the selected tokens of
``hidden @ weight.T`` (the peers see unselected tokens as ignored labels; ours sees them
as weight-0 tokens, which it still scores). For each: forward time (no grad), forward +
backward time, peak memory above the inputs during forward + backward, and the largest
relative error of (loss, dX, dW) against a float64 reference. Beside them, the matmul
floor: the time of 1 and of 3 matmuls of the same shape and dtype.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from .api import fused_linear_t3s_loss, token_stats, triton_available
from .reference import reference_t3s_loss

IGNORE = -100
GPU_DEFAULT = dict(tokens=16384, hidden=4096, vocab=151936, dtype="bf16")  # Qwen3-8B's head
CPU_DEFAULT = dict(tokens=2048, hidden=256, vocab=65536, dtype="fp32")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Inputs:
    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor  # full labels
    masked_labels: torch.Tensor  # IGNORE at unselected tokens, for providers without token weights
    token_weights: torch.Tensor  # 1 selected, 0 not

    @staticmethod
    def make(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device: torch.device, select: float,
             seed: int = 0) -> "Inputs":
        g = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn(tokens, hidden, generator=g).to(device=device, dtype=dtype)
        w = (torch.randn(vocab, hidden, generator=g) * (2.0 / hidden**0.5)).to(device=device, dtype=dtype)
        y = torch.randint(0, vocab, (tokens,), generator=g).to(device)
        selected = (torch.rand(tokens, generator=g) < select).to(device)
        return Inputs(x, w, y, torch.where(selected, y, torch.full_like(y, IGNORE)), selected.float())


# A provider maps inputs to a callable that runs the loss (and its backward when grad=True)
# and returns (loss, dX, dW); None where it cannot run here, with the reason.
Provider = Callable[[Inputs, bool], Callable[[], tuple]]


def _leaf(t: torch.Tensor, grad: bool) -> torch.Tensor:
    return t.detach().requires_grad_(grad)


def _runner(loss_fn, inputs: Inputs, grad: bool):
    x, w = _leaf(inputs.hidden, grad), _leaf(inputs.weight, grad)

    def run():
        x.grad = w.grad = None
        if not grad:
            with torch.no_grad():
                return loss_fn(x, w), None, None
        loss = loss_fn(x, w)
        loss.backward()
        return loss, x.grad, w.grad

    return run


def eager_loss(x, w, labels):
    """What a HF model does: full logits in the inputs' dtype, upcast to fp32, cross-entropy (the
    reference in that mode)."""
    return reference_t3s_loss(x, w, labels, ignore_index=IGNORE, dtype=None, with_stats=False)[0]


def provider_eager(inputs: Inputs, grad: bool):
    return _runner(lambda x, w: eager_loss(x, w, inputs.masked_labels), inputs, grad)


_COMPILED = {}


def provider_compile(inputs: Inputs, grad: bool):
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(eager_loss, dynamic=False)
    fn = _COMPILED["fn"]
    return _runner(lambda x, w: fn(x, w, inputs.masked_labels), inputs, grad)


def provider_t3s(backend: str, strategy: str = "auto"):
    def make(inputs: Inputs, grad: bool):
        if backend == "triton" and not (inputs.hidden.is_cuda and triton_available(inputs.hidden.device)):
            raise RuntimeError("needs CUDA")
        return _runner(lambda x, w: fused_linear_t3s_loss(x, w, inputs.labels, token_weights=inputs.token_weights,
                                                          backend=backend, strategy=strategy).loss, inputs, grad)

    return make


def provider_token_stats(inputs: Inputs, grad: bool):
    """Scoring: forward only, per-token statistics (the Triton tile kernel on a GPU)."""
    if grad:
        raise NotImplementedError("forward only")

    def run():
        return token_stats(inputs.hidden, inputs.weight, inputs.labels).lse, None, None

    return run


def provider_liger(inputs: Inputs, grad: bool):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    if not inputs.hidden.is_cuda:
        raise RuntimeError("needs CUDA")
    return _runner(lambda x, w: liger_fused_linear_cross_entropy(x, w, inputs.masked_labels,
                                                                 ignore_index=IGNORE), inputs, grad)


def provider_cce(inputs: Inputs, grad: bool):
    from cut_cross_entropy import linear_cross_entropy

    if not inputs.hidden.is_cuda:
        raise RuntimeError("needs CUDA")
    return _runner(lambda x, w: linear_cross_entropy(x, w, inputs.masked_labels, ignore_index=IGNORE), inputs, grad)


PROVIDERS: dict[str, Provider] = {
    "eager": provider_eager,
    "compile": provider_compile,
    "liger": provider_liger,
    "cce": provider_cce,
    "t3s-torch": provider_t3s("torch"),
    "t3s-triton-chunked": provider_t3s("triton", "chunked"),
    "t3s-triton-tile": provider_t3s("triton", "tile"),
    "t3s-token-stats": provider_token_stats,
}


# ---------------------------------------------------------------------------- measuring


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


# ------------------------------------------------------------------------------ running


@dataclass
class Row:
    provider: str
    fwd_ms: Optional[float] = None
    fwd_bwd_ms: Optional[float] = None
    peak_mib: Optional[float] = None
    max_rel_err: Optional[float] = None
    note: str = ""


@dataclass
class Report:
    device: str
    date: str
    shape: dict
    select: float
    versions: dict
    floor_1mm_ms: Optional[float] = None
    floor_3mm_ms: Optional[float] = None
    rows: list = field(default_factory=list)


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


def run_bench(tokens: int, hidden: int, vocab: int, dtype: str, select: float = 1.0,
              providers: Optional[list[str]] = None, device: Optional[str] = None, repeat: int = 3,
              check_error: bool = True, progress: bool = True) -> Report:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    inputs = Inputs.make(tokens, hidden, vocab, DTYPES[dtype], dev, select)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    report = Report(device=device_name(dev), date=datetime.date.today().isoformat(),
                    shape=dict(tokens=tokens, hidden=hidden, vocab=vocab, dtype=dtype), select=select,
                    versions=dict(torch=torch.__version__, triton=triton_version))
    names = providers or list(PROVIDERS)
    unknown = sorted(set(names) - set(PROVIDERS))
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; choose from {sorted(PROVIDERS)}")

    from tqdm.auto import tqdm

    steps = tqdm(total=len(names) + 1 + int(check_error), desc="t3s bench", disable=not progress, leave=False)
    report.floor_1mm_ms, report.floor_3mm_ms = matmul_floor(inputs, dev, repeat)
    steps.update()
    reference = None
    if check_error:
        steps.set_postfix_str("float64 reference")
        reference = reference_grads(inputs)
        steps.update()
    for name in names:
        steps.set_postfix_str(name)
        row = Row(name)
        notes = []
        for grad in (True, False):
            try:
                run = PROVIDERS[name](inputs, grad)
                if grad:
                    # The warm-up run is the memory measurement and gives the outputs for the error.
                    out, peak = peak_memory_bytes(run, dev)
                    row.peak_mib = peak / 2**20
                    if reference is not None:
                        row.max_rel_err = max_rel_error(out, reference)
                    del out
                    row.fwd_bwd_ms = time_ms(run, dev, repeat)
                else:
                    run()
                    row.fwd_ms = time_ms(run, dev, repeat)
            except ImportError as e:
                notes.append(f"not installed ({e.name})")
                break
            except NotImplementedError as e:
                notes.append(str(e))
            except Exception as e:  # a peer that cannot run here is reported, not fatal
                notes.append(f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}")
                break
        row.note = "; ".join(notes)
        report.rows.append(row)
        steps.update()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    steps.close()
    return report


def format_report(report: Report) -> str:
    s = report.shape
    lines = [f"t3s bench | {report.device} | {report.date} | N={s['tokens']} H={s['hidden']} V={s['vocab']} "
             f"{s['dtype']} | selected {report.select:.0%} | torch {report.versions['torch']}, "
             f"triton {report.versions['triton']}",
             f"matmul floor: 1 matmul {report.floor_1mm_ms:.1f} ms, 3 matmuls {report.floor_3mm_ms:.1f} ms",
             f"{'provider':<20}{'fwd ms':>10}{'x1mm':>7}{'fwd+bwd ms':>12}{'x3mm':>7}{'peak MiB':>11}"
             f"{'max rel err':>13}  note"]

    def num(v, fmt):
        return format(v, fmt) if v is not None else "-"

    for r in report.rows:
        x1 = r.fwd_ms / report.floor_1mm_ms if r.fwd_ms else None
        x3 = r.fwd_bwd_ms / report.floor_3mm_ms if r.fwd_bwd_ms else None
        lines.append(f"{r.provider:<20}{num(r.fwd_ms, '.1f'):>10}{num(x1, '.2f'):>7}{num(r.fwd_bwd_ms, '.1f'):>12}"
                     f"{num(x3, '.2f'):>7}{num(r.peak_mib, '.0f'):>11}{num(r.max_rel_err, '.1e'):>13}  {r.note}")
    return "\n".join(lines)


def report_json(report: Report) -> str:
    return json.dumps(asdict(report), indent=2)
