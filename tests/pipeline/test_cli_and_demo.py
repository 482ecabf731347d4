"""The pipeline's commands: t3s select / bottleneck / demo (score is in test_scoring.py)."""

import json

import torch

from t3s_kernels.cli import main
from t3s_kernels.pipeline.store import ScoreStore


def fake_store(root):
    store = ScoreStore(root)
    store.bind(["a", "b"], [4, 3])
    for name, shift in (("base", 0.0), ("step-10", 0.3)):
        stats = []
        for n, seed in ((4, 0), (3, 1)):
            g = torch.Generator().manual_seed(seed)
            lp = -torch.rand(n, generator=g) * 2 - 0.5  # log-probabilities stay <= 0 after the shift
            lp = lp + shift * torch.tensor([1.0, -1.0, 1.0, -1.0][:n])
            stats.append({"logprob": lp, "entropy": torch.rand(n, generator=g), "correct": lp > -0.5,
                          "scored": torch.tensor([False] + [True] * (n - 1))})
        store.write_shard(name, 0, [0, 1], stats)
    return store


def test_select_command_writes_mask_summary_and_plots(tmp_path, capsys):
    fake_store(tmp_path / "store")
    out = tmp_path / "sel"
    assert main(["select", "--store", str(tmp_path / "store"), "--rule", "dllm", "--bottleneck", "step-10",
                 "--tau", "0.1", "--out", str(out), "--plot"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rule"] == "dllm" and summary["tau"] == 0.1 and summary["scored_tokens"] == 5
    assert (out / "mask.safetensors").exists() and (out / "dc_hist.png").exists() and (out / "bifurcation.png").exists()


def test_commands_report_bad_input_in_one_line(tmp_path, capsys):
    fake_store(tmp_path / "store")
    code = main(["select", "--store", str(tmp_path / "store"), "--rule", "dllm", "--bottleneck", "step-10",
                 "--tau", "-1", "--out", str(tmp_path / "x")])
    assert code == 2 and "t3s select: error: tau must be >= 0" in capsys.readouterr().err
    code = main(["select", "--store", str(tmp_path / "store"), "--rule", "ar", "--bottleneck", "step-99",
                 "--out", str(tmp_path / "x")])
    assert code == 2 and "has no score set 'step-99'; it has ['base', 'step-10']" in capsys.readouterr().err


def test_bottleneck_command(tmp_path, capsys):
    table = tmp_path / "acc.csv"
    table.write_text("checkpoint,accuracy\nbase,0.8\nstep-10,0.35\nstep-20,0.5\n")
    assert main(["bottleneck", str(table), "--plot", str(tmp_path / "acc.png")]) == 0
    assert "bottleneck: step-10" in capsys.readouterr().out and (tmp_path / "acc.png").exists()


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


def test_cli_errors_are_one_line_naming_the_argument_or_file(tmp_path, capsys):
    import pytest

    for argv, message in [
        (["bench", "--tokens", "-3"], "argument --tokens: expected a whole number >= 1; got -3"),
        (["score", "--model", "m", "--data", "d", "--store", "s", "--name", "n", "--rounds", "0"],
         "argument --rounds: expected a whole number >= 1; got 0"),
    ]:
        with pytest.raises(SystemExit):  # argparse: usage line + one error line
            main(argv)
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    missing = tmp_path / "nope.jsonl"
    code = main(["score", "--model", str(tmp_path), "--data", str(missing), "--store", str(tmp_path / "s"),
                 "--name", "n"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"t3s score: error: No such file or directory: {missing}"]
