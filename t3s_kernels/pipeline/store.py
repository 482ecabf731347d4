"""The score store: one folder per dataset, one score set per named checkpoint.

    <store>/manifest.json                      ids and token counts of the dataset, in order
    <store>/scores/<name>/shard-r<rank>-<k>.safetensors

A shard holds the per-token statistics of a batch of examples, flattened, with the examples'
dataset indices and lengths (safetensors: no pickles, memory-mapped reads). Shards are
written to a temporary file and renamed, so a shard is either complete or absent: a run
killed at any point resumes from the examples its shards hold, never duplicating or losing
one. Each process of a ``torchrun`` launch writes its own shards (rank in the name); reads
merge them. A shard that cannot be read (truncated, corrupt) is reported, never skipped.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

STAT_KEYS = ("logprob", "entropy", "correct")
_SHARD = re.compile(r"shard-r(\d+)-(\d+)\.safetensors$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class StoreError(ValueError):
    """A store, score set or shard that does not match what was asked for."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass
class ScoreSet:
    """Per-token statistics of every example of a dataset under one checkpoint, in dataset order.
    ``values[key][offsets[i]:offsets[i + 1]]`` are example i's tokens (position t scores token t;
    positions without a label hold 0 and ``scored`` False)."""

    name: str
    ids: list[str]
    offsets: torch.Tensor  # (n + 1,) int64
    values: dict[str, torch.Tensor]  # logprob, entropy: float32; correct, scored: bool

    def example(self, i: int, key: str = "logprob") -> torch.Tensor:
        return self.values[key][self.offsets[i]:self.offsets[i + 1]]


class ScoreStore:
    def __init__(self, root: os.PathLike):
        self.root = Path(root)

    # -- the dataset's identity ------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def manifest(self) -> Optional[dict]:
        if not self.manifest_path.exists():
            return None
        return json.loads(self.manifest_path.read_text())

    def bind(self, ids: Sequence[str], lengths: Sequence[int]) -> None:
        """Record the dataset (first use) or check that it is the recorded one."""
        ids, lengths = [str(i) for i in ids], [int(n) for n in lengths]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise StoreError(f"example ids must be unique; '{dup}' appears more than once")
        current = self.manifest()
        if current is None:
            atomic_write_bytes(self.manifest_path, json.dumps({"ids": ids, "lengths": lengths}).encode())
            return
        if current["ids"] != ids:
            raise StoreError(f"the dataset's ids do not match the store {self.root} (it holds {len(current['ids'])} "
                             f"examples starting {current['ids'][:3]}); use a new store folder for another dataset")
        if current["lengths"] != lengths:
            bad = next(i for i, (a, b) in enumerate(zip(current["lengths"], lengths)) if a != b)
            raise StoreError(f"example '{ids[bad]}' has {lengths[bad]} tokens but the store recorded "
                             f"{current['lengths'][bad]}: the dataset (or its tokenization) changed")

    # -- writing ---------------------------------------------------------------------------
    def _set_dir(self, name: str) -> Path:
        if not _NAME.match(name):
            raise StoreError(f"score set name must be letters, digits, '.', '_' or '-'; got {name!r}")
        return self.root / "scores" / name

    def shards(self, name: str) -> list[Path]:
        folder = self._set_dir(name)
        if not folder.exists():
            return []
        return sorted(p for p in folder.iterdir() if _SHARD.search(p.name))

    def write_shard(self, name: str, rank: int, indices: Sequence[int], stats: Sequence[dict]) -> Path:
        """One shard: examples ``indices`` (dataset positions) with their per-token ``stats``."""
        from safetensors.torch import save

        manifest = self.manifest()
        if manifest is None:
            raise StoreError("bind the dataset to the store before writing scores")
        for i, s in zip(indices, stats):
            n = manifest["lengths"][i]
            for key in (*STAT_KEYS, "scored"):
                if s[key].shape != (n,):
                    raise StoreError(f"example '{manifest['ids'][i]}': {key} has shape {tuple(s[key].shape)}, "
                                     f"expected ({n},)")
        tensors = {"indices": torch.tensor(list(indices), dtype=torch.int64),
                   "lengths": torch.tensor([manifest["lengths"][i] for i in indices], dtype=torch.int64)}
        for key in (*STAT_KEYS, "scored"):
            dtype = torch.bool if key in ("correct", "scored") else torch.float32
            tensors[key] = torch.cat([s[key].detach().to("cpu", dtype) for s in stats]) if stats else \
                torch.zeros(0, dtype=dtype)
        existing = [int(_SHARD.search(p.name).group(2)) for p in self.shards(name)
                    if int(_SHARD.search(p.name).group(1)) == rank]
        path = self._set_dir(name) / f"shard-r{rank}-{max(existing, default=-1) + 1:06d}.safetensors"
        atomic_write_bytes(path, save(tensors, metadata={"score_set": name}))
        return path

    # -- reading ---------------------------------------------------------------------------
    def _read_shard(self, path: Path) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                data = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise StoreError(f"corrupt shard {path}: {e}. Delete it and re-run scoring to redo its examples") from e
        if int(data["lengths"].sum()) != data["logprob"].numel() or data["indices"].numel() != data["lengths"].numel():
            raise StoreError(f"corrupt shard {path}: its lengths do not add up to its token count")
        return data

    def done(self, name: str) -> set[int]:
        """Dataset positions already scored under ``name`` (reads every shard, so corruption surfaces)."""
        seen: set[int] = set()
        for path in self.shards(name):
            for i in self._read_shard(path)["indices"].tolist():
                if i in seen:
                    raise StoreError(f"example {i} is in two shards of score set '{name}' ({path})")
                seen.add(i)
        return seen

    def names(self) -> list[str]:
        folder = self.root / "scores"
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.exists() else []

    def load(self, name: str) -> ScoreSet:
        """The complete score set, in dataset order; refuses an incomplete one."""
        manifest = self.manifest()
        if manifest is None:
            raise StoreError(f"{self.root} is not a score store (no manifest.json)")
        ids, lengths = manifest["ids"], manifest["lengths"]
        per_example: dict[int, dict[str, torch.Tensor]] = {}
        for path in self.shards(name):
            data = self._read_shard(path)
            starts = torch.cumsum(data["lengths"], 0) - data["lengths"]
            for j, (i, n) in enumerate(zip(data["indices"].tolist(), data["lengths"].tolist())):
                if i in per_example:
                    raise StoreError(f"example '{ids[i]}' is in two shards of score set '{name}'")
                if not 0 <= i < len(ids) or n != lengths[i]:
                    raise StoreError(f"shard {path} holds an example that does not match the manifest")
                s = int(starts[j])
                per_example[i] = {k: data[k][s:s + n] for k in (*STAT_KEYS, "scored")}
        missing = [ids[i] for i in range(len(ids)) if i not in per_example]
        if missing:
            raise StoreError(f"score set '{name}' is incomplete: {len(missing)} of {len(ids)} examples missing "
                             f"(first: {missing[:3]}); run scoring again to finish it")
        offsets = torch.tensor([0] + list(lengths), dtype=torch.int64).cumsum(0)
        values = {k: torch.cat([per_example[i][k] for i in range(len(ids))]) for k in (*STAT_KEYS, "scored")}
        return ScoreSet(name=name, ids=list(ids), offsets=offsets, values=values)


def iter_batches(order: Iterable[int], lengths: Sequence[int], max_tokens: int, max_batch: int) -> Iterable[list[int]]:
    """Group example positions (already sorted by length) into batches of at most ``max_tokens``
    padded tokens and ``max_batch`` examples."""
    batch: list[int] = []
    longest = 0
    for i in order:
        longest_if = max(longest, lengths[i])
        if batch and (longest_if * (len(batch) + 1) > max_tokens or len(batch) >= max_batch):
            yield batch
            batch, longest_if = [], lengths[i]
        batch.append(i)
        longest = longest_if
    if batch:
        yield batch
