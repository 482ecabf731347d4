"""The score store: atomic shards, merged reads, refusals, corruption reported."""

import pytest
import torch

from t3s_kernels.pipeline.store import ScoreStore, StoreError, iter_batches


def stats(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"logprob": -torch.rand(n, generator=g), "entropy": torch.rand(n, generator=g),
            "correct": torch.rand(n, generator=g) > 0.5, "scored": torch.ones(n, dtype=torch.bool)}


def test_shards_merge_in_dataset_order(tmp_path):
    store = ScoreStore(tmp_path)
    store.bind(["a", "b", "c"], [3, 2, 4])
    s = {i: stats(n, i) for i, n in enumerate([3, 2, 4])}
    store.write_shard("base", 1, [2], [s[2]])
    store.write_shard("base", 0, [1, 0], [s[1], s[0]])
    loaded = store.load("base")
    assert loaded.ids == ["a", "b", "c"] and loaded.offsets.tolist() == [0, 3, 5, 9]
    for i in range(3):
        assert torch.equal(loaded.example(i), s[i]["logprob"])
        assert torch.equal(loaded.example(i, "correct"), s[i]["correct"])
    assert store.done("base") == {0, 1, 2} and store.names() == ["base"]
    assert not list(tmp_path.rglob("*.tmp"))  # writes are renames of complete files


def test_refuses_another_dataset(tmp_path):
    store = ScoreStore(tmp_path)
    store.bind(["a", "b"], [3, 2])
    with pytest.raises(StoreError, match="ids do not match"):
        store.bind(["a", "c"], [3, 2])
    with pytest.raises(StoreError, match="example 'b' has 4 tokens but the store recorded 2"):
        store.bind(["a", "b"], [3, 4])
    with pytest.raises(StoreError, match="ids must be unique"):
        ScoreStore(tmp_path / "x").bind(["a", "a"], [1, 1])


def test_incomplete_set_and_bad_shapes_are_refused(tmp_path):
    store = ScoreStore(tmp_path)
    store.bind(["a", "b"], [3, 2])
    store.write_shard("base", 0, [0], [stats(3)])
    with pytest.raises(StoreError, match=r"incomplete: 1 of 2 examples missing"):
        store.load("base")
    with pytest.raises(StoreError, match=r"logprob has shape \(4,\), expected \(2,\)"):
        store.write_shard("base", 0, [1], [stats(4)])
    with pytest.raises(StoreError, match="score set name"):
        store.write_shard("../evil", 0, [1], [stats(2)])


def test_truncated_shard_is_reported_not_skipped(tmp_path):
    store = ScoreStore(tmp_path)
    store.bind(["a", "b"], [3, 2])
    store.write_shard("base", 0, [0], [stats(3)])
    path = store.write_shard("base", 0, [1], [stats(2)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match=r"corrupt shard .*shard-r0-000001"):
        store.load("base")
    with pytest.raises(StoreError, match="corrupt shard"):
        store.done("base")


def test_iter_batches_respects_token_budget():
    lengths = [5, 5, 6, 9, 20]
    batches = list(iter_batches(range(5), lengths, max_tokens=18, max_batch=8))
    assert sum(batches, []) == [0, 1, 2, 3, 4]
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 18


def _bound(tmp_path, ids=("a", "b"), lengths=(3, 2), tokens=((5, 6, 7), (8, 9))):
    from t3s_kernels.pipeline.store import token_hash

    store = ScoreStore(tmp_path)
    store.bind(list(ids), list(lengths), [token_hash(t) for t in tokens])
    return store


def test_one_writer_per_score_set_and_rank(tmp_path):
    import json
    import socket

    store = _bound(tmp_path)
    with store.writing("base", 0):
        with pytest.raises(StoreError, match=r"score set 'base' \(rank 0\) is being written: .* names pid"):
            with store.writing("base", 0):
                pass
        with store.writing("base", 1):  # ranks of one launch write disjoint shards side by side
            pass
    lock = tmp_path / "scores" / "base" / ".lock-r0"
    assert not lock.exists()  # released
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "yesterday"}))
    with pytest.raises(StoreError, match="never taken over"):
        with store.writing("base", 0):
            pass
    lock.write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname(), "started": "yesterday"}))
    with store.writing("base", 0):  # a dead process of this host: reported and taken over
        pass


def test_resume_with_another_producer_is_refused(tmp_path):
    store = _bound(tmp_path)
    with store.writing("base", 0, {"model": "m", "weights": "abc"}):
        store.write_shard("base", 0, [0], [stats(3)])
    with pytest.raises(StoreError, match=r"produced by another model or setting \(differs in \['weights'\]\)"):
        with store.writing("base", 0, {"model": "m", "weights": "xyz"}):
            pass
    with store.writing("base", 0, {"model": "m", "weights": "abc"}):
        store.write_shard("base", 0, [1], [stats(2)])
    assert store.load("base").ids == ["a", "b"]


def test_same_ids_and_lengths_but_other_tokens_are_refused(tmp_path):
    from t3s_kernels.pipeline.store import token_hash

    store = _bound(tmp_path)
    with pytest.raises(StoreError, match="example 'b' has other tokens than the store"):
        store.bind(["a", "b"], [3, 2], [token_hash((5, 6, 7)), token_hash((8, 10))])
    with pytest.raises(StoreError, match="no examples"):
        ScoreStore(tmp_path / "empty").bind([], [])


def test_bit_flips_foreign_shards_and_bad_values_are_refused(tmp_path):
    import shutil

    store = _bound(tmp_path)
    path = store.write_shard("base", 0, [0, 1], [stats(3), stats(2)])
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[-3] ^= 0x10  # inside the last tensor's data
    path.write_bytes(bytes(flipped))
    with pytest.raises(StoreError, match="checksum mismatch"):
        store.load("base")
    path.write_bytes(good)
    assert store.load("base").ids == ["a", "b"]
    other = tmp_path / "scores" / "step" / path.name
    other.parent.mkdir(parents=True)
    shutil.copy(path, other)  # a shard of 'base' placed in 'step'
    with pytest.raises(StoreError, match="belongs to score set 'base', not 'step'"):
        store.load("step")
    bad = stats(3)
    bad["logprob"][1] = 1.7e38
    store.write_shard("high", 0, [0, 1], [bad, stats(2)])
    with pytest.raises(StoreError, match="out of range"):
        store.load("high")


def test_shards_are_keyed_by_example_ids_not_positions(tmp_path):
    store = _bound(tmp_path)
    store.write_shard("base", 0, [0, 1], [stats(3), stats(2)])
    (tmp_path / "manifest.json").unlink()  # lost manifest, then another dataset of the same shape
    store.bind(["c", "d"], [3, 2])
    with pytest.raises(StoreError, match="ids do not match the manifest's at its positions"):
        store.load("base")


def test_a_killed_writers_temporary_files_are_removed(tmp_path):
    store = _bound(tmp_path)
    folder = tmp_path / "scores" / "base"
    folder.mkdir(parents=True)
    (folder / ".shard-r0-000000.safetensors.abc.tmp").write_bytes(b"partial")
    (folder / ".shard-r1-000000.safetensors.abc.tmp").write_bytes(b"another rank's, maybe in flight")
    with store.writing("base", 0):
        pass
    assert [p.name for p in folder.glob("*.tmp")] == [".shard-r1-000000.safetensors.abc.tmp"]


def test_a_mistyped_score_set_name_is_named(tmp_path):
    store = ScoreStore(tmp_path)
    store.bind(["a"], [2])
    store.write_shard("base", 0, [0], [stats(2)])
    with pytest.raises(StoreError, match=r"has no score set 'bsae'; it has \['base'\]"):
        store.load("bsae")


def _race_writer(root, barrier, results):
    from t3s_kernels.pipeline.store import ScoreStore, StoreError

    barrier.wait()
    try:
        with ScoreStore(root).writing("base", 0):
            barrier.wait()  # hold the lock until the other process has tried
        results.put("wrote")
    except StoreError as e:
        barrier.wait()
        results.put(f"refused: {e}")


def test_two_processes_racing_for_one_score_set_one_wins(tmp_path):
    """Two processes start writing the same score set and rank at the same instant: the lock is
    created atomically (O_EXCL), so exactly one writes and the other is refused by name."""
    import multiprocessing as mp

    _bound(tmp_path)
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race_writer, args=(str(tmp_path), barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert outcomes[1] == "wrote" and outcomes[0].startswith("refused: score set 'base' (rank 0) is being written")


def test_damaged_manifest_is_named(tmp_path):
    store = _bound(tmp_path)
    (tmp_path / "manifest.json").write_text('{"ids": ["a", "b"], "len')
    with pytest.raises(StoreError, match=r"manifest.json is damaged \(not valid JSON"):
        store.load("base")


def test_a_manifest_rebound_to_other_tokens_does_not_pass_old_shards(tmp_path):
    from t3s_kernels.pipeline.store import token_hash

    store = _bound(tmp_path)
    store.write_shard("base", 0, [0, 1], [stats(3), stats(2)])
    (tmp_path / "manifest.json").unlink()  # lost manifest, then a dataset of the same ids and lengths
    store.bind(["a", "b"], [3, 2], [token_hash((5, 6, 7)), token_hash((8, 10))])
    with pytest.raises(StoreError, match=r"shard .*shard-r0-000000.safetensors scored example 'b' on other tokens "
                                         "than the store's manifest records"):
        store.load("base")
    with pytest.raises(StoreError, match="on other tokens"):
        store.done("base")


def test_a_score_set_copied_from_another_store_is_refused(tmp_path):
    import shutil

    from t3s_kernels.pipeline.selection import select

    here = _bound(tmp_path / "here")
    there = _bound(tmp_path / "there", tokens=((5, 6, 7), (8, 10)))  # same ids and lengths, other tokens
    for store in (here, there):
        with store.writing("base", 0, {"model": "m", "weights": "w0"}):
            store.write_shard("base", 0, [0, 1], [stats(3), stats(2)])
    with there.writing("step", 0, {"model": "m", "weights": "w1"}):
        there.write_shard("step", 0, [0, 1], [stats(3, 1), stats(2, 1)])
    shutil.copytree(tmp_path / "there" / "scores" / "step", tmp_path / "here" / "scores" / "step")
    with pytest.raises(StoreError, match=r"scored example 'b' on other tokens than the store's manifest records"):
        here.load("step")
    # select, given sets of two stores, compares what they were scored on
    with pytest.raises(StoreError, match="were scored on other tokens"):
        select("ar", here.load("base"), there.load("step"))
    assert select("ar", there.load("base"), there.load("step")).mask.numel() == 5


def test_a_shard_of_another_producer_or_without_one_is_refused(tmp_path):
    store = _bound(tmp_path)
    with store.writing("base", 0, {"model": "m", "weights": "abc"}):
        store.write_shard("base", 0, [0, 1], [stats(3), stats(2)])
    producer = tmp_path / "scores" / "base" / "producer.json"
    producer.write_text('{"model": "m", "weights": "xyz"}')  # a folder's producer.json swapped
    with pytest.raises(StoreError, match="was scored by another producer than score set 'base' records"):
        store.load("base")
    producer.unlink()
    with pytest.raises(StoreError, match=r"another producer .* records in producer.json \(none\)"):
        store.load("base")
    producer.write_text("[1, 2]")
    with pytest.raises(StoreError, match=r"producer.json is damaged \(a JSON list, not the dict that what produced "
                                         "score set 'base' is"):
        store.load("base")


def test_select_refuses_sets_scored_with_other_settings():
    from t3s_kernels.pipeline.selection import select
    from t3s_kernels.pipeline.store import ScoreSet

    def scored(name, lp, **producer):
        values = {"logprob": torch.tensor(lp), "entropy": torch.zeros(3), "correct": torch.zeros(3, dtype=torch.bool),
                  "scored": torch.ones(3, dtype=torch.bool)}
        return ScoreSet(name, ["x"], torch.tensor([0, 3]), values, dataset_hash="d",
                        producer={"model_type": "qwen3", "dtype": "torch.float32", "protocol": "causal", **producer})

    base = scored("base", [-1.0, -2.0, -3.0])
    with pytest.raises(StoreError, match=r"differ in \['protocol', 'rounds'\]: protocol 'causal' vs"):
        select("ar", base, scored("step", [-0.5, -2.5, -3.0], protocol="masked_diffusion", rounds=2))
    with pytest.raises(StoreError, match=r"differ in \['dtype'\]"):
        select("ar", base, scored("step", [-0.5, -2.5, -3.0], dtype="torch.bfloat16"))
    assert select("ar", base, scored("step", [-0.5, -2.5, -3.0])).mask.tolist() == [False, True, True]


def test_a_lock_left_empty_by_a_full_disk_is_stale_and_a_failed_lock_write_leaves_none(tmp_path, monkeypatch,
                                                                                       capsys):
    import json

    store = _bound(tmp_path)
    folder = tmp_path / "scores" / "base"
    folder.mkdir(parents=True)
    (folder / ".lock-r0").write_text("")  # what a disk that filled mid-write left
    with store.writing("base", 0):
        assert json.loads((folder / ".lock-r0").read_text())["pid"] > 0
    assert "taking over a stale lock of score set 'base' (rank 0): " in capsys.readouterr().err
    assert not (folder / ".lock-r0").exists()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("json.dump", full)
    with pytest.raises(OSError, match="No space left"):
        with store.writing("base", 0):
            pass
    monkeypatch.undo()
    assert not list(folder.iterdir())  # neither a lock nor its temporary file
    with store.writing("base", 0):
        pass


def test_a_damaged_manifest_or_shard_metadata_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    store = _bound(tmp_path)
    path = store.write_shard("base", 0, [0, 1], [stats(3), stats(2)])
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(load_file(str(path)), str(path), metadata={**meta, "ids": '["a", "c"]'})
    with pytest.raises(StoreError, match="checksum mismatch in its metadata"):
        store.load("base")
    for text in ('["a", "b"]', '{"ids": ["a", "b"], "lengths": [3]}'):
        (tmp_path / "manifest.json").write_text(text)
        with pytest.raises(StoreError, match=r"manifest.json is damaged \(.*\); restore it"):
            store.manifest()


def test_token_hashes_cannot_be_checked_against_a_manifest_without_them(tmp_path):
    from t3s_kernels.pipeline.store import token_hash

    store = ScoreStore(tmp_path)
    store.bind(["a", "b"], [3, 2])  # no hashes: an older store, or an edited manifest
    with pytest.raises(StoreError, match="records no token hashes .*score into a new store folder"):
        store.bind(["a", "b"], [3, 2], [token_hash((5, 6, 7)), token_hash((8, 9))])
