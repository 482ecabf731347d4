"""Selection rules on hand-made trajectories, and their refusals."""

import pytest
import torch

from t3s_kernels.pipeline.selection import attach_mask, load_selection, save_selection, select, trajectory
from t3s_kernels.pipeline.store import ScoreSet, StoreError

#                 tokens:   0     1     2     3     4     5     6     7
BASE = torch.tensor([0.0, -1.0, -2.0, -0.5, -3.0, -0.1, -1.0, -4.0])
BOTT = torch.tensor([0.0, -0.5, -2.1, -0.9, -2.0, -0.4, -1.0, -4.25])
SCORED = torch.tensor([False, True, True, True, True, True, True, True])
ENTROPY = torch.tensor([0.0, 1.0, 3.0, 2.0, 0.5, 4.0, 0.1, 0.2])


def score_set(name, logprob, ids=("x", "y"), offsets=(0, 5, 8)):
    return ScoreSet(name=name, ids=list(ids), offsets=torch.tensor(offsets),
                    values={"logprob": logprob, "entropy": ENTROPY, "correct": torch.zeros(8, dtype=torch.bool),
                            "scored": SCORED.clone()})


BASE_SET, BOTT_SET = score_set("base", BASE), score_set("step-30", BOTT)


def test_ar_drops_anchors_and_inverse_keeps_only_them():
    # dc = [0, .5, -.1, -.4, 1, -.3, 0, -.25]: anchors (dc > 0) are tokens 1 and 4
    ar = select("ar", BASE_SET, BOTT_SET).mask
    assert ar.tolist() == [False, False, True, True, False, True, True, True]
    inv = select("inverse", BASE_SET, BOTT_SET).mask
    assert inv.tolist() == [False, True, False, False, True, False, False, False]


@pytest.mark.parametrize("tau,expected", [
    (0.0, [2, 3, 5, 7]), (0.2, [3, 5, 7]), (0.3, [3]), (0.5, []),
])
def test_dllm_selects_below_minus_tau(tau, expected):
    mask = select("dllm", BASE_SET, BOTT_SET, tau=tau).mask
    assert mask.nonzero().squeeze(1).tolist() == expected


def test_budget_rules():
    assert select("confidence_high", BASE_SET, budget=2 / 7).mask.nonzero().squeeze(1).tolist() == [3, 5]
    assert select("confidence_low", BASE_SET, budget=2 / 7).mask.nonzero().squeeze(1).tolist() == [4, 7]
    assert select("entropy", BASE_SET, budget=2 / 7).mask.nonzero().squeeze(1).tolist() == [2, 5]
    r1 = select("random", BASE_SET, budget=3 / 7, seed=1).mask
    assert int(r1.sum()) == 3 and not r1[0] and torch.equal(r1, select("random", BASE_SET, budget=3 / 7, seed=1).mask)


def test_refusals():
    with pytest.raises(ValueError, match="rule must be one of"):
        select("topk", BASE_SET, BOTT_SET)
    with pytest.raises(ValueError, match="tau must be >= 0"):
        select("dllm", BASE_SET, BOTT_SET, tau=-0.1)
    with pytest.raises(ValueError, match="needs the bottleneck"):
        select("ar", BASE_SET)
    with pytest.raises(ValueError, match=r"needs budget in \(0, 1\]"):
        select("entropy", BASE_SET, budget=1.5)
    other = score_set("other", BOTT, ids=("x", "z"))
    with pytest.raises(StoreError, match="not of the same dataset"):
        select("ar", BASE_SET, other)


def test_save_load_attach_and_trajectory(tmp_path):
    sel = select("ar", BASE_SET, BOTT_SET)
    summary = save_selection(sel, str(tmp_path), SCORED)
    assert summary["selected_tokens"] == 5 and summary["scored_tokens"] == 7
    assert [e["selected"] for e in summary["per_example"]] == [2, 3]
    back = load_selection(str(tmp_path))
    assert torch.equal(back.mask, sel.mask) and back.ids == ["x", "y"]
    rows = attach_mask([{"id": "y", "input_ids": [1, 2, 3]}, {"id": "x", "input_ids": [1, 2, 3, 4, 5]}], back)
    assert rows[0]["t3s_weights"] == [True, True, True] and rows[1]["t3s_weights"] == [False, False, True, True, False]
    with pytest.raises(StoreError, match="not in the selection"):
        attach_mask([{"id": "q", "input_ids": [1]}], back)
    with pytest.raises(StoreError, match="has 2 tokens but its mask 3"):
        attach_mask([{"id": "y", "input_ids": [1, 2]}], back)
    traj = trajectory([BASE_SET, BOTT_SET], ~sel.mask & SCORED)
    assert traj["checkpoints"] == ["base", "step-30"]
    assert traj["anchors"][1] > traj["anchors"][0]


def test_selection_refuses_the_base_as_its_own_bottleneck():
    with pytest.raises(ValueError, match="is the base checkpoint 'base' itself"):
        select("ar", BASE_SET, BASE_SET)
    with pytest.raises(ValueError, match="is the base checkpoint"):
        select("dllm", BASE_SET, score_set("step-0", BASE.clone()))  # another name, the same scores


def test_a_selection_records_its_use_and_attaches_to_its_own_column(tmp_path):
    sel = select("dllm", BASE_SET, BOTT_SET)
    assert sel.use == "force_mask"
    save_selection(sel, str(tmp_path), SCORED)
    back = load_selection(str(tmp_path))
    assert back.use == "force_mask"
    rows = attach_mask([{"id": "x", "input_ids": [1, 2, 3, 4, 5]}], back)
    assert "t3s_force_mask" in rows[0] and "t3s_weights" not in rows[0]
    assert select("random", BASE_SET, budget=0.5, use="force_mask").use == "force_mask"
    assert select("random", BASE_SET, budget=0.5).use == "keep"
    with pytest.raises(ValueError, match="rule 'ar' makes a 'keep' mask"):
        select("ar", BASE_SET, BOTT_SET, use="force_mask")


def test_a_mask_attaches_only_to_the_tokens_it_was_scored_on(tmp_path):
    from dataclasses import replace

    from t3s_kernels.pipeline.store import token_hash

    tokens = {"x": [1, 2, 3, 4, 5], "y": [1, 2, 3]}
    hashes = [token_hash(tokens["x"]), token_hash(tokens["y"])]
    sel = select("ar", replace(BASE_SET, token_hashes=hashes), replace(BOTT_SET, token_hashes=hashes))
    save_selection(sel, str(tmp_path), SCORED)
    back = load_selection(str(tmp_path))
    assert back.token_hashes == hashes
    assert attach_mask([{"id": "y", "input_ids": tokens["y"]}], back)[0]["t3s_weights"] == [True, True, True]
    with pytest.raises(StoreError, match="example 'y' has other tokens than the selection was scored on"):
        attach_mask([{"id": "y", "input_ids": [1, 2, 9]}], back)


def test_a_file_that_is_no_selection_is_named(tmp_path):
    from safetensors.torch import save_file

    save_file({"mask": torch.zeros(2, dtype=torch.bool)}, str(tmp_path / "mask.safetensors"))
    with pytest.raises(StoreError, match=r"mask.safetensors: not a selection this library wrote, or damaged"):
        load_selection(str(tmp_path))
    with pytest.raises(StoreError, match="not a selection this library wrote"):
        load_selection(str(tmp_path / "absent"))
