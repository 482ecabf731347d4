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
