"""What `pip install` of a built wheel gives: the package with the native CPU epilogue's source inside
it (package data), built on first use as a source checkout builds it, and the PyTorch epilogue with a
one-line warning where no C++ compiler is found. The wheel (and the sdist) are built from a copy of the
package's files, installed with pip into a fresh virtual environment whose other packages are this
environment's, linked (tests/test_bare_install.py), so pip never fetches torch."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

from tests.test_bare_install import ROOT, _bare_python

SOURCE = "t3s_kernels/backends/cpu_epilogue.cpp"


def _build(tmp_path: Path, what: str) -> Path:
    """Build a wheel or an sdist with setuptools' own backend from a copy of the files pyproject.toml
    packs (a build in the checkout would leave build/ and egg-info there)."""
    src = tmp_path / "src"
    if not src.exists():
        shutil.copytree(ROOT / "t3s_kernels", src / "t3s_kernels", ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(ROOT / name, src / name)
    out = tmp_path / "dist"
    code = f"from setuptools import build_meta; print(build_meta.build_{what}({str(out)!r}))"
    run = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return out / run.stdout.strip().splitlines()[-1]


def test_the_wheel_and_the_sdist_carry_the_native_source(tmp_path):
    wheel = _build(tmp_path, "wheel")
    assert SOURCE in zipfile.ZipFile(wheel).namelist()
    sdist = _build(tmp_path, "sdist")
    assert any(name.endswith("/" + SOURCE) for name in tarfile.open(sdist).getnames())


PROBE = textwrap.dedent("""
    import json, warnings, torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import t3s_kernels as t3s
        from t3s_kernels.backends import cpu_epilogue
        from t3s_kernels.backends.select import make_engine
        epilogue = type(make_engine(torch.device("cpu"), "torch").epilogue).__name__
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(9, 16, generator=g, requires_grad=True), torch.randn(70, 16, generator=g)
        y = torch.randint(0, 70, (9,), generator=g)
        loss = t3s.fused_linear_t3s_loss(x, w, y).loss
        loss.backward()
        eager = torch.nn.functional.cross_entropy(x.detach() @ w.t(), y)
    module = cpu_epilogue.native_module()
    print(json.dumps(dict(epilogue=epilogue, package=t3s.__file__, source=str(cpu_epilogue.SOURCE),
                          built=None if module is None else module.__file__, loss_error=abs(loss.item() - eager.item()),
                          warnings=[str(w.message) for w in caught if "t3s-kernels" in str(w.message)])))
""")


def _probe(python: Path, tmp_path: Path, **env) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "T3S_CPU_EPILOGUE", "CXX")}
    environ.update({"PYTHONNOUSERSITE": "1", "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"), **env})
    run = subprocess.run([str(python), "-c", PROBE], cwd=tmp_path, env=environ, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(900)
def test_an_installed_wheel_builds_and_runs_the_native_epilogue(tmp_path):
    wheel = _build(tmp_path, "wheel")
    python = _bare_python(tmp_path, with_triton=False, link_package=False)
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-index", "--no-compile", "-q", str(wheel)], capture_output=True, text=True,
                             timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    venv = python.parents[1]

    native = _probe(python, tmp_path)  # a fresh extensions folder: the first use builds it
    assert Path(native["package"]).is_relative_to(venv) and Path(native["source"]).is_relative_to(venv), native
    assert native["epilogue"] == "NativeCpuEpilogue" and native["warnings"] == [], native
    assert Path(native["built"]).is_relative_to(tmp_path / "extensions"), native
    assert native["loss_error"] < 1e-5, native

    # No compiler (CXX names one that is not there): the PyTorch epilogue, and one line that says why.
    fallback = _probe(python, tmp_path, CXX=str(tmp_path / "no-such-g++"), TORCH_EXTENSIONS_DIR=str(tmp_path / "e2"))
    assert fallback["epilogue"] == "TorchEpilogue" and fallback["built"] is None, fallback
    assert len(fallback["warnings"]) == 1 and "\n" not in fallback["warnings"][0], fallback
    assert "no C++ compiler" in fallback["warnings"][0] and "using the PyTorch epilogue" in fallback["warnings"][0]
    assert fallback["loss_error"] < 1e-5, fallback
