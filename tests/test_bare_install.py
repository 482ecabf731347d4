"""``import t3s_kernels`` with only torch installed (and with torch and triton): a fresh interpreter whose
site-packages holds nothing but torch, the package's own dependencies and what they need, linked from
this environment (a venv without pip: seconds, where installing torch would take a minute). The op
runs there, and each optional feature, used, names the extra that installs what it lacks."""

import importlib.metadata as metadata
import os
import re
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ("torch", "numpy", "tqdm", "safetensors", "filelock", "ninja")  # pyproject.toml's dependencies
OPTIONAL = ("transformers", "datasets", "matplotlib", "triton", "accelerate", "trl", "deepspeed", "tokenizers")


def _requirements(name: str) -> list[str]:
    """The distributions ``name`` requires (extras left out) that are installed here."""
    names = []
    for req in metadata.distribution(name).requires or []:
        if "extra ==" in req:
            continue
        dep = re.split(r"[ <>=!~\[;(]", req, maxsplit=1)[0]
        try:
            metadata.distribution(dep)
        except metadata.PackageNotFoundError:
            continue  # a requirement for another platform
        names.append(dep)
    return names


def _closure(roots) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key not in seen:
            seen.add(key)
            todo += _requirements(name)
    return seen


def _bare_python(tmp_path: Path, with_triton: bool, link_package: bool = True) -> Path:
    """A venv whose only packages are the closure of CORE (+ triton) and t3s_kernels (unless
    ``link_package`` is False: a wheel is installed there instead), as links."""
    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env)
    site = tmp_path / "site"
    site.mkdir()
    for dist_name in _closure(CORE + (("triton",) if with_triton else ())):
        dist = metadata.distribution(dist_name)
        base = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if (base / top).exists() and not (site / top).exists():
                (site / top).symlink_to(base / top)
    if link_package:
        (site / "t3s_kernels").symlink_to(ROOT / "t3s_kernels")
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = subprocess.run([str(env / "bin" / "python"), "-c", where], capture_output=True, text=True,
                             check=True).stdout.strip()
    (Path(purelib) / "bare.pth").write_text(str(site) + "\n")
    return env / "bin" / "python"


SCRIPT = textwrap.dedent("""
    import sys, torch
    import t3s_kernels as t3s
    import t3s_kernels.adapters, t3s_kernels.patching, t3s_kernels.pipeline, t3s_kernels.trainer_utils
    import t3s_kernels.bench, t3s_kernels.cli
    from t3s_kernels.masked_diffusion_trainer import masked_diffusion_compute_loss
    loaded = sorted(m for m in {OPTIONAL} if m in sys.modules)
    assert not loaded, f"import t3s_kernels loaded {{loaded}}"
    x, w = torch.randn(5, 8, requires_grad=True), torch.randn(11, 8)
    out = t3s.fused_linear_t3s_loss(x, w, torch.tensor([1, 2, 3, -100, 4]), return_stats=True)
    out.loss.backward()
    assert torch.isfinite(x.grad).all()

    def refusal(f):
        try:
            f()
        except Exception as e:
            return f"{{type(e).__name__}}: {{e}}"
        return "no error"

    import t3s_kernels.masked_diffusion_trainer as mdt
    from t3s_kernels.toy import tiny_causal_lm
    from t3s_kernels.pipeline.bottleneck import plot_accuracy
    print("TRAINER", refusal(lambda: mdt.MaskedDiffusionTrainer))
    print("TOY", refusal(lambda: tiny_causal_lm()))
    print("PLOT", refusal(lambda: plot_accuracy([("a", 0.5)], "x.png")))
    print("TRITON", refusal(lambda: t3s.fused_linear_t3s_loss(x, w, torch.tensor([1, 2, 3, 0, 4]), backend="triton")))
""")


@pytest.mark.parametrize("with_triton", [False, True], ids=["torch only", "torch and triton"])
def test_import_and_use_with_only_the_core_dependencies(tmp_path, with_triton):
    python = _bare_python(tmp_path, with_triton)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(T3S_CPU_EPILOGUE="torch", PYTHONNOUSERSITE="1")  # the native build is tested elsewhere
    run = subprocess.run([str(python), "-c", SCRIPT.format(OPTIONAL=OPTIONAL)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    said = dict(line.split(" ", 1) for line in run.stdout.splitlines() if " " in line)
    assert "MaskedDiffusionTrainer needs transformers, which the 'hf' extra installs" in said["TRAINER"]
    assert "the toy models needs transformers, which the 'hf' extra installs" in said["TOY"]
    assert "plotting accuracy needs matplotlib, which the 'plot' extra installs" in said["PLOT"]
    assert "backend='triton' needs CUDA tensors" in said["TRITON"]
    if not with_triton:
        assert "the 'triton' extra" in said["TRITON"]


def test_the_bare_environment_is_bare(tmp_path):
    """The test above is only worth something if the optional packages are really out of reach there."""
    python = _bare_python(tmp_path, with_triton=False)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import importlib.util as u; print([m for m in %r if u.find_spec(m)])" % (OPTIONAL,)
    run = subprocess.run([str(python), "-c", code], env=env, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]", run.stdout
    assert sys.executable != str(python)
