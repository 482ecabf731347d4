"""Finding the imitation bottleneck: the checkpoint of lowest training accuracy.

Offline: ``find_bottleneck`` takes (checkpoint, accuracy) pairs and returns the argmin (the
earliest, on ties). Online: ``BottleneckCallback`` evaluates training accuracy every ``k``
steps through a function you supply, has the trainer save a checkpoint at each evaluation,
and confirms the trough under this rule:

    the minimum so far, taken after the base evaluation, is confirmed once it lies at least
    ``min_dip`` below the base's accuracy and ``patience`` later evaluations have all been at
    least ``min_rise`` above it (``min_rise`` > 0; ``min_dip`` defaults to ``min_rise``).

The base is ``base_accuracy`` when given, else the first evaluation. A monotonic rise, a
plateau and a decline are never confirmed: ``bottleneck`` stays None, ``candidate`` holds the
current minimum and ``verdict()`` says "no trough found". What the rule assumes (the paper gives
none): the accuracy curve dips once and recovers (the imitation shock); evaluation noise is
smaller than both margins (set them from the spread of repeated evaluations); evaluations are
frequent enough that the trough is sampled.

Offline, with standard errors (a table from ``t3s accuracy`` with sampled or judged answers:
``checkpoint,accuracy,stderr``), a trough is declared only where the dip exceeds the noise: the first
row (the base) minus the minimum must exceed ``NOISE_Z`` times the standard error of that difference,
``sqrt(se_base^2 + se_min^2)``; otherwise ``t3s bottleneck`` reports the minimum but declares none.
The plot shows each accuracy with a band of ``NOISE_Z`` standard errors.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..extras import pyplot
from .store import atomic_write_bytes


def find_bottleneck(table: Sequence[tuple[str, float]]) -> tuple[str, float]:
    if not table:
        raise ValueError("the accuracy table is empty")
    for name, acc in table:
        if not isinstance(acc, (int, float)) or math.isnan(acc):
            raise ValueError(f"checkpoint {name!r} has no valid accuracy ({acc!r})")
    best = min(range(len(table)), key=lambda i: (table[i][1], i))
    return table[best][0], float(table[best][1])


def _accuracy_value(value, where: str) -> float:
    """A table's accuracy entry as a float, or a refusal naming the entry."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: the accuracy must be a number; got {json.dumps(value)[:60]}")
    return float(value)


NOISE_Z = 2.0  # standard errors a dip must exceed to be a trough (about 95% one-sided, for a normal error)


def read_accuracy_table(path: str) -> list[tuple[str, float]]:
    """A CSV/TSV of ``checkpoint,accuracy`` lines (a header line is skipped; a third column of standard
    errors is read by ``read_accuracy_errors``), or a JSON file: an object ``{checkpoint: accuracy}`` or an
    array of ``{"checkpoint": ..., "accuracy": ...}`` objects (in order)."""
    try:
        text = open(path).read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"accuracy table {path}: cannot be read ({e})") from None
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if isinstance(data, dict):
            return [(str(k), _accuracy_value(v, f"{path}: checkpoint {k!r}")) for k, v in data.items()]
        if isinstance(data, list) and all(isinstance(r, dict) and {"checkpoint", "accuracy"} <= set(r) for r in data):
            return [(str(r["checkpoint"]), _accuracy_value(r["accuracy"], f"{path}[{i}] ({r['checkpoint']})"))
                    for i, r in enumerate(data)]
        raise ValueError(f"{path}: expected a JSON object {{checkpoint: accuracy}} or an array of "
                         f"{{\"checkpoint\", \"accuracy\"}} objects; got {json.dumps(data)[:60]}")
    return [(name, acc) for name, acc, _ in _csv_rows(path, text)]


def read_accuracy_errors(path: str) -> Optional[dict[str, float]]:
    """{checkpoint: standard error} from a table's third column, or None where it has none."""
    if path.endswith(".json"):
        return None
    rows = _csv_rows(path, open(path).read())
    if not rows or any(se is None for _, _, se in rows):
        return None
    return {name: se for name, _, se in rows}


def _csv_rows(path: str, text: str) -> list:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.replace("\t", ",").split(",")]
        try:
            rows.append((parts[0], float(parts[1]), float(parts[2]) if len(parts) > 2 else None))
        except (IndexError, ValueError):
            if n == 1:
                continue  # header
            raise ValueError(f"{path}:{n}: expected 'checkpoint,accuracy[,stderr]'; got {line!r}") from None
    return rows


def trough_beyond_noise(table: Sequence[tuple[str, float]], errors: dict[str, float],
                        z: float = NOISE_Z) -> tuple[bool, str]:
    """(whether the minimum lies below the first row by more than ``z`` standard errors of the difference,
    a sentence saying so)."""
    (base, base_acc), (low, low_acc) = table[0], find_bottleneck(table)
    se = math.sqrt(errors[base] ** 2 + errors[low] ** 2)
    dip = base_acc - low_acc
    if low == base or dip <= z * se:
        return False, (f"no trough beyond the noise: the lowest checkpoint {low} ({low_acc:.4f}) is {dip:.4f} below "
                       f"{base} ({base_acc:.4f}), within {z:g} standard errors ({z * se:.4f}); sample more answers "
                       "(--samples) or evaluate more problems")
    return True, f"the dip below {base} is {dip:.4f}, beyond {z:g} standard errors ({z * se:.4f})"


def plot_accuracy(table: Sequence[tuple[str, float]], path: str, bottleneck: Optional[str] = None,
                  errors: Optional[dict[str, float]] = None) -> str:
    plt = pyplot("plotting accuracy")
    names, accs = [t[0] for t in table], [t[1] for t in table]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(names, accs, "o-")
    if errors is not None:
        band = [NOISE_Z * errors[n] for n in names]
        ax.fill_between(range(len(names)), [a - b for a, b in zip(accs, band)], [a + b for a, b in zip(accs, band)],
                        alpha=0.25, label=f"{NOISE_Z:g} standard errors")
        ax.legend(fontsize=8)
    if bottleneck is not None:
        i = names.index(bottleneck)
        ax.plot([names[i]], [accs[i]], "r*", ms=14, label=f"bottleneck: {bottleneck}")
        ax.legend(fontsize=8)
    ax.set_xlabel("checkpoint")
    ax.set_ylabel("training accuracy")
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@dataclass
class TroughDetector:
    """The confirmation rule, separate from any trainer (unit-testable on a scripted curve)."""

    patience: int = 2
    min_rise: float = 0.02
    min_dip: Optional[float] = None
    base_accuracy: Optional[float] = None
    history: list = field(default_factory=list)  # (step, accuracy)
    bottleneck: Optional[tuple[int, float]] = None

    def __post_init__(self):
        if not self.min_rise > 0:
            raise ValueError(f"min_rise must be > 0 (a recovery by a stated margin); got {self.min_rise}")
        if self.min_dip is None:
            self.min_dip = self.min_rise
        if not self.min_dip > 0:
            raise ValueError(f"min_dip must be > 0; got {self.min_dip}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1; got {self.patience}")

    @property
    def base(self) -> Optional[float]:
        if self.base_accuracy is not None:
            return float(self.base_accuracy)
        return self.history[0][1] if self.history else None

    @property
    def candidate(self) -> Optional[tuple[int, float]]:
        """The lowest evaluation after the base (the earliest, on ties)."""
        after_base = self.history if self.base_accuracy is not None else self.history[1:]
        if not after_base:
            return None
        return min(after_base, key=lambda h: (h[1], h[0]))

    def update(self, step: int, accuracy: float) -> bool:
        """Add an evaluation; True when this one confirms the trough."""
        self.history.append((step, float(accuracy)))
        if self.bottleneck is not None or self.candidate is None:
            return False
        low_step, low = self.candidate
        if not low <= self.base - self.min_dip:
            return False
        after = [a for s, a in self.history if s > low_step]
        if len(after) >= self.patience and all(a >= low + self.min_rise for a in after[-self.patience:]):
            self.bottleneck = (low_step, low)
            return True
        return False

    def verdict(self) -> str:
        if self.bottleneck is not None:
            return f"trough confirmed at step {self.bottleneck[0]} (accuracy {self.bottleneck[1]:.3f})"
        return (f"no trough found: no evaluation dipped {self.min_dip} below the base ({self.base}) and recovered "
                f"by {self.min_rise} for {self.patience} evaluations")


def _callback_base():
    try:
        from transformers import TrainerCallback

        return TrainerCallback
    except ImportError:  # pragma: no cover
        return object


class BottleneckCallback(_callback_base()):
    """Evaluate ``eval_fn(model, step) -> accuracy`` every ``every_steps``; save a checkpoint each
    time; confirm the trough under ``TroughDetector``'s rule; optionally stop training then.

    The base's accuracy (the level a trough must dip below) is ``base_accuracy`` when given;
    otherwise the callback evaluates the model itself when training begins, at step 0. A run
    resumed from a checkpoint has no base to evaluate: it needs ``base_accuracy``."""

    def __init__(self, eval_fn: Callable, every_steps: int, *, patience: int = 2, min_rise: float = 0.02,
                 min_dip: Optional[float] = None, base_accuracy: Optional[float] = None,
                 stop_on_trough: bool = False, history_path: Optional[str] = None):
        if every_steps < 1:
            raise ValueError(f"every_steps must be >= 1; got {every_steps}")
        self.eval_fn = eval_fn
        self.every_steps = every_steps
        self.detector = TroughDetector(patience=patience, min_rise=min_rise, min_dip=min_dip,
                                       base_accuracy=base_accuracy)
        self.stop_on_trough = stop_on_trough
        self.history_path = history_path

    @property
    def bottleneck(self):
        return self.detector.bottleneck

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.detector.base_accuracy is not None or self.detector.history:
            return control
        if state.global_step > 0:
            raise ValueError(f"BottleneckCallback: training resumes at step {state.global_step}, so the base "
                             "model cannot be evaluated; pass base_accuracy= (the base checkpoint's accuracy)")
        self.detector.base_accuracy = self._evaluate(model, 0)
        print(f"[t3s] base training accuracy {self.detector.base_accuracy:.3f}")
        return control

    def _evaluate(self, model, step: int) -> float:
        was_training = model.training
        try:
            return float(self.eval_fn(model, step))
        finally:
            model.train(was_training)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every_steps:
            return control
        acc = self._evaluate(model, state.global_step)
        control.should_save = True  # keep the checkpoint this accuracy belongs to
        confirmed = self.detector.update(state.global_step, acc)
        if self.history_path:
            atomic_write_bytes(Path(self.history_path), json.dumps(
                {"history": self.detector.history, "bottleneck": self.detector.bottleneck}).encode())
        if confirmed:
            print(f"[t3s] imitation bottleneck confirmed at step {self.bottleneck[0]} "
                  f"(training accuracy {self.bottleneck[1]:.3f})")
            if self.stop_on_trough:
                control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.bottleneck is None:
            print(f"[t3s] {self.detector.verdict()}")
        return control
