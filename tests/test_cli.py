"""The commands: t3s select / bottleneck and their one-line errors (score: pipeline/test_scoring.py;
demo: test_demo.py)."""

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


def test_bench_help_names_every_provider():
    """`t3s bench --help` lists the providers by hand (the parser must not import the benchmark harness
    and torch at start-up): the list is exactly the harness's."""
    from t3s_kernels.bench import PROVIDERS
    from t3s_kernels.cli import build_parser

    bench = next(a for a in build_parser()._subparsers._group_actions[0].choices["bench"]._actions
                 if a.dest == "providers")
    assert bench.help.removeprefix("subset of: ").split() == list(PROVIDERS)
