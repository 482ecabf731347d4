"""The public API: ``fused_linear_t3s_loss``, ``token_stats`` and ``T3SLoss``."""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .backends.distill import TeacherRows
from .backends.select import make_engine, resolve_backend, stats_engine, triton_available  # noqa: F401 - public
from .backends.vocab_parallel import for_shard, local_head, rows_of
from .function import LossConfig, fused_head_loss, no_autocast, process_group_name, scatter_stats
from .options import GradRequest, HeadOptions
from .validation import (
    check_head_inputs,
    check_head_values,
    check_ignore_index,
    check_kd_options,
    check_options,
    check_teacher,
    is_zero3_partitioned,
)


@dataclass
class T3SLossOutput:
    """``loss`` (float32 scalar, or per token for reduction="none") and, with ``return_stats``,
    the per-token statistics (float32 / bool, detached, in the labels' shape)."""

    loss: torch.Tensor
    logprob: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    correct: Optional[torch.Tensor] = None
    lse: Optional[torch.Tensor] = None
    kd: Optional[torch.Tensor] = None  # per-token divergence from the teacher, when one is given


@dataclass
class TokenStats:
    """Per-token statistics: log-probability of the label (the T3S confidence), entropy of the
    predictive distribution, whether the label's logit is the maximum (ties count), logsumexp.
    Zero / False at ignored positions."""

    logprob: torch.Tensor
    entropy: torch.Tensor
    correct: torch.Tensor
    lse: torch.Tensor


@contextlib.contextmanager
def zero3_gathered(student: dict, teacher: Optional[dict] = None):
    """DeepSpeed ZeRO-3 parameters partitioned away (outside the engine's forward: an own loop, a
    teacher's head) gathered for the call with DeepSpeed's own context, on every rank: each rank
    must call the op the same number of times. A partitioned parameter that needs a gradient is
    refused: DeepSpeed gathers and reduce-scatters a parameter's gradient only around its module's
    forward and backward, which a call outside them does not run."""
    parts = [(name, t) for name, t in {**student, **(teacher or {})}.items() if is_zero3_partitioned(t)]
    if not parts:
        yield
        return
    for name, t in parts:
        if name in student and t.requires_grad and torch.is_grad_enabled():  # a teacher gets no gradient
            raise ValueError(f"{name} is a DeepSpeed ZeRO-3 partitioned parameter (ds_id {t.ds_id}) that needs a "
                             "gradient, outside the engine's forward, where DeepSpeed cannot reduce its gradient: "
                             "compute the loss inside "
                             "the engine's forward (a model patched by apply_t3s does), or pass it detached or under "
                             "torch.no_grad() for statistics")
    import deepspeed

    with deepspeed.zero.GatheredParameters([t for _, t in parts], modifier_rank=None):
        yield


def _autocast(hidden, weight, bias):
    """Under torch.autocast, run the head in the autocast dtype, as F.linear would."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return hidden, weight, bias


def fused_linear_t3s_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: Optional[torch.Tensor] = None, token_weights: Optional[torch.Tensor] = None,
                          teacher_hidden: Optional[torch.Tensor] = None, teacher_weight: Optional[torch.Tensor] = None,
                          teacher_bias: Optional[torch.Tensor] = None,
                          teacher_topk_ids: Optional[torch.Tensor] = None,
                          teacher_topk_logprobs: Optional[torch.Tensor] = None,
                          ce_weight: float = 1.0, kd_weight: float = 0.0, kd_loss: str = "forward_kl",
                          jsd_beta: float = 0.5, kd_temperature: float = 1.0, kd_t2_scaling: bool = False,
                          sparse_tail: str = "renormalize",
                          ignore_index: int = -100, label_smoothing: float = 0.0,
                          z_loss: float = 0.0, softcap: Optional[float] = None, logit_scale: float = 1.0,
                          reduction: str = "mean",
                          normalizer: Union[None, float, int, torch.Tensor] = None, return_stats: bool = False,
                          backend: str = "auto", strategy: str = "auto",
                          chunk_budget_bytes: Optional[int] = None, grad_accum_dtype: str = "float32",
                          logits_dtype: str = "auto", vocab_parallel=None) -> T3SLossOutput:
    """LM head + T3S loss in one pass, never holding the [tokens x vocab] logits.

    Per token ``l_i = ce_weight * CE_i (label smoothing) + z_loss * lse_i^2`` on the logits
    ``logit_scale * softcap * tanh((hidden @ weight.T + bias) / softcap)`` (a model's own logit
    multiplier, e.g. Cohere's ``logit_scale`` or 1 / Granite's ``logits_scaling``; the KD term's
    ``kd_temperature`` divides these). A token contributes when its
    label is not ``ignore_index`` and its weight is not 0; "sum" is ``sum_i w_i l_i``, "mean"
    divides it by the number of contributing tokens, ``normalizer`` (e.g. num_items_in_batch)
    replaces that divisor; "none" returns ``w_i l_i`` per token (0 where not contributing).

    Args:
        hidden: (..., H) float32 / bfloat16 / float16.
        weight: (V, H), same dtype. labels: (...) int64/int32 in [0, V) or ``ignore_index``.
        token_weights: (...) float >= 0, or None for all ones.
        backend: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" or "torch".
        strategy: "auto" or "chunked" (token chunks, cuBLAS matmuls, one fused epilogue per chunk:
            the one strategy; "tile" was removed, see options.REMOVED_STRATEGIES). For the least
            memory, a small ``chunk_budget_bytes`` with ``grad_accum_dtype="weight"``.
        chunk_budget_bytes: memory one chunk's [rows x vocab] buffers may use (default 1 GiB on GPU, 256 MiB on CPU).
        grad_accum_dtype: what dW and db accumulate in across token chunks: "float32" (default:
            rounded to the weight's dtype once, at the end) or "weight" (the weight's dtype: no
            float32 copy of dW, half its memory, one rounding per chunk, as Liger-Kernel and Cut
            Cross-Entropy do).
        logits_dtype: what the chunked Triton strategy holds a chunk's logits in: "float32" (each
            logit rounded once), "input" (the inputs' dtype, as the unpatched model computes them, with
            dL/dz written over them: a third of the memory per logit, so larger chunks) or "auto"
            (default: "input" unless ``return_stats``, whose statistics keep float32 logits). The
            PyTorch backend keeps float32 logits.
        vocab_parallel: a head split over the vocabulary across ranks (tensor parallelism):
            ``VocabShard(start, vocab_size, group)`` with ``weight`` and ``bias`` this rank's rows, or
            ``weight.device_mesh`` for a ``Shard(0)`` DTensor ``weight``; labels index the whole
            vocabulary, every rank passes the same tokens. Row states merge exactly
            across ranks; dW stays local, dX is all-reduced (backends/vocab_parallel.py). A dense
            teacher's head is split the same way (the same rows, or a DTensor sharded alike) or whole
            (sliced here); a sparse teacher's top-k ids index the whole vocabulary.

    Distillation (``kd_weight * KD`` added per token; the teacher gets no gradient): a dense teacher
    head (``teacher_hidden`` (..., Ht), ``teacher_weight`` (V, Ht), ``teacher_bias``) or a sparse
    top-k cache (``teacher_topk_ids``, ``teacher_topk_logprobs`` (..., K), with ``sparse_tail``
    "renormalize" or "bucket"); ``kd_loss`` "forward_kl" (KL(teacher || student)), "reverse_kl" or
    "jsd" (mixture weight ``jsd_beta``; 0 and 1 give the two KLs); ``kd_temperature`` divides both
    heads' logits in the KD term, ``kd_t2_scaling`` multiplies it by kd_temperature^2. See
    backends/distill.py and ops/distill_epilogue.py; ``out.kd`` is the per-token KD.

    DeepSpeed ZeRO-3: inside the engine's forward the parameters are whole; outside it, partitioned
    ones that need no gradient (a teacher's head, statistics) are gathered for the call (every rank
    must call), and one that needs a gradient is refused (``zero3_gathered``).
    """
    if any(is_zero3_partitioned(t) for t in (weight, bias, teacher_weight, teacher_bias)):
        call = dict(locals())
        with zero3_gathered(dict(weight=weight, bias=bias), dict(teacher_weight=teacher_weight,
                                                                 teacher_bias=teacher_bias)):
            return fused_linear_t3s_loss(**call)
    if vocab_parallel is not None:
        weight, bias, vocab_parallel = local_head(weight, bias, vocab_parallel)
        teacher_weight = rows_of(teacher_weight, vocab_parallel, weight.shape[0], "teacher_weight")
        teacher_bias = rows_of(teacher_bias, vocab_parallel, weight.shape[0], "teacher_bias")
    check_options(backend=backend, strategy=strategy, softcap=softcap, label_smoothing=label_smoothing,
                  z_loss=z_loss, ce_weight=ce_weight, temperature=1.0, reduction=reduction,
                  normalizer=normalizer, chunk_budget_bytes=chunk_budget_bytes, logit_scale=logit_scale,
                  grad_accum_dtype=grad_accum_dtype, logits_dtype=logits_dtype)
    hidden, weight, bias = _autocast(hidden, weight, bias)
    if teacher_hidden is not None and teacher_weight is not None:  # the teacher's head is cast as the student's
        teacher_hidden, teacher_weight, teacher_bias = _autocast(teacher_hidden, teacher_weight, teacher_bias)
    check_head_inputs(hidden, weight, labels, bias, token_weights, ignore_index)
    has_teacher = check_teacher(hidden, weight, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                                teacher_bias=teacher_bias, teacher_topk_ids=teacher_topk_ids,
                                teacher_topk_logprobs=teacher_topk_logprobs, kd_weight=kd_weight, kd_loss=kd_loss,
                                jsd_beta=jsd_beta, kd_temperature=kd_temperature, sparse_tail=sparse_tail)
    if token_weights is not None and token_weights.requires_grad and torch.is_grad_enabled():
        raise ValueError("token_weights require grad, but the fused op gives them no gradient; pass "
                         "token_weights.detach() (or compute weights that need a gradient outside the op)")
    lead = labels.shape
    x = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).long().contiguous()  # kernels index labels densely
    w = None if token_weights is None else token_weights.reshape(-1)
    teacher = None
    if has_teacher:
        flat = (lambda t: None if t is None else t.reshape(-1, t.shape[-1]).detach())
        teacher = TeacherRows(hidden=flat(teacher_hidden), weight=None if teacher_weight is None else
                              teacher_weight.detach(), bias=None if teacher_bias is None else teacher_bias.detach(),
                              topk_ids=None if teacher_topk_ids is None else flat(teacher_topk_ids).long(),
                              topk_logprobs=flat(teacher_topk_logprobs))
    vocab = weight.shape[0] if vocab_parallel is None else vocab_parallel.vocab_size
    cfg = LossConfig(
        opts=HeadOptions(vocab_size=vocab, softcap=softcap, logit_scale=float(logit_scale),
                         ce_weight=float(ce_weight),
                         label_smoothing=float(label_smoothing), z_loss=float(z_loss), kd_weight=float(kd_weight),
                         kd_loss=kd_loss, jsd_beta=float(jsd_beta), kd_temperature=float(kd_temperature),
                         kd_t2_scaling=bool(kd_t2_scaling), sparse_tail=sparse_tail),
        ignore_index=ignore_index, reduction=reduction,
        normalizer=None if normalizer is None or isinstance(normalizer, torch.Tensor) else float(normalizer),
        backend=backend, chunk_budget_bytes=chunk_budget_bytes, grad_accum_dtype=grad_accum_dtype,
        logits_dtype=("float32" if return_stats else "input") if logits_dtype == "auto" else logits_dtype,
        vocab_parallel=None if vocab_parallel is None else (vocab_parallel.start, vocab_parallel.vocab_size,
                                                            process_group_name(vocab_parallel.group)))
    loss, logprob, entropy, correct, lse, kd = fused_head_loss(
        x, weight, bias, y, w, cfg, teacher, normalizer if isinstance(normalizer, torch.Tensor) else None)
    if reduction == "none":
        loss = loss.view(lead)
    if not return_stats:
        return T3SLossOutput(loss=loss)
    return T3SLossOutput(loss=loss, logprob=logprob.view(lead), entropy=entropy.view(lead),
                         correct=correct.view(lead), lse=lse.view(lead), kd=kd.view(lead) if has_teacher else None)


@torch.no_grad()
def token_stats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                bias: Optional[torch.Tensor] = None, softcap: Optional[float] = None, logit_scale: float = 1.0,
                temperature: float = 1.0, ignore_index: int = -100, backend: str = "auto",
                chunk_budget_bytes: Optional[int] = None, vocab_parallel=None) -> TokenStats:
    """Forward only: per-token statistics of
    ``softmax(logit_scale * softcap(hidden @ weight.T + bias) / temperature)`` (``logit_scale`` is the
    model's own logit multiplier, as in :func:`fused_linear_t3s_loss`).

    This is what scoring a dataset needs (T3S's confidence is ``logprob``). On the Triton
    backend it is one tile kernel at the cost of one matmul, storing O(tokens) floats.
    A DeepSpeed ZeRO-3 partitioned head is gathered for the call (every rank must call).
    """
    if any(is_zero3_partitioned(t) for t in (weight, bias)):
        call = dict(locals())
        with zero3_gathered(dict(weight=weight, bias=bias)):
            return token_stats(**call)
    if vocab_parallel is not None:
        weight, bias, vocab_parallel = local_head(weight, bias, vocab_parallel)
    check_options(backend=backend, strategy="auto", softcap=softcap, label_smoothing=0.0, z_loss=0.0,
                  ce_weight=1.0, temperature=temperature, chunk_budget_bytes=chunk_budget_bytes,
                  logit_scale=logit_scale)
    hidden, weight, bias = _autocast(hidden, weight, bias)
    check_head_inputs(hidden, weight, labels, bias, None, ignore_index)
    lead = labels.shape
    x = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).long().contiguous()  # kernels index labels densely
    check_head_values(y, None, ignore_index, weight.shape[0] if vocab_parallel is None else vocab_parallel.vocab_size)
    device = x.device
    engine, vocab = for_shard(stats_engine(device, backend, chunk_budget_bytes), vocab_parallel, weight.shape[0],
                              device)
    opts = HeadOptions(vocab_size=vocab, softcap=softcap, logit_scale=float(logit_scale) / float(temperature))
    n = y.shape[0]
    idx = (y != ignore_index).nonzero().squeeze(1)
    parts = []
    if idx.numel():
        all_valid = idx.numel() == n
        with no_autocast(device):
            st, _ = engine.forward(x if all_valid else x[idx], weight, bias, y if all_valid else y[idx], opts,
                                   grads=GradRequest(False, False, False))
        parts.append((st, idx))
    lse, logprob, entropy, correct, _ = scatter_stats(parts, n, device)
    return TokenStats(logprob=logprob.view(lead), entropy=entropy.view(lead), correct=correct.view(lead),
                      lse=lse.view(lead))


class T3SLoss(torch.nn.Module):
    """``fused_linear_t3s_loss`` as a module: options at construction, tensors at call time."""

    def __init__(self, **options):
        super().__init__()
        allowed = {name for name, p in inspect.signature(fused_linear_t3s_loss).parameters.items()
                   if p.kind is p.KEYWORD_ONLY and name != "token_weights"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise TypeError(f"T3SLoss got unknown option(s) {unknown}; expected some of {sorted(allowed)}")
        probe = dict(options)
        check_options(backend=probe.get("backend", "auto"), strategy=probe.get("strategy", "auto"),
                      softcap=probe.get("softcap"), label_smoothing=probe.get("label_smoothing", 0.0),
                      z_loss=probe.get("z_loss", 0.0), ce_weight=probe.get("ce_weight", 1.0), temperature=1.0,
                      reduction=probe.get("reduction", "mean"), normalizer=probe.get("normalizer"),
                      chunk_budget_bytes=probe.get("chunk_budget_bytes"), logit_scale=probe.get("logit_scale", 1.0),
                      grad_accum_dtype=probe.get("grad_accum_dtype", "float32"),
                      logits_dtype=probe.get("logits_dtype", "auto"))
        check_kd_options(kd_weight=probe.get("kd_weight", 0.0), kd_loss=probe.get("kd_loss", "forward_kl"),
                         jsd_beta=probe.get("jsd_beta", 0.5), kd_temperature=probe.get("kd_temperature", 1.0),
                         sparse_tail=probe.get("sparse_tail", "renormalize"))
        check_ignore_index(probe.get("ignore_index", -100))
        for flag in ("kd_t2_scaling", "return_stats"):
            if not isinstance(probe.get(flag, False), bool):
                raise TypeError(f"{flag} must be a bool; got {probe[flag]!r}")
        self.options = options

    def forward(self, hidden, weight, labels, token_weights=None, **overrides) -> T3SLossOutput:
        return fused_linear_t3s_loss(hidden, weight, labels, token_weights=token_weights,
                                     **{**self.options, **overrides})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
