"""``t3s bench --sweep``: the table's providers over a grid of token counts N and vocabulary sizes
V, written as JSON and drawn (with the ``plot`` extra) as time and peak memory against N, one
figure per V, beside the matmul floor measured in the same run.

Output: ``<out>/<date>-<card>/sweep.json`` and ``sweep-V<vocab>.png`` for each V.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from dataclasses import asdict
from typing import Optional

import torch

from ..extras import pyplot, require
from .measure import device_name
from .table import Report, run_bench

GPU_SWEEP = dict(tokens=[2048, 4096, 8192, 16384, 32768], vocab=[32768, 151936, 262144], hidden=4096, dtype="bf16")
CPU_SWEEP = dict(tokens=[256, 512, 1024, 2048], vocab=[8192, 32768], hidden=256, dtype="fp32")


def results_folder(out: str, device: torch.device) -> str:
    """``out/<date>-<card>``, the card's name made a folder name (e.g. 2026-11-28-nvidia-h200)."""
    card = device_name(device).lower()
    card = re.sub(r"^nvidia ", "nvidia-", card)
    card = re.sub(r"[^a-z0-9]+", "-", card.split(",")[0]).strip("-")
    return os.path.join(out, f"{datetime.date.today().isoformat()}-{card}")


def run_sweep(tokens: list[int], vocab: list[int], hidden: int, dtype: str, out: str,
              providers: Optional[list[str]] = None, device: Optional[str] = None, repeat: int = 3,
              check_error: bool = False, progress: bool = True) -> tuple[list[Report], list[str]]:
    """Run the table at every (N, V); return the reports and the files written (JSON, PNGs)."""
    from tqdm.auto import tqdm

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    points = [(v, n) for v in vocab for n in tokens]
    reports = []
    for v, n in tqdm(points, desc="t3s bench --sweep", disable=not progress):
        reports.append(run_bench(tokens=n, hidden=hidden, vocab=v, dtype=dtype, providers=providers,
                                 device=str(dev), repeat=repeat, check_error=check_error, progress=False))
    folder = results_folder(out, dev)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "sweep.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump([asdict(r) for r in reports], f, indent=1)
    os.replace(tmp, path)  # a reader never sees half a file
    return reports, [path] + plot_sweep(reports, folder)


def series(reports: list[Report], vocab: int, provider: str, metric: str) -> tuple[list[int], list[float]]:
    """(N, value) of one provider's ``metric`` (a Row field) at vocabulary ``vocab``, where it ran."""
    points = []
    for r in reports:
        if r.shape["vocab"] != vocab:
            continue
        for row in r.rows:
            value = getattr(row, metric)
            if row.provider == provider and value is not None:
                points.append((r.shape["tokens"], value))
    return [n for n, _ in points], [v for _, v in points]


def plot_sweep(reports: list[Report], folder: str) -> list[str]:
    """One PNG per vocabulary size: fwd+bwd time and peak memory against N (log-log), each provider
    a line, the 3-matmul floor dashed. Needs matplotlib (the ``plot`` extra); without it, none."""
    try:
        plt = pyplot("the sweep's plots")
        ticker = require("matplotlib.ticker", "the sweep's plots")
    except ImportError:
        return []
    written = []
    providers = list(dict.fromkeys(row.provider for r in reports for row in r.rows))
    for vocab in sorted({r.shape["vocab"] for r in reports}):
        at_v = [r for r in reports if r.shape["vocab"] == vocab]
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        for name in providers:
            n, ms = series(reports, vocab, name, "fwd_bwd_ms")
            if n:
                ax_t.plot(n, ms, marker="o", label=name)
            n, mib = series(reports, vocab, name, "peak_mib")
            if n:
                ax_m.plot(n, mib, marker="o", label=name)
        ax_t.plot([r.shape["tokens"] for r in at_v], [r.floor_3mm_ms for r in at_v], "k--", label="3 matmuls")
        s = at_v[0].shape
        ns = sorted({r.shape["tokens"] for r in at_v})
        for ax, label in ((ax_t, "forward + backward (ms)"), (ax_m, "peak memory above inputs (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
            ax.set_xlabel("tokens N")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=7)
        fig.suptitle(f"{at_v[0].device}, {at_v[0].date}: H={s['hidden']} V={vocab} {s['dtype']}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(folder, f"sweep-V{vocab}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
