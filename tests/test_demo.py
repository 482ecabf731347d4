"""t3s demo: every arm over seeds, a stated verdict, and the traces it trains on."""

import json

from t3s_kernels.cli import main


def test_demo_quick_runs_every_arm_over_seeds_and_states_a_verdict(tmp_path, capsys):
    from t3s_kernels.demo import ARMS

    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    seeds = report["seeds"]
    assert [s["seed"] for s in seeds] == [0, 1]
    with_arms = [s for s in seeds if "no_selection" not in s]
    assert with_arms, "the smoke run must reach the selection and the five arms in at least one seed"
    for s in with_arms:
        assert set(s["heldout_accuracy"]) == {"base", *ARMS}
        assert 0 < s["kept_fraction"] < 1 and s["gradients_at_base"]["norm_ratio"] > 0
        assert -1 <= s["gradients_at_base"]["cosine"] <= 1
    for s in seeds:  # a seed without a bottleneck after the base says so instead of selecting
        assert ("no_selection" in s) == (s["bottleneck"] == "base")
    assert any(line.startswith("- T3S") for line in report["verdict"]) and (tmp_path / "report.md").exists()
    for plot in ("dc_hist.png", "bifurcation.png", "training_accuracy.png", "arms.png"):
        assert (tmp_path / plot).exists()


def test_demo_traces_are_running_sums_with_fillers_and_heldout_is_disjoint():
    import random

    from t3s_kernels.demo import ANS, DIGIT0, EOS, FILLER, IGNORE, trace

    ex = trace("x", (3, 9, 4), 1.0, random.Random(0))
    assert ex.input_ids[5:] == [DIGIT0 + 3, FILLER, DIGIT0 + 2, FILLER, DIGIT0 + 6, EOS]
    assert ex.labels[:5] == [IGNORE] * 5 and ex.input_ids[4] == ANS
    assert FILLER not in trace("y", (3, 9, 4), 0.0, random.Random(0)).input_ids


def test_the_new_skill_task_trains_and_holds_out_problems_longer_than_the_base_saw(tmp_path, monkeypatch):
    """--task new_skill: half of each seed's training and held-out problems have HARD_DIGITS digits (the
    base trains on DIGITS only); the report says so."""
    from t3s_kernels import demo

    seen = []
    real = demo.trace
    monkeypatch.setattr(demo, "trace", lambda ex_id, digits, *a: seen.append((ex_id, len(digits))) or
                        real(ex_id, digits, *a))
    assert main(["demo", "--quick", "--seeds", "1", "--task", "new_skill", "--out", str(tmp_path)]) == 0
    lengths = {kind: [n for ex_id, n in seen if f"-{kind}-" in ex_id] for kind in ("train", "heldout")}
    for kind, ns in lengths.items():
        assert ns.count(demo.HARD_DIGITS) == len(ns) // 2 and set(ns) == {demo.DIGITS, demo.HARD_DIGITS}, kind
    assert all(n == demo.DIGITS for ex_id, n in seen if ex_id.startswith("base-"))
    assert f"{demo.HARD_DIGITS} digits, which the base never saw" in (tmp_path / "report.md").read_text()


def test_demo_masked_diffusion_student_forces_the_dllm_selection_into_every_mask(tmp_path):
    """--student masked_diffusion --quick: the three dLLM arms over two seeds; T3S's selection (the AR
    selector's dc < -tau) was masked at every step of the dllm arm, at the random rate only in plain training,
    and the random control forced as many positions."""
    from t3s_kernels.demo_diffusion import ARMS

    assert main(["demo", "--student", "masked_diffusion", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["student"] == "masked_diffusion" and [s["seed"] for s in report["seeds"]] == [0, 1]
    with_arms = [s for s in report["seeds"] if "no_selection" not in s]
    assert with_arms, "the smoke run must reach the selection and the three arms in at least one seed"
    for s in with_arms:
        assert set(s["heldout_accuracy"]) == {"base", *ARMS}
        assert 0 < s["selection"]["fraction_selected"] < 1
        m = s["masking"]
        assert m["dllm"]["forced"] > 0 and m["dllm"]["forced_masked"] == m["dllm"]["forced"]
        assert m["dllm"]["selected_masked_share"] == 1.0
        assert m["plain"]["forced"] == 0 and 0.3 < m["plain"]["selected_masked_share"] < 0.8
        assert m["random_force"]["forced"] == m["dllm"]["forced"] == m["random_force"]["forced_masked"]
        assert m["random_force"]["selected_masked_share"] < 1.0
        assert all(len(s["training_curves"][arm]) == 3 for arm in ARMS)  # step 0, 6, 12
    assert any(line.startswith("- dllm") for line in report["verdict"])
    assert "masked-diffusion student" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "dllm_arms.png").exists()


def test_the_dllm_canvas_pads_answers_with_a_labelled_eos_and_random_forcing_matches_sizes():
    from t3s_kernels.demo_diffusion import CANVAS, EOS, canvas, random_force

    ex = {"input_ids": [2, 13, 3, 13, 1], "labels": [-100, -100, -100, 13, 1], "t3s_force_mask": [0, 0, 0, 1, 0]}
    out = canvas(ex)
    assert out["prompt_length"] == 3 and len(out["input_ids"]) == 3 + CANVAS
    assert out["input_ids"][5:] == [EOS] * (CANVAS - 2) == out["labels"][5:]
    assert out["t3s_force_mask"] == [0, 0, 0, 1, 0] + [False] * (CANVAS - 2)
    like = [[False] * 3 + [True] * 2 + [False] * (CANVAS - 2)]
    forced = random_force([out], like, seed=0)[0]
    assert sum(forced) == 2 and not any(forced[:3])


def test_the_masked_diffusion_student_refuses_the_new_skill_task(tmp_path, capsys):
    assert main(["demo", "--student", "masked_diffusion", "--task", "new_skill", "--out", str(tmp_path)]) == 2
    assert "style task only" in capsys.readouterr().err
    assert main(["demo", "--tau", "0.5", "--out", str(tmp_path)]) == 2  # the AR rule has no threshold
    assert "--student masked_diffusion" in capsys.readouterr().err
