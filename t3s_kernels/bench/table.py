"""``t3s bench``: the fused loss against PyTorch eager, torch.compile and the peers, at one shape.

For each provider (providers.py): forward time (no grad), forward + backward time, peak memory
above the inputs during forward + backward, and the largest relative error of (loss, dX, dW)
against a float64 reference. Beside them, the matmul floor: the time of 1 and of 3 matmuls of
the same shape and dtype (measure.py).
"""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from ..validation import DTYPES
from .measure import device_name, matmul_floor, max_rel_error, peak_memory_bytes, reference_grads, time_ms
from .providers import PROVIDERS, Inputs, package_version

GPU_DEFAULT = dict(tokens=16384, hidden=4096, vocab=151936, dtype="bf16")  # Qwen3-8B's head
CPU_DEFAULT = dict(tokens=2048, hidden=256, vocab=65536, dtype="fp32")
# Recorded with every report: what ran, peers included.
PACKAGES = ("triton", "transformers", "liger-kernel", "cut-cross-entropy", "quack-kernels", "nvidia-cutlass-dsl")


@dataclass
class Row:
    provider: str
    fwd_ms: Optional[float] = None
    fwd_bwd_ms: Optional[float] = None
    peak_mib: Optional[float] = None
    max_rel_err: Optional[float] = None
    backend: str = ""  # the implementation that ran (a peer's version and kernel family)
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

    @staticmethod
    def from_dict(data: dict) -> "Report":
        """A report back from its JSON (``report_json``, or one entry of a sweep's JSON)."""
        return Report(**{**data, "rows": [Row(**row) for row in data["rows"]]})


def run_bench(tokens: int, hidden: int, vocab: int, dtype: str, select: float = 1.0,
              providers: Optional[list[str]] = None, device: Optional[str] = None, repeat: int = 3,
              check_error: bool = True, progress: bool = True) -> Report:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    inputs = Inputs.make(tokens, hidden, vocab, DTYPES[dtype], dev, select)
    versions = {"torch": torch.__version__, **{name: package_version(name) for name in PACKAGES}}
    report = Report(device=device_name(dev), date=datetime.date.today().isoformat(),
                    shape=dict(tokens=tokens, hidden=hidden, vocab=vocab, dtype=dtype), select=select,
                    versions={k: v for k, v in versions.items() if v is not None or k == "triton"})
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
                row.backend = getattr(run, "backend", "")
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
    width = max([20] + [len(r.provider) + 2 for r in report.rows])
    lines = [f"t3s bench | {report.device} | {report.date} | N={s['tokens']} H={s['hidden']} V={s['vocab']} "
             f"{s['dtype']} | selected {report.select:.0%} | torch {report.versions['torch']}, "
             f"triton {report.versions['triton']}",
             f"matmul floor: 1 matmul {report.floor_1mm_ms:.1f} ms, 3 matmuls {report.floor_3mm_ms:.1f} ms",
             f"{'provider':<{width}}{'fwd ms':>10}{'x1mm':>7}{'fwd+bwd ms':>12}{'x3mm':>7}{'peak MiB':>11}"
             f"{'max rel err':>13}  note"]

    def num(v, fmt, width):
        """A right-aligned cell with at least one space before it, however wide the number."""
        return " " + format(format(v, fmt) if v is not None else "-", f">{width - 1}")

    for r in report.rows:
        x1 = r.fwd_ms / report.floor_1mm_ms if r.fwd_ms else None
        x3 = r.fwd_bwd_ms / report.floor_3mm_ms if r.fwd_bwd_ms else None
        lines.append(f"{r.provider:<{width}}{num(r.fwd_ms, '.1f', 10)}{num(x1, '.2f', 7)}{num(r.fwd_bwd_ms, '.1f', 12)}"
                     f"{num(x3, '.2f', 7)}{num(r.peak_mib, '.0f', 11)}{num(r.max_rel_err, '.1e', 13)}  {r.note}")
    ran = [f"{r.provider}: {r.backend}" for r in report.rows if r.backend and not r.provider.startswith("t3s")]
    if ran:
        lines.append("implementations: " + "; ".join(ran))
    return "\n".join(lines)


def report_json(report: Report) -> str:
    return json.dumps(asdict(report), indent=2)
