"""The providers ``t3s bench`` times: one function (mean cross-entropy over the selected tokens
of ``hidden @ weight.T``) as each library computes it.

The peers see unselected tokens as ignored labels; ours sees them as weight-0 tokens, which it
still scores. A provider maps (inputs, grad) to a callable returning (loss, dX, dW); it raises
ImportError when its library is missing and another error, with the reason, where it cannot run.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..api import fused_linear_t3s_loss, token_stats, triton_available
from ..backends.cpu_epilogue import native_module
from ..reference import reference_t3s_loss

IGNORE = -100


@dataclass
class Inputs:
    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor  # full labels
    masked_labels: torch.Tensor  # IGNORE at unselected tokens, for providers without token weights
    token_weights: torch.Tensor  # 1 selected, 0 not

    @staticmethod
    def make(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device: torch.device, select: float,
             seed: int = 0) -> "Inputs":
        g = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn(tokens, hidden, generator=g).to(device=device, dtype=dtype)
        w = (torch.randn(vocab, hidden, generator=g) * (2.0 / hidden**0.5)).to(device=device, dtype=dtype)
        y = torch.randint(0, vocab, (tokens,), generator=g).to(device)
        selected = (torch.rand(tokens, generator=g) < select).to(device)
        return Inputs(x, w, y, torch.where(selected, y, torch.full_like(y, IGNORE)), selected.float())


# A provider maps inputs to a callable that runs the loss (and its backward when grad=True) and
# returns (loss, dX, dW); the callable's ``backend`` says which implementation ran.
Provider = Callable[[Inputs, bool], Callable[[], tuple]]


def _leaf(t: torch.Tensor, grad: bool) -> torch.Tensor:
    return t.detach().requires_grad_(grad)


def package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _needs_cuda(inputs: Inputs) -> None:
    if not inputs.hidden.is_cuda:
        raise RuntimeError("needs CUDA")


def _runner(loss_fn, inputs: Inputs, grad: bool, backend: str = ""):
    x, w = _leaf(inputs.hidden, grad), _leaf(inputs.weight, grad)

    def run():
        x.grad = w.grad = None
        if not grad:
            with torch.no_grad():
                return loss_fn(x, w), None, None
        loss = loss_fn(x, w)
        loss.backward()
        return loss, x.grad, w.grad

    run.backend = backend
    return run


def eager_loss(x, w, labels):
    """What a HF model does: full logits in the inputs' dtype, upcast to fp32, cross-entropy (the
    reference in that mode)."""
    return reference_t3s_loss(x, w, labels, ignore_index=IGNORE, dtype=None, with_stats=False)[0]


def provider_eager(inputs: Inputs, grad: bool):
    return _runner(lambda x, w: eager_loss(x, w, inputs.masked_labels), inputs, grad, "PyTorch eager")


_COMPILED = {}


def provider_compile(inputs: Inputs, grad: bool):
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(eager_loss, dynamic=False)
    fn = _COMPILED["fn"]
    return _runner(lambda x, w: fn(x, w, inputs.masked_labels), inputs, grad, "torch.compile (inductor)")


@contextlib.contextmanager
def _env(name: str, value: str):
    """The environment variable ``name`` set to ``value`` for the block, then as it was."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name) if saved is None else os.environ.update({name: saved})


def _cpu_epilogue_name() -> str:
    return "native" if native_module() is not None else "PyTorch"


def provider_t3s(backend: str, grad_accum_dtype: str = "float32", logits_dtype: str = "auto",
                 chunk_budget_bytes: Optional[int] = None, return_stats: bool = False):
    """Ours; with ``return_stats`` the per-token statistics (logprob, entropy, correct, lse) come
    with the loss, as Liger's statistics path returns its NLL and entropy."""
    def make(inputs: Inputs, grad: bool):
        if backend == "triton" and not (inputs.hidden.is_cuda and triton_available(inputs.hidden.device)):
            raise RuntimeError("needs CUDA")
        label = f"t3s {backend}/chunked, dW accumulated in {grad_accum_dtype}, logits_dtype={logits_dtype}"
        if chunk_budget_bytes is not None:
            label += f", chunk budget {chunk_budget_bytes >> 20} MiB"
        if return_stats:
            label += ", return_stats=True"
        if backend == "torch" and not inputs.hidden.is_cuda:
            label += f", {_cpu_epilogue_name()} epilogue"
        return _runner(lambda x, w: fused_linear_t3s_loss(x, w, inputs.labels, token_weights=inputs.token_weights,
                                                          backend=backend, grad_accum_dtype=grad_accum_dtype,
                                                          logits_dtype=logits_dtype, return_stats=return_stats,
                                                          chunk_budget_bytes=chunk_budget_bytes).loss,
                       inputs, grad, label)

    return make


def provider_t3s_pytorch_epilogue(inputs: Inputs, grad: bool):
    """The torch backend on a CPU with its PyTorch epilogue instead of the native one (backends/cpu_epilogue.cpp)."""
    if inputs.hidden.is_cuda:
        raise RuntimeError("CPU only")
    run = provider_t3s("torch")(inputs, grad)

    def with_pytorch_epilogue():
        with _env("T3S_CPU_EPILOGUE", "torch"):
            return run()

    with_pytorch_epilogue.backend = "t3s torch/auto, PyTorch epilogue"
    return with_pytorch_epilogue


def provider_token_stats(inputs: Inputs, grad: bool):
    """Scoring: forward only, per-token statistics (the Triton tile kernel on a GPU)."""
    if grad:
        raise NotImplementedError("forward only")

    def run():
        return token_stats(inputs.hidden, inputs.weight, inputs.labels).lse, None, None

    run.backend = "t3s token_stats"
    return run


def _cutlass_importable() -> str:
    return "importable" if importlib.util.find_spec("cutlass") is not None else "not importable"


def provider_liger(inputs: Inputs, grad: bool):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    _needs_cuda(inputs)
    impl = os.environ.get("LIGER_KERNEL_IMPL", "default (Triton)")
    return _runner(lambda x, w: liger_fused_linear_cross_entropy(x, w, inputs.masked_labels, ignore_index=IGNORE),
                   inputs, grad, f"liger-kernel {package_version('liger-kernel')}, LIGER_KERNEL_IMPL={impl}, "
                   f"cutlass {_cutlass_importable()}")


def provider_liger_cute(inputs: Inputs, grad: bool):
    """Liger's fused linear cross-entropy on its CuTe-DSL backend (``LIGER_KERNEL_IMPL=cutedsl``, the
    ``cutedsl`` extra: NVIDIA's cutlass DSL, sm_90 and newer). Liger raises where that backend cannot run
    (no cutlass, another card); the row then says so instead of timing its Triton kernels under this name."""
    with _env("LIGER_KERNEL_IMPL", "cutedsl"):
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    _needs_cuda(inputs)
    if importlib.util.find_spec("cutlass") is None:
        raise RuntimeError("needs NVIDIA's cutlass DSL (liger-kernel[cutedsl])")

    def loss(x, w):
        with _env("LIGER_KERNEL_IMPL", "cutedsl"):
            return liger_fused_linear_cross_entropy(x, w, inputs.masked_labels, ignore_index=IGNORE)

    return _runner(loss, inputs, grad, f"liger-kernel {package_version('liger-kernel')}, LIGER_KERNEL_IMPL=cutedsl, "
                   f"nvidia-cutlass-dsl {package_version('nvidia-cutlass-dsl')}")


def provider_liger_stats(inputs: Inputs, grad: bool):
    """Liger's statistics path (``LigerFusedLinearScaledCrossEntropyFunction``): per-token NLL and
    entropy at a temperature (1 here), the mean taken over the selected tokens as the others do. Ours
    beside it: ``t3s-*-stats`` (``return_stats=True``) and ``t3s-token-stats`` (forward only)."""
    from liger_kernel.ops import LigerFusedLinearScaledCrossEntropyFunction as scaled_ce

    _needs_cuda(inputs)
    count = (inputs.masked_labels != IGNORE).sum().clamp(min=1)

    def loss(x, w):
        # (input, weight, target, temperature, ignore_index, m_tiles_per_cluster, return_entropy)
        nll, _entropy = scaled_ce.apply(x, w, inputs.masked_labels, 1.0, IGNORE, 1, True)
        return nll.sum() / count

    impl = os.environ.get("LIGER_KERNEL_IMPL", "default")
    return _runner(loss, inputs, grad, f"liger-kernel {package_version('liger-kernel')}, "
                   f"LigerFusedLinearScaledCrossEntropyFunction with entropy, LIGER_KERNEL_IMPL={impl}, "
                   f"cutlass {_cutlass_importable()}")


def provider_torch_lce(options: Optional[dict], name: str):
    """PyTorch's own ``torch.nn.functional.linear_cross_entropy`` (torch 2.13 and newer): ``options=None``
    (its reference path: the whole logits, then cross-entropy) or its chunked path with
    ``LinearCrossEntropyOptions(**options)``. A call that falls back to the reference path with a
    warning (an unsupported configuration) is refused rather than timed under the chunked name; the row
    records the policy the options resolve to at this shape."""
    def make(inputs: Inputs, grad: bool):
        lce = getattr(torch.nn.functional, "linear_cross_entropy", None)
        if lce is None:
            raise RuntimeError(f"needs torch >= 2.13 (torch.nn.functional.linear_cross_entropy); this is "
                               f"{torch.__version__}")
        if options is None:
            return _runner(lambda x, w: lce(x, w, inputs.masked_labels, ignore_index=IGNORE), inputs, grad,
                           f"torch {torch.__version__} linear_cross_entropy, options=None (reference path)")
        opts = torch.nn.LinearCrossEntropyOptions(**options)

        def loss(x, w):
            with warnings.catch_warnings():
                warnings.filterwarnings("error", message="linear_cross_entropy: ``options`` ignored")
                return lce(x, w, inputs.masked_labels, ignore_index=IGNORE, options=opts)

        return _runner(loss, inputs, grad, f"torch {torch.__version__} linear_cross_entropy, {name}: "
                       f"{_resolved_policy(opts, inputs)}")

    return make


def _resolved_policy(opts, inputs: Inputs) -> str:
    """What ``options`` resolve to for these inputs (PyTorch resolves "auto" per call), as PyTorch itself
    computes it; the options as given where that private resolution is not there."""
    x = inputs.hidden
    try:
        got = opts._adjust(num_batches=x.shape[0], in_features=x.shape[1], num_classes=inputs.weight.shape[0],
                           dtype=x.dtype, device=x.device)
    except Exception:  # a torch whose resolution has moved: say what was asked
        got = opts
    return (f"acc_policy={got.acc_policy}, batch_chunk_size={got.batch_chunk_size}, "
            f"acc_dtype={str(got.acc_dtype).removeprefix('torch.') if got.acc_dtype is not None else 'input'}")


def provider_cce(inputs: Inputs, grad: bool):
    from cut_cross_entropy import linear_cross_entropy

    _needs_cuda(inputs)
    return _runner(lambda x, w: linear_cross_entropy(x, w, inputs.masked_labels, ignore_index=IGNORE), inputs, grad,
                   f"cut-cross-entropy {package_version('cut-cross-entropy')}, impl cce")


def provider_quack(inputs: Inputs, grad: bool):
    """QuACK's chunked linear cross-entropy (CuTe-DSL kernels, sm_90 and newer)."""
    from quack.linear_cross_entropy import chunked_linear_cross_entropy

    _needs_cuda(inputs)
    if torch.cuda.get_device_capability(inputs.hidden.device) < (9, 0):
        raise RuntimeError("needs sm_90 or newer")
    return _runner(lambda x, w: chunked_linear_cross_entropy(x, w, inputs.masked_labels, ignore_index=IGNORE),
                   inputs, grad, f"quack-kernels {package_version('quack-kernels')}, chunked_linear_cross_entropy")


PROVIDERS: dict[str, Provider] = {
    "eager": provider_eager,
    "compile": provider_compile,
    "torch-lce": provider_torch_lce(None, "options=None"),
    "torch-lce-chunked": provider_torch_lce({}, "LinearCrossEntropyOptions()"),
    # The fastest policy measured on the project's CPU machine at the bench shape (benchmarks/RESULTS.md,
    # "PyTorch's linear_cross_entropy"): its "auto" resolves to 4-row chunks there.
    "torch-lce-chunked-256": provider_torch_lce(
        dict(acc_policy="compact", batch_chunk_size=256, chunking_method=None),
        "LinearCrossEntropyOptions(acc_policy='compact', batch_chunk_size=256)"),
    "liger": provider_liger,
    "liger-cute": provider_liger_cute,
    "liger-stats": provider_liger_stats,
    "cce": provider_cce,
    "quack": provider_quack,
    "t3s-torch": provider_t3s("torch"),
    "t3s-torch-stats": provider_t3s("torch", return_stats=True),
    "t3s-torch-pytorch-epilogue": provider_t3s_pytorch_epilogue,
    "t3s-triton-chunked": provider_t3s("triton"),
    "t3s-triton-chunked-weight-accum": provider_t3s("triton", "weight"),
    "t3s-triton-chunked-float32-logits": provider_t3s("triton", logits_dtype="float32"),
    # Least memory: a bf16 dW and chunks of about Liger-Kernel's size (512 rows at V = 152K).
    "t3s-triton-chunked-lean": provider_t3s("triton", "weight", chunk_budget_bytes=160 << 20),
    "t3s-triton-stats": provider_t3s("triton", return_stats=True),
    "t3s-token-stats": provider_token_stats,
}
