"""Answers to the training prompts, from any engine, judged into the accuracy table ``t3s bottleneck`` reads.

Generating a few hundred long answers per checkpoint is an inference engine's job (vLLM, SGLang;
docs/answers.md has a recipe); this module takes what it produced. The answers file is JSON lines
(``.jsonl``, or ``.jsonl.gz``) or Parquet, one answer a record:

    {"checkpoint": "checkpoint-30", "id": "prob-17", "sample": 0, "text": "... \\boxed{42}"}

* ``checkpoint``: the checkpoint's name, as the accuracy table names it (its folder's name);
* ``id``: the training example's id, as the dataset names it (``t3s score`` and ``t3s select`` use the same);
* ``sample``: 0 .. K-1, the answer's index among the K the engine sampled for this prompt;
* ``text``: the generated answer: the completion after the prompt, without the prompt.

Refused, each naming the record or what is missing: a record without these fields or of other types,
an id that is not a training example, the same (checkpoint, id, sample) twice, a training example
without answers at some listed checkpoint, sample indices that are not 0 .. K-1, or K that differs
between examples or checkpoints.

Judging: each answer is compared with the example's reference answer (its labelled tokens, decoded)
by a verifier (pipeline/accuracy.py: exact, regex, math, python); a problem's accuracy is the mean
over its K answers, a checkpoint's the mean over problems, and its standard error the sample standard
deviation of the problems' accuracies over sqrt(number of problems): the spread a dip must exceed to
count as a trough (pipeline/bottleneck.py). With K = 1 it is the binomial error of the greedy accuracy.
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..extras import require
from .accuracy import reference_answer, tokens_text
from .data import Example

FIELDS = {"checkpoint": str, "id": str, "sample": int, "text": str}


@dataclass
class CheckpointAccuracy:
    """One row of the accuracy table: the mean over problems of each problem's mean over its samples."""

    checkpoint: str
    accuracy: float
    stderr: float
    samples: int  # K answers a problem
    per_example: dict  # id -> the problem's mean accuracy


def _records(path: str):
    """(where, record) of an answers file, in file order."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"answers file {path!r} does not exist (or is a folder)")
    if p.suffix == ".parquet":
        pq = require("pyarrow.parquet", f"reading the Parquet answers file {path}")
        for i, record in enumerate(pq.read_table(str(p)).to_pylist()):
            yield f"{path}[{i}]", record
        return
    if not (p.name.endswith(".jsonl") or p.name.endswith(".jsonl.gz")):
        raise ValueError(f"answers file {path}: expected .jsonl, .jsonl.gz or .parquet")
    opener = gzip.open if p.name.endswith(".gz") else open
    with opener(p, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from e
            yield f"{path}:{n}", record


def read_answers(path: str, examples: Sequence[Example],
                 checkpoints: Optional[Sequence[str]] = None) -> dict[str, dict[str, list[str]]]:
    """{checkpoint: {example id: [text of sample 0, .., K-1]}} from ``path``, checked as the module
    docstring says; ``checkpoints`` (default: those in the file, in order of appearance) must each have
    every example's answers."""
    known = {e.id for e in examples}
    answers: dict[str, dict[str, dict[int, str]]] = {}
    for where, record in _records(path):
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object with {', '.join(FIELDS)}; got {type(record).__name__}")
        for name, kind in FIELDS.items():
            value = record.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"{where}: '{name}' must be a {kind.__name__}; got {value!r}")
        ck, ex_id, sample = record["checkpoint"], record["id"], record["sample"]
        if ex_id not in known:
            raise ValueError(f"{where}: id {ex_id!r} is not a training example of the data")
        if sample < 0:
            raise ValueError(f"{where}: sample must be >= 0; got {sample}")
        per_example = answers.setdefault(ck, {}).setdefault(ex_id, {})
        if sample in per_example:
            raise ValueError(f"{where}: a second answer for checkpoint {ck!r}, id {ex_id!r}, sample {sample}")
        per_example[sample] = record["text"]
    names = list(checkpoints) if checkpoints is not None else list(answers)
    if not names:
        raise ValueError(f"answers file {path} holds no answers")
    out, k_seen = {}, None
    for ck in names:
        if ck not in answers:
            raise ValueError(f"{path} has no answers for checkpoint {ck!r} (it has {sorted(answers)})")
        missing = [e.id for e in examples if e.id not in answers[ck]]
        if missing:
            raise ValueError(f"{path}: checkpoint {ck!r} has no answers for {len(missing)} training example(s), "
                             f"e.g. {missing[:3]}")
        for ex_id, samples in answers[ck].items():
            k = len(samples)
            if sorted(samples) != list(range(k)):
                raise ValueError(f"{path}: checkpoint {ck!r}, id {ex_id!r} has samples {sorted(samples)}; expected "
                                 f"0 .. {k - 1}")
            if k_seen is not None and k != k_seen:
                raise ValueError(f"{path}: checkpoint {ck!r}, id {ex_id!r} has {k} samples where others have "
                                 f"{k_seen}; every prompt needs the same number at every checkpoint")
            k_seen = k
        out[ck] = {e.id: [answers[ck][e.id][s] for s in range(k_seen)] for e in examples}
    return out


def reference_text(ex: Example, tokenizer, eos_ids: Sequence[int] = ()) -> str:
    """The example's reference answer (``accuracy.reference_answer``) as the verifiers read it, as generated
    answers are (decoded, or the ids space-separated)."""
    return tokens_text(reference_answer(ex, eos_ids), tokenizer)


def judge(answers: dict[str, list[str]], examples: Sequence[Example], check: Callable[[str, str, str], bool],
          references: dict[str, str], checkpoint: str) -> CheckpointAccuracy:
    """One checkpoint's row: ``check(answer text, reference text, example id)`` over every sample."""
    per_example = {}
    for ex in examples:
        texts = answers[ex.id]
        per_example[ex.id] = sum(bool(check(t, references[ex.id], ex.id)) for t in texts) / len(texts)
    values = list(per_example.values())
    n = len(values)
    mean = sum(values) / n
    stderr = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else 0.0
    return CheckpointAccuracy(checkpoint, mean, stderr, len(next(iter(answers.values()))), per_example)


def write_table(rows: Sequence[CheckpointAccuracy], path, write: Callable[[Path, bytes], None]) -> None:
    """The accuracy table: ``checkpoint,accuracy,stderr,samples`` (``t3s bottleneck`` reads it)."""
    text = "checkpoint,accuracy,stderr,samples\n" + "".join(
        f"{r.checkpoint},{r.accuracy:.6f},{r.stderr:.6f},{r.samples}\n" for r in rows)
    write(Path(path), text.encode())
