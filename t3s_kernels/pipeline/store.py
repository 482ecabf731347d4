"""The score store: one folder per dataset, one score set per named checkpoint.

    <store>/manifest.json                      ids and token counts of the dataset, in order
    <store>/scores/<name>/shard-r<rank>-<k>.safetensors

A shard holds the per-token statistics of a batch of examples, flattened, with the examples'
dataset indices and lengths (safetensors: no pickles, memory-mapped reads). Shards are
written to a temporary file and renamed, so a shard is either complete or absent: a run
killed at any point resumes from the examples its shards hold, never duplicating or losing
one; the temporary files a killed run leaves are removed by the next writer of that rank.
Each process of a ``torchrun`` launch writes its own shards (rank in the name); reads merge them.

What is checked, so that nothing stored is mixed or silently wrong:
  * the manifest records each example's id, length and a hash of its token ids: another
    dataset, or the same one tokenized otherwise, is refused;
  * a writer holds a lock per score set and rank (``.lock-r<rank>``: pid, host, start time); a
    second writer is refused, naming the holder; a lock left by a process of this host that is
    no longer running (a killed run) is reported and taken over, one of another host never;
  * each shard records its score set, its examples' ids and a SHA-256 per tensor; a read
    checks all three and the ranges (log-probabilities <= 0, entropies >= 0, finite): a
    corrupt, misplaced or foreign shard is reported, never skipped or used;
  * a score set records what produced it (``producer.json``: model, weights fingerprint,
    dtype, protocol and its parameters, library version); resuming it with another producer
    is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

STAT_KEYS = ("logprob", "entropy", "correct")
_SHARD = re.compile(r"shard-r(\d+)-(\d+)\.safetensors$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class StoreError(ValueError):
    """A store, score set or shard that does not match what was asked for."""


def token_hash(tokens: Sequence[int]) -> str:
    """A hash of one example's token ids (what the manifest records per example)."""
    return hashlib.sha256(json.dumps([int(t) for t in tokens]).encode()).hexdigest()[:32]


def _tensor_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def natural_key(name: str) -> list:
    """checkpoint-20 before checkpoint-100."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def writable_folder(path: os.PathLike, what: str) -> Path:
    """``path`` as a folder this process can write (created if absent), checked before any work:
    a path that is a file, or a folder without write permission, is refused by name."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a file; it must be a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{what} {str(path)!r} cannot be created ({e.strerror or e})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {str(path)!r} is not writable by this user")
    return folder


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
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as e:  # written atomically, so damaged after the fact
            raise StoreError(f"{self.manifest_path} is damaged (not valid JSON: {e}); restore it from a backup, or "
                             "score into a new store") from None

    def bind(self, ids: Sequence[str], lengths: Sequence[int], hashes: Optional[Sequence[str]] = None) -> None:
        """Record the dataset (first use) or check that it is the recorded one: ids, lengths and, when
        given, each example's ``token_hash``."""
        ids, lengths = [str(i) for i in ids], [int(n) for n in lengths]
        if not ids:
            raise StoreError("the dataset has no examples; nothing to score")
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise StoreError(f"example ids must be unique; '{dup}' appears more than once")
        current = self.manifest()
        if current is None:
            record = {"ids": ids, "lengths": lengths}
            if hashes is not None:
                record["token_hashes"] = list(hashes)
                record["dataset_hash"] = hashlib.sha256("".join(hashes).encode()).hexdigest()[:32]
            atomic_write_bytes(self.manifest_path, json.dumps(record).encode())
            return
        if current["ids"] != ids:
            raise StoreError(f"the dataset's ids do not match the store {self.root} (it holds {len(current['ids'])} "
                             f"examples starting {current['ids'][:3]}); use a new store folder for another dataset")
        if current["lengths"] != lengths:
            bad = next(i for i, (a, b) in enumerate(zip(current["lengths"], lengths)) if a != b)
            raise StoreError(f"example '{ids[bad]}' has {lengths[bad]} tokens but the store recorded "
                             f"{current['lengths'][bad]}: the dataset (or its tokenization) changed")
        recorded = current.get("token_hashes")
        if hashes is not None and recorded is not None and list(hashes) != recorded:
            bad = next(i for i, (a, b) in enumerate(zip(recorded, hashes)) if a != b)
            raise StoreError(f"example '{ids[bad]}' has other tokens than the store {self.root} recorded (same id and "
                             "length): another dataset, or another tokenization; use a new store folder")

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

    @contextmanager
    def writing(self, name: str, rank: int = 0, producer: Optional[dict] = None):
        """Hold the write lock of score set ``name`` for ``rank``; check (or record) its producer;
        remove temporary files a killed writer of this rank left."""
        folder = self._set_dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        lock = folder / f".lock-r{rank}"
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):
                holder = {}
            stale = holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) \
                and not _pid_alive(holder["pid"])
            where = f"{lock} names pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
            if not stale:
                raise StoreError(f"score set '{name}' (rank {rank}) is being written: {where}. Wait for that writer, "
                                 "or score into another --name (a lock from another host is never taken over; "
                                 "remove the file if you know its writer is gone)") from None
            # The holder ran on this host and its process is gone (a killed run): said, then taken over.
            print(f"[t3s] taking over a stale lock of score set '{name}' (rank {rank}): {where}, not running",
                  file=sys.stderr)
            lock.unlink()
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        try:
            for tmp in folder.glob(f".shard-r{rank}-*.tmp"):
                tmp.unlink()
            if producer is not None:
                self._check_producer(name, producer)
            yield
        finally:
            lock.unlink(missing_ok=True)

    def _check_producer(self, name: str, producer: dict) -> None:
        path = self._set_dir(name) / "producer.json"
        producer = json.loads(json.dumps(producer))  # as it will read back
        if path.exists():
            recorded = json.loads(path.read_text())
            if recorded != producer:
                diff = sorted(k for k in set(recorded) | set(producer) if recorded.get(k) != producer.get(k))
                raise StoreError(f"score set '{name}' was produced by another model or setting (differs in {diff}); "
                                 "score into another --name, or delete the set to redo it")
        elif self.shards(name):
            raise StoreError(f"score set '{name}' has shards but no producer.json: its origin is unknown; delete it "
                             "to redo it")
        else:
            atomic_write_bytes(path, json.dumps(producer, indent=1).encode())

    def producer(self, name: str) -> Optional[dict]:
        path = self._set_dir(name) / "producer.json"
        return json.loads(path.read_text()) if path.exists() else None

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
        meta = {"score_set": name, "ids": json.dumps([manifest["ids"][i] for i in indices]),
                "sha256": json.dumps({k: _tensor_hash(v) for k, v in tensors.items()})}
        atomic_write_bytes(path, save(tensors, metadata=meta))
        return path

    # -- reading ---------------------------------------------------------------------------
    def _read_shard(self, path: Path, name: str, ids: Sequence[str]) -> dict[str, torch.Tensor]:
        """A shard's tensors, after every check in the module docstring (``ids``: the manifest's)."""
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        redo = "Delete it and re-run scoring to redo its examples"
        try:
            with safe_open(str(path), framework="pt") as f:
                data = {k: f.get_tensor(k) for k in f.keys()}
                meta = f.metadata() or {}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise StoreError(f"corrupt shard {path}: {e}. {redo}") from e
        if meta.get("score_set") != name:
            raise StoreError(f"shard {path} belongs to score set {meta.get('score_set')!r}, not '{name}'. {redo}")
        sums = json.loads(meta.get("sha256", "null"))
        if sums is None:
            raise StoreError(f"shard {path} has no checksums (written by an older version). {redo}")
        bad = sorted(k for k, v in data.items() if sums.get(k) != _tensor_hash(v)) or sorted(set(sums) ^ set(data))
        if bad:
            raise StoreError(f"corrupt shard {path}: checksum mismatch in {bad}. {redo}")
        if int(data["lengths"].sum()) != data["logprob"].numel() or data["indices"].numel() != data["lengths"].numel():
            raise StoreError(f"corrupt shard {path}: its lengths do not add up to its token count. {redo}")
        lp, ent = data["logprob"], data["entropy"]
        if not bool(torch.isfinite(lp).all() & torch.isfinite(ent).all()) or bool((lp > 1e-4).any()) \
                or bool((ent < -1e-4).any()):
            raise StoreError(f"shard {path} holds values out of range (log-probabilities must be <= 0, entropies >= 0, "
                             f"all finite). {redo}")
        shard_ids = json.loads(meta.get("ids", "[]"))
        if shard_ids != [ids[i] if 0 <= i < len(ids) else None for i in data["indices"].tolist()]:
            raise StoreError(f"shard {path} holds examples whose ids do not match the manifest's at its positions: "
                             f"it was written for another dataset. {redo}")
        return data

    def done(self, name: str) -> set[int]:
        """Dataset positions already scored under ``name`` (reads every shard, so corruption surfaces)."""
        seen: set[int] = set()
        ids = (self.manifest() or {}).get("ids", [])
        for path in self.shards(name):
            for i in self._read_shard(path, name, ids)["indices"].tolist():
                if i in seen:
                    raise StoreError(f"example {i} is in two shards of score set '{name}' ({path})")
                seen.add(i)
        return seen

    def names(self) -> list[str]:
        folder = self.root / "scores"
        if not folder.exists():
            return []
        return sorted((p.name for p in folder.iterdir() if p.is_dir()), key=natural_key)

    def load(self, name: str) -> ScoreSet:
        """The complete score set, in dataset order; refuses an incomplete one."""
        manifest = self.manifest()
        if manifest is None:
            raise StoreError(f"{self.root} is not a score store (no manifest.json)")
        ids, lengths = manifest["ids"], manifest["lengths"]
        per_example: dict[int, dict[str, torch.Tensor]] = {}
        for path in self.shards(name):
            data = self._read_shard(path, name, ids)
            starts = torch.cumsum(data["lengths"], 0) - data["lengths"]
            for j, (i, n) in enumerate(zip(data["indices"].tolist(), data["lengths"].tolist())):
                if i in per_example:
                    raise StoreError(f"example '{ids[i]}' is in two shards of score set '{name}'")
                if not 0 <= i < len(ids) or n != lengths[i]:
                    raise StoreError(f"shard {path} holds an example that does not match the manifest")
                s = int(starts[j])
                per_example[i] = {k: data[k][s:s + n] for k in (*STAT_KEYS, "scored")}
        if not self._set_dir(name).exists():
            known = self.names()
            raise StoreError(f"{self.root} has no score set '{name}'" + (f"; it has {known}" if known else ""))
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
