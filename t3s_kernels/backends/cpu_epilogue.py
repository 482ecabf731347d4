"""The chunked driver's epilogue as native CPU code (cpu_epilogue.cpp beside this module, shipped in
the package: a wheel, an sdist and a source checkout build the same file): vectorized with ATen's
``Vectorized`` for the machine's instruction set, rows over ATen's threads. Built with
``torch.utils.cpp_extension`` on first use (a C++ compiler, ninja and about a minute, then cached under
``TORCH_EXTENSIONS_DIR``, by default PyTorch's ``~/.cache/torch_extensions``); where it cannot be built,
``native_module()`` is None, one warning says why, and the torch backend keeps the PyTorch epilogue.

The build is guarded by an operating-system lock (``flock``), which dies with its holder:
``cpp_extension``'s own marker of a build in progress is a plain file that a process killed while
building leaves behind, after which every later ``load`` of that build waits for it forever."""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import shutil
import sys
import warnings

import filelock
import torch

from .base import grad_scalars, head_scalars
from .torch_epilogue import TorchEpilogue

SOURCE = pathlib.Path(__file__).resolve().with_name("cpu_epilogue.cpp")  # package data (pyproject.toml)
# ATen's vector types follow CPU_CAPABILITY: the flags for each instruction set it knows.
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX512",
               "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}
# How long a process waits for another one's build before it takes the PyTorch epilogue instead
# (a build takes about a minute on two cores).
BUILD_WAIT_S = float(os.environ.get("T3S_CPU_EPILOGUE_BUILD_WAIT_S", 900))


def native_module():
    """The built extension, or None: asked not to (``T3S_CPU_EPILOGUE=torch``), or, said once in a one-line
    warning, no source beside the module, no compiler or ninja, a failed build."""
    if os.environ.get("T3S_CPU_EPILOGUE", "native") == "torch":
        return None
    return _build()


def cpu_epilogue() -> TorchEpilogue:
    """The torch backend's epilogue for CPU tensors: native where it builds, else PyTorch."""
    module = native_module()
    return TorchEpilogue() if module is None else NativeCpuEpilogue(module)


def build_target() -> tuple[str, pathlib.Path, list[str]]:
    """The extension's name, its build folder (under ``TORCH_EXTENSIONS_DIR``, else PyTorch's default
    root) and compiler flags for this machine, Python and PyTorch: one name per source, flags, Python
    ABI and torch, so that two versions never load each other's library (the folder is shared by every
    process of the user; "flock": builds that take the lock below)."""
    from torch.utils.cpp_extension import get_default_build_root

    capability = torch.backends.cpu.get_cpu_capability()
    cflags = ["-O3", "-fopenmp", *_CAPABILITY_FLAGS.get(capability, [])]
    python = sys.implementation.cache_tag + getattr(sys, "abiflags", "")
    key = SOURCE.read_bytes() + " ".join(cflags + [python, torch.__version__, "flock"]).encode()
    name = f"t3s_cpu_epilogue_{capability.lower()}_{hashlib.sha256(key).hexdigest()[:12]}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return name, pathlib.Path(root) / name, cflags


def _fallback(reason: str) -> None:
    warnings.warn(f"t3s-kernels: the native CPU epilogue did not build ({reason}); using the PyTorch epilogue",
                  stacklevel=3)


def _missing_tool() -> str:
    """Why the build cannot start here ('' where it can): the C++ compiler cpp_extension runs (``CXX``, else
    ``c++``) is not found, or ninja is not. The ninja of the ``ninja`` package (a dependency) is put on
    ``PATH`` where its script is not, as when a virtual environment's Python runs unactivated."""
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        return f"no C++ compiler: {compiler!r} not found; install one (g++) or point CXX at it"
    if shutil.which("ninja") is None:
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    if shutil.which("ninja") is None:
        return "ninja not found; pip install ninja"
    return ""


@functools.lru_cache(maxsize=None)
def _build():
    if not SOURCE.exists():
        _fallback(f"its source {SOURCE} is not installed")
        return None
    missing = _missing_tool()
    if missing:
        _fallback(missing)
        return None
    try:
        from torch.utils.cpp_extension import load

        name, folder, cflags = build_target()
        folder.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(str(folder.parent / f"{name}.lock"), timeout=BUILD_WAIT_S):
            # Every build of this folder holds the lock above, so a marker of cpp_extension's found
            # while we hold it was left by a process that died building: without removing it, load waits.
            (folder / "lock").unlink(missing_ok=True)
            return load(name=name, sources=[str(SOURCE)], build_directory=str(folder), extra_cflags=cflags,
                        extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # a compiler that fails, headers that do not match, another build past BUILD_WAIT_S
        _fallback(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        return None


class NativeCpuEpilogue(TorchEpilogue):
    """The epilogue in native code for CPU tensors (with a teacher: the PyTorch chunk function).

    Every scalar crosses into C++ by name (the ``py::arg`` list of cpu_epilogue.cpp), never by
    position: a parameter renamed or added on one side fails the call with pybind11's TypeError
    naming the arguments, instead of shifting a value into another's place."""

    bytes_per_logit = 6  # the fp32 logits buffer, and a half-precision gradient for half inputs

    def __init__(self, module):
        super().__init__()
        self.module = module

    @staticmethod
    def _head(opts) -> dict:
        return dict(has_softcap=opts.has_softcap, **head_scalars(opts))

    def accumulate(self, logits, labels, col0, state, opts):
        self.module.accumulate(logits=logits, labels=labels, col0=col0, state=state.planes, **self._head(opts),
                               has_smoothing=opts.has_smoothing)

    def gradient(self, logits, labels, col0, lse, row_scale, opts, out_dtype):
        return self.module.gradient(logits=logits, labels=labels, col0=col0, lse=lse, row_scale=row_scale,
                                    **self._head(opts), **grad_scalars(opts), out_dtype=out_dtype)

    def accumulate_and_gradient(self, logits, labels, state, row_scale, opts, out_dtype):
        return self.module.accumulate_and_gradient(logits=logits, labels=labels, state=state.planes,
                                                   row_scale=row_scale, **self._head(opts),
                                                   has_smoothing=opts.has_smoothing, **grad_scalars(opts),
                                                   out_dtype=out_dtype)
