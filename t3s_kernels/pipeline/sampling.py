"""Sampled answers of a local checkpoint (HF ``generate``), batched by length, cached and resumable: they
reach the judge (pipeline/answers.py) as an engine's answers file would.

``SamplingSettings``: ``samples`` answers a prompt (K), ``temperature`` (0: greedy, and then K must be 1),
``top_p``, ``seed``, ``max_new_tokens``. Prompts are sorted by length and batched under ``max_batch_tokens``
(prompt plus new tokens, times the batch) with left padding. Each batch's sampling is seeded from the
settings' seed and the batch's first example id, so a rerun draws the same answers.

A run writes each finished checkpoint's answers to ``cache`` (a folder beside the accuracy table) as an
answers file (``<checkpoint>.<key>.jsonl``), atomically; ``key`` hashes the checkpoint's weights
fingerprint, the settings, the end-of-sequence ids and the examples' ids and tokens, so a killed run
resumes at the checkpoint it stopped at, and a changed model, setting or dataset is generated anew
rather than read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..validation import check_number
from .accuracy import cut_at_eos, tokens_text
from .data import Example
from .store import atomic_write_bytes, token_hash


@dataclass(frozen=True)
class SamplingSettings:
    samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    max_new_tokens: int = 512

    def __post_init__(self):
        if not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"samples must be an int >= 1; got {self.samples!r}")
        check_number("temperature", self.temperature, low=0)
        check_number("top_p", self.top_p, low=0, low_open=True, high=1)
        if self.temperature == 0 and self.samples > 1:
            raise ValueError("samples > 1 needs temperature > 0: greedy decoding gives every sample the same answer")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1; got {self.max_new_tokens!r}")


def cache_key(fingerprint: str, settings: SamplingSettings, eos_ids: Sequence[int], examples: Sequence[Example]) -> str:
    h = hashlib.sha256(json.dumps([fingerprint, asdict(settings), list(eos_ids)]).encode())
    for e in examples:
        h.update(f"{e.id}|{e.prompt_length}|{token_hash(e.input_ids)}".encode())
    return h.hexdigest()[:16]


def _batches(examples: Sequence[Example], settings: SamplingSettings, max_batch_tokens: int, max_batch: int):
    """Example indices by prompt length, in batches whose rows (K a prompt) times their longest prompt plus
    the new tokens stay under ``max_batch_tokens``, at most ``max_batch`` prompts."""
    batch: list[int] = []
    for i in sorted(range(len(examples)), key=lambda i: examples[i].prompt_length):
        rows = (len(batch) + 1) * settings.samples
        if batch and (rows * (examples[i].prompt_length + settings.max_new_tokens) > max_batch_tokens
                      or len(batch) >= max_batch):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


@torch.no_grad()
def sample_answers(model, examples: Sequence[Example], settings: SamplingSettings, *, tokenizer=None,
                   eos_ids: Sequence[int] = (), pad_id: int = 0, max_batch_tokens: int = 65536, max_batch: int = 64,
                   progress: bool = True, desc: str = "answers") -> dict[str, list[str]]:
    """{example id: [K answer texts]} of ``model`` on the examples' prompts."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: dict[str, list[str]] = {}
    bar = tqdm(total=len(examples), desc=desc, unit="prompt", disable=not progress)
    try:
        for batch in _batches(examples, settings, max_batch_tokens, max_batch):
            prompts = [examples[i].input_ids[:examples[i].prompt_length] for i in batch]
            longest = max(len(p) for p in prompts)
            ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for r, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
                ids[r, longest - len(p):] = torch.tensor(p)
                attn[r, longest - len(p):] = 1
            seed = int(hashlib.sha256(f"{settings.seed}|{examples[batch[0]].id}".encode()).hexdigest()[:8], 16)
            torch.manual_seed(seed)
            sampled = settings.temperature > 0
            extra = dict(do_sample=True, temperature=settings.temperature, top_p=settings.top_p) if sampled \
                else dict(do_sample=False)
            gen = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                                 max_new_tokens=settings.max_new_tokens, num_return_sequences=settings.samples,
                                 eos_token_id=list(eos_ids) or None, pad_token_id=pad_id, **extra)
            new = gen[:, longest:].tolist()
            for r, i in enumerate(batch):
                rows = new[r * settings.samples:(r + 1) * settings.samples]
                out[examples[i].id] = [tokens_text(cut_at_eos(t, eos_ids), tokenizer) for t in rows]
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return out


def cached_answers(cache: Path, checkpoint: str, key: str) -> Optional[dict[str, list[str]]]:
    """A finished checkpoint's answers from the cache, or None."""
    path = cache / f"{checkpoint}.{key}.jsonl"
    if not path.exists():
        return None
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        out.setdefault(record["id"], []).append(record["text"])
    return out


def write_answers(cache: Path, checkpoint: str, key: str, answers: dict[str, list[str]]) -> Path:
    """The checkpoint's answers as an answers file (pipeline/answers.py's format), atomically."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{checkpoint}.{key}.jsonl"
    lines = [json.dumps({"checkpoint": checkpoint, "id": ex_id, "sample": k, "text": text})
             for ex_id, texts in answers.items() for k, text in enumerate(texts)]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path
