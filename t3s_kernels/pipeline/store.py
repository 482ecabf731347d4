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
  * each shard also carries the identity it was scored on: its examples' token hashes, the
    dataset hash and a hash of its producer; a read checks them against the manifest and the
    set's ``producer.json``, so a shard scored on other tokens (a manifest deleted and rebound
    to another dataset of the same ids and lengths, a score-set folder copied from another
    store) or by another producer is refused, not compared;
  * a score set records what produced it (``producer.json``: model, weights fingerprint,
    dtype, protocol and its parameters, library version); resuming it with another producer
    is refused, and ``select`` refuses to compare two sets of other datasets or protocols.
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


def dataset_hash(hashes: Sequence[str]) -> str:
    """A hash of a whole dataset: its examples' token hashes, in order."""
    return hashlib.sha256("".join(hashes).encode()).hexdigest()[:32]


def producer_hash(producer: Optional[dict]) -> Optional[str]:
    """A hash of a producer record (as ``producer.json`` holds it), or None."""
    return None if producer is None else hashlib.sha256(json.dumps(producer, sort_keys=True).encode()).hexdigest()[:32]


def read_json(path: Path, what: str, fix: str, kind: type = dict):
    """The JSON value of ``path`` (a ``kind``), or a StoreError naming the file, what it is and the fix."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{path} is damaged (not valid JSON: {e}); it holds {what}: {fix}") from None
    if not isinstance(value, kind):
        raise StoreError(f"{path} is damaged (a JSON {type(value).__name__}, not the {kind.__name__} that {what} is); "
                         f"{fix}")
    return value


def _meta_hash(meta: dict) -> str:
    """A shard's checksum of its own metadata (every entry but this one)."""
    return hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "meta_sha256"},
                                     sort_keys=True).encode()).hexdigest()


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


def _create_lock(lock: Path, holder: dict) -> bool:
    """Create ``lock`` holding ``holder``, whole or not at all; False if it exists. The record is
    written to a temporary file and hard-linked into place (the link fails if the lock exists), so
    a disk that fills mid-write leaves no lock, and a lock is never seen half written."""
    fd, tmp = tempfile.mkstemp(dir=lock.parent, prefix=f"{lock.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(holder, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, lock)
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(tmp)


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
    dataset_hash: Optional[str] = None  # the tokens it was scored on (store.dataset_hash), when recorded
    token_hashes: Optional[list[str]] = None  # each example's token_hash, when recorded
    producer: Optional[dict] = None  # what scored it (producer.json), when recorded

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
        fix = "restore it from a backup, or score into a new store"
        manifest = read_json(self.manifest_path, "the store's manifest", fix)  # written atomically: damaged after
        ids, lengths = manifest.get("ids"), manifest.get("lengths")
        if not isinstance(ids, list) or not isinstance(lengths, list) or len(ids) != len(lengths) or (
                "token_hashes" in manifest and len(manifest["token_hashes"]) != len(ids)):
            raise StoreError(f"{self.manifest_path} is damaged (its ids, lengths and token hashes do not line up); "
                             f"{fix}")
        return manifest

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
                record["dataset_hash"] = dataset_hash(hashes)
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
        if hashes is not None and recorded is None:
            raise StoreError(f"the manifest of {self.root} records no token hashes (an older version, or edited), so "
                             "its scores cannot be checked against these tokens; score into a new store folder")
        if hashes is not None and list(hashes) != recorded:
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
        if not _create_lock(lock, me):
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):
                holder = None
            if not isinstance(holder, dict):
                holder = None
            # A lock is written whole, then linked into place, so an unreadable one is damaged, not in the
            # middle of being written: it names no writer, and is stale. So is one of a dead process of this host.
            stale = holder is None or (holder.get("host") == me["host"] and isinstance(holder.get("pid"), int)
                                       and not _pid_alive(holder["pid"]))
            where = f"{lock} is unreadable" if holder is None else \
                f"{lock} names pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
            if not stale:
                raise StoreError(f"score set '{name}' (rank {rank}) is being written: {where}. Wait for that writer, "
                                 "or score into another --name (a lock from another host is never taken over; "
                                 "remove the file if you know its writer is gone)") from None
            print(f"[t3s] taking over a stale lock of score set '{name}' (rank {rank}): {where}"
                  + ("" if holder is None else ", not running"), file=sys.stderr)
            lock.unlink(missing_ok=True)
            if not _create_lock(lock, me):
                raise StoreError(f"score set '{name}' (rank {rank}): another writer took over the stale lock {lock} "
                                 "first; wait for it, or score into another --name")
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
            recorded = self.producer(name)
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
        if not path.exists():
            return None
        return read_json(path, f"what produced score set '{name}'", "delete the score set to redo it")

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
                "sha256": json.dumps({k: _tensor_hash(v) for k, v in tensors.items()}),
                # the identity it is scored on: checked on every read (the module docstring)
                "token_hashes": json.dumps([manifest["token_hashes"][i] for i in indices]
                                           if "token_hashes" in manifest else None),
                "dataset_hash": json.dumps(manifest.get("dataset_hash")),
                "producer": json.dumps(producer_hash(self.producer(name)))}
        meta["meta_sha256"] = _meta_hash(meta)
        atomic_write_bytes(path, save(tensors, metadata=meta))
        return path

    # -- reading ---------------------------------------------------------------------------
    def _read_shard(self, path: Path, name: str, manifest: dict) -> dict[str, torch.Tensor]:
        """A shard's tensors, after every check in the module docstring (against ``manifest``, and the
        set's producer.json)."""
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
        if "sha256" not in meta or "meta_sha256" not in meta:
            raise StoreError(f"shard {path} has no checksums or no record of what it was scored on (written by an "
                             f"older version). {redo}")
        if meta["meta_sha256"] != _meta_hash(meta):
            raise StoreError(f"corrupt shard {path}: checksum mismatch in its metadata. {redo}")
        sums, shard_ids, hashes, shard_dataset, shard_producer = (json.loads(meta.get(k, "null")) for k in (
            "sha256", "ids", "token_hashes", "dataset_hash", "producer"))
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
        ids, indices = manifest["ids"], data["indices"].tolist()
        if shard_ids != [ids[i] if 0 <= i < len(ids) else None for i in indices]:
            raise StoreError(f"shard {path} holds examples whose ids do not match the manifest's at its positions: "
                             f"it was written for another dataset. {redo}")
        recorded = manifest.get("token_hashes")
        if recorded is not None and hashes is not None:
            bad = next((j for j, i in enumerate(indices) if hashes[j] != recorded[i]), None)
            if bad is not None:
                raise StoreError(f"shard {path} scored example '{ids[indices[bad]]}' on other tokens than the store's "
                                 f"manifest records (same id and length): another dataset or tokenization (the "
                                 f"manifest was replaced, or the score set copied from another store). {redo}")
        if (hashes is None) != (recorded is None) or shard_dataset != manifest.get("dataset_hash"):
            raise StoreError(f"shard {path} was scored on another dataset than the store's manifest records (its "
                             f"dataset hash {shard_dataset} is not {manifest.get('dataset_hash')}: the manifest was "
                             f"replaced, or the score set copied from another store). {redo}")
        expected = producer_hash(self.producer(name))
        if shard_producer != expected:
            raise StoreError(f"shard {path} was scored by another producer than score set '{name}' records in "
                             f"producer.json ({'none' if expected is None else 'another model or setting'}). {redo}")
        return data

    def done(self, name: str) -> set[int]:
        """Dataset positions already scored under ``name`` (reads every shard, so corruption surfaces)."""
        seen: set[int] = set()
        manifest = self.manifest() or {"ids": [], "lengths": []}
        for path in self.shards(name):
            for i in self._read_shard(path, name, manifest)["indices"].tolist():
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
            data = self._read_shard(path, name, manifest)
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
        return ScoreSet(name=name, ids=list(ids), offsets=offsets, values=values,
                        dataset_hash=manifest.get("dataset_hash"), token_hashes=manifest.get("token_hashes"),
                        producer=self.producer(name))


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
