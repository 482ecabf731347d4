"""The options that shape the per-token head function, shared by every backend.

A backend sees the head as: logits ``z = x @ W.T + b``, transformed logits
``s = logit_scale * softcap(z)`` (``softcap(z) = c * tanh(z / c)``, identity without a
cap), and from ``s`` the softmax statistics and the per-token loss

    l = ce_weight * CE_eps(s, y) + z_loss * lse(s) ** 2
    CE_eps(s, y) = lse - (1 - eps) * s_y - (eps / V) * sum_j s_j

(PyTorch's label-smoothing convention). ``logit_scale`` is ``1 / temperature`` for
:func:`t3s_kernels.token_stats` and 1 for the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("auto", "triton", "torch")
STRATEGIES = ("auto", "chunked")
# Strategies that existed, and why they went (the error a caller who asks for one gets).
REMOVED_STRATEGIES = {
    "tile": "strategy='tile' was removed: on an H200 (2026-11-28, N=16384, H=4096, V=151936, bf16) its backward's "
            "per-element float32 atomics ran 1311 ms against the chunked strategy's 111 ms, at no less memory "
            "(3691 against 3838 MiB; benchmarks/RESULTS.md). Use strategy='chunked'; for the least memory, a small "
            "chunk_budget_bytes with grad_accum_dtype='weight'",
}
REDUCTIONS = ("mean", "sum", "none")
KD_LOSSES = ("forward_kl", "reverse_kl", "jsd")
SPARSE_TAILS = ("renormalize", "bucket")
# What dW and db accumulate in across the chunked strategies' token chunks: float32 (one rounding,
# at the end), or the weight's own dtype (no float32 copy of dW: half its memory, one rounding a chunk).
GRAD_ACCUM_DTYPES = ("float32", "weight")
# What the chunked strategies hold a chunk's logits in: float32 (each logit rounded once, from the
# matmul's float32 accumulator), or the inputs' dtype with dL/dz written over them (the unpatched
# model's own logits, as HF computes them, at a third of the bytes per logit). "auto" is the input
# dtype where no statistics are returned and float32 where they are (T3S's confidences keep float32).
# Where an epilogue cannot read half logits (the PyTorch and native CPU epilogues) they stay float32.
LOGITS_DTYPES = ("auto", "float32", "input")


# Memory the chunked paths may spend on one token chunk's [rows x vocab] buffers. On a GPU
# 1 GiB keeps the matmuls large (>= 1152 rows at V = 152K); on a CPU a smaller chunk is as
# fast (the matmuls are compute-bound at any size) and stays in cache longer.
DEFAULT_CHUNK_BUDGET_BYTES = {"cuda": 1 << 30, "cpu": 256 << 20}


@dataclass(frozen=True)
class HeadOptions:
    """Everything a backend needs to evaluate the head on one row of logits."""

    vocab_size: int
    softcap: float | None = None
    logit_scale: float = 1.0
    ce_weight: float = 1.0
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    # Distillation (a teacher head, dense or as a sparse top-k cache): kd_weight * KD per token,
    # on both heads' logits divided by kd_temperature; times kd_temperature^2 with kd_t2_scaling.
    kd_weight: float = 0.0
    kd_loss: str = "forward_kl"
    jsd_beta: float = 0.5
    kd_temperature: float = 1.0
    kd_t2_scaling: bool = False
    sparse_tail: str = "renormalize"

    @property
    def has_softcap(self) -> bool:
        return self.softcap is not None

    @property
    def has_smoothing(self) -> bool:
        return self.label_smoothing != 0.0

    @property
    def kd_coef(self) -> float:
        """The per-token KD term's coefficient: kd_weight, times kd_temperature^2 with kd_t2_scaling."""
        return self.kd_weight * (self.kd_temperature ** 2 if self.kd_t2_scaling else 1.0)


@dataclass(frozen=True)
class GradRequest:
    """Which gradients the caller wants; a frozen LM head skips dW and db entirely."""

    hidden: bool = True
    weight: bool = True
    bias: bool = False

    @property
    def any(self) -> bool:
        return self.hidden or self.weight or self.bias
