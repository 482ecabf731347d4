"""The public API: ``fused_linear_t3s_loss``, ``token_stats`` and ``T3SLoss``.

Their scalar options are declared once, in options.py: each function takes them as keywords,
checks them against the declarations, and shows them in its signature and docstring."""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .backends.distill import TeacherRows
from .backends.select import make_engine, resolve_backend, stats_engine, triton_available  # noqa: F401 - public
from .backends.vocab_parallel import for_shard, local_head, shard_entries
from .function import CALL_FIELDS, LossConfig, fused_head_loss, no_autocast, process_group_name, scatter_stats
from .options import (
    HEAD_FIELDS,
    OPTIONS,
    GradRequest,
    HeadOptions,
    check_options,
    options_doc,
    options_of,
    pick,
    resolve_options,
    resolved_logits_dtype,
)
from .validation import check_head_inputs, check_head_values, check_normalizer, check_teacher, is_zero3_partitioned


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


# The per-token teacher inputs: aligned with ``hidden``'s positions, as the labels are.
TEACHER_ROW_INPUTS = ("teacher_hidden", "teacher_topk_ids", "teacher_topk_logprobs")


def _with_declared_options(api: str):
    """Give ``fn(..., **options)`` the declared options of ``api`` (options.py) as keyword parameters of its
    signature, with their defaults and types, and as the ``Options:`` part of its docstring."""

    def decorate(fn):
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        params += [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default, annotation=o.type)
                   for o in options_of(api).values()]
        fn.__signature__ = sig.replace(parameters=params)
        fn.__doc__ = fn.__doc__.replace("    {options}\n", options_doc(api, indent=" " * 8) + "\n")
        return fn

    return decorate


def _call_with(fn, params: dict, options: dict):
    """``fn`` called again with the arguments it was given (for the ZeRO-3 gathering)."""
    return fn(**{k: v for k, v in params.items() if k != "options"}, **options)


@_with_declared_options("loss")
def fused_linear_t3s_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: Optional[torch.Tensor] = None, token_weights: Optional[torch.Tensor] = None,
                          teacher_hidden: Optional[torch.Tensor] = None, teacher_weight: Optional[torch.Tensor] = None,
                          teacher_bias: Optional[torch.Tensor] = None,
                          teacher_topk_ids: Optional[torch.Tensor] = None,
                          teacher_topk_logprobs: Optional[torch.Tensor] = None,
                          normalizer: Union[None, float, int, torch.Tensor] = None, vocab_parallel=None,
                          **options) -> T3SLossOutput:
    """LM head + T3S loss in one pass, never holding the [tokens x vocab] logits.

    Per token ``l_i = ce_weight * CE_i (label smoothing) + z_loss * lse_i^2 (+ kd_weight * KD_i)`` on
    the logits ``logit_scale * softcap * tanh((hidden @ weight.T + bias) / softcap)``. A token
    contributes when its label is not ``ignore_index`` and its weight is not 0; "sum" is
    ``sum_i w_i l_i``, "mean" divides it by the number of contributing tokens, ``normalizer`` (e.g.
    num_items_in_batch) replaces that divisor; "none" returns ``w_i l_i`` per token (0 where not
    contributing).

    Args:
        hidden: (..., H) float32 / bfloat16 / float16.
        weight: (V, H), same dtype. labels: (...) int64/int32 in [0, V) or ``ignore_index``.
        bias: (V,) or None.
        token_weights: (...) float >= 0, or None for all ones.
        normalizer: a number >= 0 or a 0-d tensor: the divisor of the summed loss.
        vocab_parallel: a head split over the vocabulary across ranks (tensor parallelism):
            ``VocabShard(start, vocab_size, group)`` with ``weight`` and ``bias`` this rank's entries, or
            ``weight.device_mesh`` for a ``Shard(0)`` DTensor ``weight``; labels index the whole
            vocabulary, every rank passes the same tokens. Row states merge exactly across ranks; dW
            stays local, dX is all-reduced (backends/vocab_parallel.py). A dense teacher's head is split
            the same way (the same entries, or a DTensor sharded alike) or whole (sliced here); a sparse
            teacher's top-k ids index the whole vocabulary.

    Options (options.py declares each; name (default): meaning):
    {options}

    Distillation (``kd_weight * KD`` added per token; the teacher gets no gradient): a dense teacher
    head (``teacher_hidden`` (..., Ht), ``teacher_weight`` (V, Ht), ``teacher_bias``) or a sparse
    top-k cache (``teacher_topk_ids``, ``teacher_topk_logprobs`` (..., K)). See backends/distill.py
    and ops/distill_epilogue.py; ``out.kd`` is the per-token KD.

    DeepSpeed ZeRO-3: inside the engine's forward the parameters are whole; outside it, partitioned
    ones that need no gradient (a teacher's head, statistics) are gathered for the call (every rank
    must call), and one that needs a gradient is refused (``zero3_gathered``).
    """
    if any(is_zero3_partitioned(t) for t in (weight, bias, teacher_weight, teacher_bias)):
        params = dict(locals())
        with zero3_gathered(dict(weight=weight, bias=bias), dict(teacher_weight=teacher_weight,
                                                                 teacher_bias=teacher_bias)):
            return _call_with(fused_linear_t3s_loss, params, options)
    o = resolve_options(options, "loss", "fused_linear_t3s_loss")
    if vocab_parallel is not None:
        weight, bias, vocab_parallel = local_head(weight, bias, vocab_parallel)
        teacher_weight = shard_entries(teacher_weight, vocab_parallel, weight.shape[0], "teacher_weight")
        teacher_bias = shard_entries(teacher_bias, vocab_parallel, weight.shape[0], "teacher_bias")
    check_normalizer(normalizer, o["reduction"])
    hidden, weight, bias = _autocast(hidden, weight, bias)
    if teacher_hidden is not None and teacher_weight is not None:  # the teacher's head is cast as the student's
        teacher_hidden, teacher_weight, teacher_bias = _autocast(teacher_hidden, teacher_weight, teacher_bias)
    check_head_inputs(hidden, weight, labels, bias, token_weights)
    has_teacher = check_teacher(hidden, weight, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                                teacher_bias=teacher_bias, teacher_topk_ids=teacher_topk_ids,
                                teacher_topk_logprobs=teacher_topk_logprobs, kd_weight=o["kd_weight"])
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
    shard = {} if vocab_parallel is None else dict(
        vocab_shard_start=vocab_parallel.start, vocab_shard_size=vocab_parallel.vocab_size,
        vocab_shard_group=process_group_name(vocab_parallel.group))
    cfg = LossConfig(opts=HeadOptions(vocab_size=vocab, **pick(HEAD_FIELDS, o)),
                     **pick(CALL_FIELDS, {**o, "logits_dtype": resolved_logits_dtype(o["logits_dtype"],
                                                                                    o["return_stats"])}),
                     normalizer_number=None if normalizer is None or isinstance(normalizer, torch.Tensor)
                     else float(normalizer), **shard)
    loss, logprob, entropy, correct, lse, kd = fused_head_loss(
        x, weight, bias, y, w, cfg, teacher, normalizer if isinstance(normalizer, torch.Tensor) else None)
    if o["reduction"] == "none":
        loss = loss.view(lead)
    if not o["return_stats"]:
        return T3SLossOutput(loss=loss)
    return T3SLossOutput(loss=loss, logprob=logprob.view(lead), entropy=entropy.view(lead),
                         correct=correct.view(lead), lse=lse.view(lead), kd=kd.view(lead) if has_teacher else None)


@_with_declared_options("stats")
@torch.no_grad()
def token_stats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                bias: Optional[torch.Tensor] = None, vocab_parallel=None, **options) -> TokenStats:
    """Forward only: per-token statistics of
    ``softmax(logit_scale * softcap(hidden @ weight.T + bias) / temperature)`` (``logit_scale`` is the
    model's own logit multiplier, as in :func:`fused_linear_t3s_loss`).

    This is what scoring a dataset needs (T3S's confidence is ``logprob``). On the Triton
    backend it is one tile kernel at the cost of one matmul, storing O(tokens) floats.
    A DeepSpeed ZeRO-3 partitioned head is gathered for the call (every rank must call).

    Options (options.py declares each; name (default): meaning):
    {options}
    """
    if any(is_zero3_partitioned(t) for t in (weight, bias)):
        params = dict(locals())
        with zero3_gathered(dict(weight=weight, bias=bias)):
            return _call_with(token_stats, params, options)
    o = resolve_options(options, "stats", "token_stats")
    if vocab_parallel is not None:
        weight, bias, vocab_parallel = local_head(weight, bias, vocab_parallel)
    hidden, weight, bias = _autocast(hidden, weight, bias)
    check_head_inputs(hidden, weight, labels, bias, None)
    lead, ignore_index = labels.shape, o["ignore_index"]
    x = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).long().contiguous()  # kernels index labels densely
    check_head_values(y, None, ignore_index, weight.shape[0] if vocab_parallel is None else vocab_parallel.vocab_size)
    device = x.device
    engine, vocab = for_shard(stats_engine(device, o["backend"], o["chunk_budget_bytes"]), vocab_parallel,
                              weight.shape[0], device)
    # The temperature divides every statistic's logits: the transform's multiplier, divided by it.
    opts = HeadOptions(vocab_size=vocab, softcap=o["softcap"], logit_scale=o["logit_scale"] / o["temperature"])
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


# What T3SLoss takes at construction: every keyword argument of the op but the per-batch token weights.
_MODULE_ARGUMENTS = tuple(name for name, p in inspect.signature(fused_linear_t3s_loss).parameters.items()
                          if p.kind is p.KEYWORD_ONLY and p.name != "token_weights" and p.name not in OPTIONS)


class T3SLoss(torch.nn.Module):
    """``fused_linear_t3s_loss`` as a module: options at construction (checked there against their
    declarations; the rest take the declared defaults at each call), tensors at call time."""

    def __init__(self, **options):
        super().__init__()
        check_options(options, "loss", "T3SLoss", also=_MODULE_ARGUMENTS)
        self.options = options

    def forward(self, hidden, weight, labels, token_weights=None, **overrides) -> T3SLossOutput:
        return fused_linear_t3s_loss(hidden, weight, labels, token_weights=token_weights,
                                     **{**self.options, **overrides})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
