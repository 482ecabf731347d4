"""Each recipe in integrations/ runs as written, on its tiny model, and feeds the T3S mask
through to the fused op."""

import importlib.util
import math
import pathlib

import pytest

from t3s_kernels.toy import synthetic_traces
from tests.helpers import count_head_rows

pytest.importorskip("transformers")
RECIPES = pathlib.Path(__file__).resolve().parents[2] / "integrations"


def load(name):
    """A recipe as a module; its folder on the path, as when run as a script (recipe_report.py)."""
    import sys

    if str(RECIPES) not in sys.path:
        sys.path.insert(0, str(RECIPES))
    spec = importlib.util.spec_from_file_location(name, RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def rows_seen(monkeypatch):
    return count_head_rows(monkeypatch)


@pytest.mark.parametrize("name", ["hf_trainer_t3s", "trl_sft_t3s"])
def test_causal_recipes_train_on_the_selected_tokens_only(name, rows_seen):
    if name == "trl_sft_t3s":
        pytest.importorskip("trl")
    steps = 4 if name == "hf_trainer_t3s" else 8  # one epoch of the 64 examples either way
    losses = load(name).main(["--steps", str(steps)])
    assert losses and all(math.isfinite(x) for x in losses)
    # one epoch: every selected, labelled target token (shifted by one) reached the head once
    expected = sum(sum(ex["t3s_weights"][1:]) for ex in synthetic_traces(64))
    assert sum(rows_seen) == expected


def test_masked_diffusion_recipe_runs(rows_seen):
    losses = load("masked_diffusion_t3s").main(["--steps", "4"])
    assert losses and all(math.isfinite(x) for x in losses)
    assert rows_seen and all(r > 0 for r in rows_seen)


def test_end_to_end_recipe(tmp_path):
    result = load("t3s_end_to_end").main(["--out", str(tmp_path), "--pilot-steps", "10", "--retrain-steps", "4",
                                          "--every", "5"])
    assert result["bottleneck"] in ("step-5", "step-10")
    assert (tmp_path / "pilot_accuracy.json").exists() and (tmp_path / "store" / "manifest.json").exists()
    assert all(math.isfinite(x) for x in result["losses"])


@pytest.mark.parametrize("kd_loss", ["forward_kl", "jsd"])
def test_distillation_recipe(kd_loss, rows_seen):
    losses = load("distill_t3s").main(["--steps", "4", "--kd-loss", kd_loss])
    assert losses and all(math.isfinite(x) for x in losses) and rows_seen


def torchrun(*args, timeout=300):
    """Run ``torchrun --nproc-per-node 2 ARGS`` (gloo on CPU) as the recipes document it; its output."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(29400 + os.getpid() % 500), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=RECIPES.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _rank_losses(out):
    """{rank: [losses]} from the recipes' 'rank R: trained N steps; losses: a, b' lines."""
    found = {}
    for line in out.splitlines():
        if line.startswith("rank ") and "losses:" in line:
            rank = int(line.split()[1].rstrip(":"))
            found[rank] = [float(x) for x in line.split("losses:")[1].split(",")]
    return found


@pytest.mark.parametrize("options", [[], ["--head-alone", "--bf16"]], ids=["head with root", "head alone, bf16"])
def test_fsdp2_recipe_under_torchrun(options):
    found = _rank_losses(torchrun(RECIPES / "fsdp2_t3s.py", "--steps", 3, *options))
    assert sorted(found) == [0, 1] and all(len(v) == 3 and all(math.isfinite(x) for x in v) for v in found.values())
    assert found[0] != found[1]  # data parallelism: each rank its own batches


def test_tensor_parallel_recipe_under_torchrun():
    found = _rank_losses(torchrun(RECIPES / "tensor_parallel_t3s.py", "--steps", 3))
    assert sorted(found) == [0, 1] and found[0] == found[1] and all(math.isfinite(x) for x in found[0])
    assert found[0][-1] < found[0][0]  # it learns


def test_deepspeed_zero3_recipe_under_torchrun():
    pytest.importorskip("deepspeed")
    out = torchrun(RECIPES / "hf_trainer_t3s.py", "--steps", 2, "--deepspeed", RECIPES / "launch" / "zero3.json")
    assert out.count("trained 2 steps") == 2


def test_scoring_under_torchrun(tmp_path):
    """``t3s score`` under torchrun: each rank scores its share; the store holds every example once."""
    import json

    from t3s_kernels.pipeline.store import ScoreStore
    from t3s_kernels.toy import tiny_causal_lm

    tiny_causal_lm("qwen3").save_pretrained(tmp_path / "base")
    with open(tmp_path / "traces.jsonl", "w") as f:
        for e in synthetic_traces(30):
            f.write(json.dumps({k: e[k] for k in ("id", "input_ids", "labels")}) + "\n")
    out = torchrun("-m", "t3s_kernels.cli", "score", "--model", tmp_path / "base", "--data", tmp_path / "traces.jsonl",
                   "--store", tmp_path / "store", "--quiet")
    assert out.count("scored 15 examples into 'base'") == 2
    assert len(ScoreStore(str(tmp_path / "store")).done("base")) == 30
