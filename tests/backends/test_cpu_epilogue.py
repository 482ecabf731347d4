"""The native CPU epilogue (t3s_kernels/backends/cpu_epilogue.cpp) against the fp64 reference through the whole op,
every option and dtype, whole vocabulary rows and vocabulary chunks; and the PyTorch epilogue it
falls back to, by request or when it cannot be built; and the build's lock (a build killed midway,
another process's build in progress)."""

import json
import os
import pathlib
import subprocess
import sys

import filelock
import pytest
import torch

from t3s_kernels.backends import cpu_epilogue
from t3s_kernels.backends.chunked import ChunkedEngine
from t3s_kernels.backends.cpu_epilogue import NativeCpuEpilogue, native_module
from t3s_kernels.backends.select import make_engine
from t3s_kernels.backends.torch_epilogue import TorchEpilogue
from t3s_kernels.function import LossConfig, fused_head_loss
from t3s_kernels.options import HeadOptions
from t3s_kernels.reference import reference_t3s_loss
from tests.helpers import TOLERANCE, assert_close, make_inputs

CPU = torch.device("cpu")
OPTIONS = [dict(), dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0, logit_scale=0.5)]


@pytest.fixture(scope="module")
def native():
    module = native_module()
    if module is None:
        pytest.skip("the native CPU epilogue did not build here (no compiler?); the PyTorch epilogue serves")
    return module


def assert_matches_reference(inputs: dict, cfg: LossConfig, opts: dict, dtype: torch.dtype) -> None:
    """The op's loss, statistics and gradients (in ``dtype``) against the fp64 reference, at ``TOLERANCE``."""
    x, w, b = (inputs[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    loss, logprob, entropy, correct, lse, _ = fused_head_loss(x, w, b, inputs["labels"], inputs["token_weights"], cfg)
    rx, rw, rb = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref, stats = reference_t3s_loss(rx, rw, inputs["labels"], bias=rb, token_weights=inputs["token_weights"], **opts)
    tol = TOLERANCE[dtype]
    assert_close(loss, ref, tol["value"], "loss")
    for name, got in (("logprob", logprob), ("entropy", entropy), ("lse", lse)):
        assert_close(got, stats[name], tol["value"], name)
    assert torch.equal(correct, stats["correct"])
    for name, got, want in zip(("dX", "dW", "db"), torch.autograd.grad(loss, (x, w, b)),
                               torch.autograd.grad(ref, (rx, rw, rb))):
        assert got.dtype == dtype
        assert_close(got, want, tol["grad"], name)


@pytest.mark.parametrize("opts", OPTIONS, ids=["plain", "rich"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("chunk_rows,vocab_chunk", [(16, None), (16, 64)], ids=["whole-rows", "vocab-chunks"])
def test_native_epilogue_matches_the_reference(native, opts, dtype, chunk_rows, vocab_chunk):
    inputs = make_inputs(n=41, h=24, v=203, dtype=dtype, bias=True, weights="zeros", ignored=3, device="cpu")
    assert isinstance(make_engine(CPU, "torch").epilogue, NativeCpuEpilogue)  # the default on a CPU
    cfg = LossConfig(opts=HeadOptions(vocab_size=203, **opts), backend="torch", chunk_rows=chunk_rows,
                     vocab_chunk=vocab_chunk)
    assert_matches_reference(inputs, cfg, opts, dtype)


@pytest.mark.parametrize("v", [2047, 4099, 6144 + 37])
@pytest.mark.parametrize("opts", OPTIONS, ids=["plain", "rich"])
def test_rows_of_several_blocks_match_the_reference(native, v, opts):
    """Rows longer than one of the kernel's 2048-column blocks (a block's maximum, merged block by block;
    the unrolled loops' vector and scalar tails), logits spread wide enough that the row maximum moves
    between blocks."""
    inputs = make_inputs(n=19, h=16, v=v, dtype=torch.float32, bias=True, weights="random", ignored=2, device="cpu",
                         logit_scale=4.0)
    cfg = LossConfig(opts=HeadOptions(vocab_size=v, **opts), backend="torch", chunk_rows=8)
    assert_matches_reference(inputs, cfg, opts, torch.float32)


def test_the_kernels_exponential_is_within_one_and_a_half_ulp(native):
    """The epilogue's vector exponential (cpu_epilogue.cpp, ``exp_vec``) against float64 on every float32
    step of a dense grid over [-104, 89], with the special values: the largest error, in units of the
    float32 result's last place, at most 1.5 (0.92 measured with AVX-512; Sleef's, which other instruction
    sets take, is 1); subnormal
    results within one subnormal step; NaN stays NaN, e^-inf = 0, e^inf = inf, and e^0 = 1 exactly."""
    x = torch.cat([torch.linspace(-104.0, 89.0, 2_000_003), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 88.7, -87.3])])
    got = native.vector_exp(x=x).double()
    want = x.double().exp()
    normal = (want >= torch.finfo(torch.float32).tiny) & (want <= torch.finfo(torch.float32).max)
    assert got[want > 2 * torch.finfo(torch.float32).max].isinf().all()  # past the largest float: overflow
    ulp = (want[normal].float().nextafter(torch.tensor(float("inf"))).double() - want[normal].float().double())
    worst = ((got[normal] - want[normal]).abs() / ulp).max().item()
    assert worst <= 1.5, f"max error {worst:.2f} ulp"
    subnormal_step = 2.0 ** -149
    subnormal = want < torch.finfo(torch.float32).tiny
    assert ((got[subnormal] - want[subnormal]).abs() <= subnormal_step).all()
    special = native.vector_exp(x=torch.tensor([float("nan"), float("-inf"), float("inf"), 0.0, -1000.0, 1000.0]))
    assert special[0].isnan() and special[1] == 0 and special[2] == float("inf") and special[3] == 1.0
    assert special[4] == 0 and special[5] == float("inf")


@pytest.mark.parametrize("v,vocab_chunk", [(8, None), (203, None), (1203, None), (1203, 300)])
@pytest.mark.parametrize("softcap", [30.0, 2.0])
def test_correct_where_every_label_is_its_rows_argmax(native, v, vocab_chunk, softcap):
    """A label that is its row's argmax is ``correct``: its logit is read from the values the row's
    maximum was taken over (vector lanes and scalar tail alike, across blocks and vocabulary chunks).
    Read through a scalar tanh instead, it fell an ulp short of the vectorized maximum for 685 of
    4096 such rows at V=8, softcap 30."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(512, 20, generator=g), torch.randn(v, 20, generator=g) * 0.7
    labels = (x @ w.t()).argmax(1)
    cfg = LossConfig(opts=HeadOptions(vocab_size=v, softcap=softcap), backend="torch", vocab_chunk=vocab_chunk)
    correct = fused_head_loss(x, w, None, labels, None, cfg)[3]
    assert correct.all(), f"{int((~correct).sum())} of 512 argmax labels marked incorrect"


def test_state_merges_across_vocabulary_chunks_like_the_pytorch_epilogue(native):
    """The raw online state (m, d, u, label logit, logit sum) after every vocabulary chunk, against
    the PyTorch epilogue's, for logits far from 0 (where an unshifted sum would overflow)."""
    from t3s_kernels.backends.base import OnlineState

    torch.manual_seed(0)
    logits = torch.randn(9, 300) * 30 + 80
    labels = torch.tensor([0, 5, 99, 100, 150, 299, 7, 200, 250])
    opts = HeadOptions(vocab_size=300, softcap=50.0, label_smoothing=0.1)
    states = [OnlineState(9, CPU), OnlineState(9, CPU)]
    for col0 in (0, 100, 200):
        for epilogue, state in zip((TorchEpilogue(), NativeCpuEpilogue(native)), states):
            epilogue.accumulate(logits[:, col0:col0 + 100].clone(), labels, col0, state, opts)
    assert_close(states[1].planes, states[0].planes, 1e-5, "state")


def test_arguments_cross_into_cpp_by_name(native):
    """What the Python side passes is, name for name, what the C++ functions declare (their py::arg
    list), and a name that is not declared fails the call instead of landing in another's place."""
    import re

    calls = {}

    class Recorder:
        def __getattr__(self, name):
            return lambda **kwargs: calls.setdefault(name, set(kwargs))

    opts = HeadOptions(vocab_size=8, softcap=2.0, label_smoothing=0.1)
    logits, labels = torch.zeros(2, 8), torch.zeros(2, dtype=torch.long)
    state, lse, scale = torch.zeros(5, 2), torch.zeros(2), torch.ones(2)
    fake = NativeCpuEpilogue(Recorder())
    fake.accumulate(logits, labels, 0, type("S", (), {"planes": state})(), opts)
    fake.gradient(logits, labels, 0, lse, scale, opts, torch.float32)
    fake.accumulate_and_gradient(logits, labels, type("S", (), {"planes": state})(), scale, opts, torch.float32)
    for name, passed in calls.items():
        declared = re.findall(r"(\w+): ", getattr(native, name).__doc__.splitlines()[0])
        assert set(declared) == passed, (name, declared, passed)
    with pytest.raises(TypeError, match="incompatible function arguments"):
        native.accumulate(logits=logits, labels=labels, col0=0, state=state, has_softcap=False, softcap=1.0,
                          logit_scale=1.0, smoothing=False)  # has_smoothing misspelled


def test_pytorch_epilogue_on_request_and_without_a_build(monkeypatch):
    monkeypatch.setenv("T3S_CPU_EPILOGUE", "torch")
    assert type(make_engine(CPU, "torch").epilogue) is TorchEpilogue
    monkeypatch.delenv("T3S_CPU_EPILOGUE")
    monkeypatch.setattr(cpu_epilogue, "_build", lambda: None)  # no compiler, no source: the fallback
    engine = make_engine(CPU, "torch")
    assert isinstance(engine, ChunkedEngine) and type(engine.epilogue) is TorchEpilogue


# A stand-in source that builds in seconds: what is tested is the build's locking, not the epilogue.
_TINY_SOURCE = """#include <pybind11/pybind11.h>
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", [] { return 42; }); }
"""
_BUILD_IN_A_PROCESS = """
import json, pathlib, sys, warnings
from t3s_kernels.backends import cpu_epilogue
cpu_epilogue.SOURCE = pathlib.Path(sys.argv[1])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    module = cpu_epilogue._build()
print(json.dumps({"answer": None if module is None else module.answer(), "warnings": [str(w.message) for w in caught]}))
"""


def _build_in_a_process(source, env, timeout):
    done = subprocess.run([sys.executable, "-c", _BUILD_IN_A_PROCESS, str(source)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def tiny_build(tmp_path, monkeypatch):
    source = tmp_path / "tiny.cpp"
    source.write_text(_TINY_SOURCE)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    monkeypatch.setattr(cpu_epilogue, "SOURCE", source)
    return source, cpu_epilogue.build_target(), dict(os.environ, T3S_CPU_EPILOGUE_BUILD_WAIT_S="3")


def test_a_build_killed_midway_does_not_stall_the_next(tiny_build):
    # A process killed while building leaves cpp_extension's marker file ("lock") in the build folder;
    # cpp_extension alone then waits for it forever in every later process (a test run stalled so).
    source, (_, folder, _), env = tiny_build
    folder.mkdir(parents=True)
    (folder / "lock").touch()
    assert _build_in_a_process(source, env, timeout=300) == {"answer": 42, "warnings": []}
    assert not (folder / "lock").exists()


def test_a_build_held_by_a_live_process_is_waited_for_then_given_up(tiny_build):
    source, (name, folder, _), env = tiny_build
    folder.mkdir(parents=True)
    with filelock.FileLock(str(folder.parent / f"{name}.lock")):  # another process building, for longer than 3 s
        result = _build_in_a_process(source, env, timeout=300)
    assert result["answer"] is None and len(result["warnings"]) == 1
    assert "did not build (Timeout" in result["warnings"][0] and "using the PyTorch epilogue" in result["warnings"][0]
    assert _build_in_a_process(source, env, timeout=300)["answer"] == 42  # once it is released, the build runs


def test_each_python_torch_and_source_builds_in_a_folder_of_its_own(tiny_build, monkeypatch):
    source, (name, folder, _), _ = tiny_build
    assert folder == pathlib.Path(os.environ["TORCH_EXTENSIONS_DIR"]) / name
    with monkeypatch.context() as m:
        m.setattr(sys.implementation, "cache_tag", "cpython-399")  # another interpreter's ABI
        other_python = cpu_epilogue.build_target()[0]
    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", "0.0.0")
        other_torch = cpu_epilogue.build_target()[0]
    assert cpu_epilogue.build_target()[0] == name  # nothing else moved it
    source.write_text(_TINY_SOURCE + "// edited\n")
    assert len({name, other_python, other_torch, cpu_epilogue.build_target()[0]}) == 4
