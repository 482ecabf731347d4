"""The fused op as a PyTorch operator: compaction, token weights, reductions and its gradient.

``torch.ops.t3s.head_loss`` is registered with ``torch.library``: eager calls run it directly, and
``torch.compile`` sees one node with a fake implementation (shapes only), so a compiled model has
no graph break inside the op and ``fullgraph=True`` works. Everything that depends on the data
(row compaction, counts, the checks of label and weight values) runs inside the operator. Its
tensors travel by name (``HeadLossInputs``, ``HeadLossOutputs``) and its static options
(``LossConfig``) as its scalar arguments (``CONFIG_SCHEMA``, built from the declarations).

Rows are sorted into three kinds before any matmul:
  * ignored (label == ignore_index): never reach the head; statistics 0.
  * scored only (weight 0): forward only, for their statistics.
  * contributing: forward, and the only rows any backward matmul sees.
So the backward cost scales with the selected fraction of tokens.

For "mean"/"sum" the upstream gradient is a scalar, so an engine that fuses the backward into its
forward pass (the chunked engine) computes dX, dW for ``g_i = w_i / divisor`` right away; the
operator returns them beside the loss and the backward only rescales them, in place and in float32
(not at all for an upstream gradient of 1). For "none", and for fp16 inputs (whose unscaled dL/dz
would underflow under a GradScaler's loss scale), the backward operator runs from the saved logsumexp.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from .backends.base import HeadGrads, RowStats, per_token_loss
from .backends.distill import TeacherRows
from .backends.select import make_engine
from .backends.vocab_parallel import VocabParallelEngine, VocabShard, for_shard
from .options import HEAD_FIELDS, OPTIONS, GradRequest, HeadOptions
from .validation import check_head_values, check_teacher_values, normalizer_value


@dataclass(frozen=True)
class LossConfig:
    """The static options of one call: the head function (``HeadOptions``) and how the operator runs it.
    They travel through the operator as its scalar arguments: ``CONFIG_SCHEMA`` and the packing are
    built from these fields and ``HeadOptions``', so a head option declared in options.py reaches every
    engine with no change here. The caller-facing ones take their declared defaults."""

    opts: HeadOptions
    ignore_index: int = OPTIONS["ignore_index"].default
    reduction: str = OPTIONS["reduction"].default
    normalizer_number: Optional[float] = None  # a Python number; a tensor normalizer is an operator input
    backend: str = OPTIONS["backend"].default
    chunk_budget_bytes: Optional[int] = OPTIONS["chunk_budget_bytes"].default
    grad_accum_dtype: str = OPTIONS["grad_accum_dtype"].default
    logits_dtype: str = "float32"  # resolved ("float32" or "input": options.resolved_logits_dtype)
    chunk_rows: Optional[int] = None  # a fixed chunk shape instead of the budget (tests of the driver)
    vocab_chunk: Optional[int] = None
    # A vocabulary-parallel head: this rank's first entry, the whole vocabulary, the process group's name.
    vocab_shard_start: Optional[int] = None
    vocab_shard_size: Optional[int] = None
    vocab_shard_group: Optional[str] = None

    def args(self) -> tuple:
        """The operator's scalar arguments, in ``CONFIG_SCHEMA`` order."""
        return tuple(getattr(self.opts, name) for name in HEAD_FIELDS) + tuple(getattr(self, n) for n in CALL_FIELDS)

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def from_args(*args) -> "LossConfig":
        k = len(HEAD_FIELDS)
        return LossConfig(opts=HeadOptions(**dict(zip(HEAD_FIELDS, args[:k]))), **dict(zip(CALL_FIELDS, args[k:])))

    @property
    def shard(self) -> Optional[VocabShard]:
        if self.vocab_shard_size is None:
            return None
        from torch.distributed.distributed_c10d import _resolve_process_group

        return VocabShard(self.vocab_shard_start, self.vocab_shard_size, _resolve_process_group(self.vocab_shard_group))

    def engine(self, device: torch.device, local_vocab: Optional[int] = None):
        """The engine of this call; for a vocabulary-parallel head, with the shards checked
        (collective: every rank calls) when ``local_vocab`` (this rank's entries) is given."""
        inner = make_engine(device, self.backend, self.chunk_budget_bytes, self.chunk_rows,
                            self.vocab_chunk, self.grad_accum_dtype, self.logits_dtype)
        if local_vocab is not None:
            return for_shard(inner, self.shard, local_vocab, device)[0]
        return inner if self.shard is None else VocabParallelEngine(inner, self.shard)

    def fuses_gradient(self, device: torch.device, dtype: torch.dtype, grads: GradRequest) -> bool:
        """Whether the forward computes the gradient (returned beside the loss) for the backward to rescale.

        Not for fp16 inputs: the forward knows no upstream scale, and fp16 dL/dz at the loss's own
        scale (1/tokens) underflows where a GradScaler's scaled one (as eager computes it) does not;
        fp16's backward recomputes the logits with the upstream gradient inside dL/dz."""
        return grads.any and self.reduction != "none" and dtype != torch.float16 \
            and self.engine(device).fuses_backward


CALL_FIELDS = tuple(f.name for f in dataclasses.fields(LossConfig) if f.name != "opts")
_SCHEMA_TYPES = {int: "int", float: "float", bool: "bool", str: "str"}


def _schema(cls, names) -> str:
    """``type name`` of each field, as torch.library's schema language spells its type (``float?`` for Optional)."""
    hints, parts = typing.get_type_hints(cls), []
    for name in names:
        inner = [a for a in typing.get_args(hints[name]) if a is not type(None)]
        parts.append(f"{_SCHEMA_TYPES[inner[0]]}? {name}" if inner else f"{_SCHEMA_TYPES[hints[name]]} {name}")
    return ", ".join(parts)


# The operator's scalar arguments: HeadOptions' fields, then the call's.
CONFIG_SCHEMA = f"{_schema(HeadOptions, HEAD_FIELDS)}, {_schema(LossConfig, CALL_FIELDS)}"


def process_group_name(group) -> str:
    """The name the operator resolves a process group by (None: the default group)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("vocab_parallel needs an initialized torch.distributed process group")
    return (group if group is not None else dist.group.WORLD).group_name


def no_autocast(device: torch.device):
    """The engines choose their own precisions; an outer autocast must not recast their matmuls."""
    return torch.autocast(device.type, enabled=False)


def scatter_stats(parts: "list[tuple[RowStats, torch.Tensor]]", n: int, device: torch.device):
    """(lse, logprob, entropy, correct, kd) over all n rows from the statistics of row subsets;
    0 / False at rows no part covers (ignored labels)."""
    f32 = dict(device=device, dtype=torch.float32)
    lse, logprob, entropy, kd = (torch.zeros(n, **f32) for _ in range(4))
    correct = torch.zeros(n, device=device, dtype=torch.bool)
    for st, idx in parts:
        lse[idx], logprob[idx], entropy[idx] = st.lse, st.label_logit - st.lse, st.entropy
        correct[idx] = st.label_logit >= st.max_logit
        if st.kd is not None:
            kd[idx] = st.kd
    return lse, logprob, entropy, correct, kd


def _select(t: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
    return t if index is None else t[index]


def _scatter_rows(values: torch.Tensor, index: Optional[torch.Tensor], n: int) -> torch.Tensor:
    """Place per-row ``values`` of the compacted rows at ``index`` in a zero [n, ...] tensor."""
    if index is None:
        return values
    out = values.new_zeros((n,) + values.shape[1:])
    out[index] = values
    return out


@dataclass
class _Rows:
    """The compaction of one call: which rows contribute, their weights, and the loss divisor."""

    valid: torch.Tensor
    contributing: torch.Tensor
    n_contrib: int
    contrib_idx: Optional[torch.Tensor]  # None: all rows contribute (no gather)
    row_w: torch.Tensor
    divisor: float


def _rows(labels, token_weights, normalizer, cfg: LossConfig) -> _Rows:
    n = labels.shape[0]
    valid = labels != cfg.ignore_index
    contributing = valid if token_weights is None else valid & (token_weights != 0)
    n_contrib = int(contributing.sum())
    contrib_idx = None if n_contrib == n else contributing.nonzero().squeeze(1)
    norm = cfg.normalizer_number if normalizer is None else normalizer_value(normalizer)
    if norm is not None:
        if norm == 0 and n_contrib:  # 0 is HF's count for a step without label tokens
            raise ValueError(f"normalizer is 0 but {n_contrib} tokens contribute to the loss")
        divisor = norm if norm != 0 else 1.0
    elif cfg.reduction == "mean":
        divisor = float(max(n_contrib, 1))
    else:
        divisor = 1.0
    row_w = torch.ones(n_contrib, device=labels.device) if token_weights is None \
        else _select(token_weights, contrib_idx).float()
    return _Rows(valid, contributing, n_contrib, contrib_idx, row_w, divisor)


def _teacher_kw(teacher: Optional[TeacherRows], index) -> dict:
    """The engine's teacher argument for the rows ``index``: the teacher's rows follow the student's
    through every compaction (it gets no gradient)."""
    return {} if teacher is None else {"teacher": teacher.rows(index)}


def _on_all_rows(head_grads: HeadGrads, weight, bias, index: Optional[torch.Tensor], n: int) -> HeadGrads:
    """An engine's gradients of the compacted rows ``index``: dW and db in the parameters' dtypes (half
    the memory of float32 between forward and backward), dX placed on all ``n`` rows."""
    hg = head_grads.cast(weight.dtype, None if bias is None else bias.dtype)
    hg.hidden = None if hg.hidden is None else _scatter_rows(hg.hidden, index, n)
    return hg


def _grad_outputs(hg: HeadGrads, want: GradRequest, x, bias) -> tuple:
    """(dx, dw, db) as the operators return them: empty where not asked."""
    return (hg.hidden if want.hidden else _empty(x), hg.weight if want.weight else _empty(x),
            hg.bias if want.bias and bias is not None else _empty(x))


def _zero_grads(x, weight, bias) -> HeadGrads:
    """The gradients of a call where no row contributes."""
    return HeadGrads(torch.zeros_like(x), torch.zeros_like(weight), None if bias is None else torch.zeros_like(bias))


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


class HeadLossInputs(NamedTuple):
    """The operator's tensor inputs, in schema order (the compaction, the gradients and the teacher
    read them by name)."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    labels: torch.Tensor
    token_weights: Optional[torch.Tensor]
    normalizer: Optional[torch.Tensor]
    teacher_hidden: Optional[torch.Tensor]
    teacher_weight: Optional[torch.Tensor]
    teacher_bias: Optional[torch.Tensor]
    teacher_topk_ids: Optional[torch.Tensor]
    teacher_topk_logprobs: Optional[torch.Tensor]

    def teacher(self) -> Optional[TeacherRows]:
        if self.teacher_hidden is None and self.teacher_topk_ids is None:
            return None
        return TeacherRows(hidden=self.teacher_hidden, weight=self.teacher_weight, bias=self.teacher_bias,
                           topk_ids=self.teacher_topk_ids, topk_logprobs=self.teacher_topk_logprobs)


class HeadLossOutputs(NamedTuple):
    """The operator's outputs: the loss, the statistics, and the gradient the forward fused (to be scaled
    by the upstream gradient) where ``fuses_gradient``, else empty tensors."""

    loss: torch.Tensor
    logprob: torch.Tensor
    entropy: torch.Tensor
    correct: torch.Tensor
    lse: torch.Tensor
    kd: torch.Tensor
    dx: torch.Tensor
    dw: torch.Tensor
    db: torch.Tensor


_OPTIONAL_INPUTS = {n for n, hint in typing.get_type_hints(HeadLossInputs).items() if typing.get_args(hint)}
_TENSORS = ", ".join(f"Tensor{'?' if n in _OPTIONAL_INPUTS else ''} {n}" for n in HeadLossInputs._fields)
_N_INPUTS = len(HeadLossInputs._fields)


def _split(args) -> "tuple[HeadLossInputs, GradRequest, LossConfig]":
    """An operator call's positional arguments by meaning: the tensors, the gradients asked for, the config."""
    return (HeadLossInputs._make(args[:_N_INPUTS]), GradRequest(*args[_N_INPUTS]),
            LossConfig.from_args(*args[_N_INPUTS + 1:]))


_LIBRARY = torch.library.Library("t3s", "DEF")
_LIBRARY.define(f"head_loss({_TENSORS}, bool[] grads, {CONFIG_SCHEMA}) -> "
                f"({', '.join(['Tensor'] * len(HeadLossOutputs._fields))})")
# (dx, dw, db) of the ``grad_loss``-weighted losses from the forward's logsumexp (empty where not asked).
_LIBRARY.define(f"head_loss_backward(Tensor grad_loss, Tensor lse, {_TENSORS}, bool[] grads, {CONFIG_SCHEMA}) -> "
                "(Tensor, Tensor, Tensor)")


def _head_loss(*args) -> HeadLossOutputs:
    t, want, cfg = _split(args)
    x, weight, bias, labels = t.x, t.weight, t.bias, t.labels
    n, device = x.shape[0], x.device
    check_head_values(labels, t.token_weights, cfg.ignore_index, cfg.opts.vocab_size)
    check_teacher_values(t.teacher_topk_ids, t.teacher_topk_logprobs, cfg.opts.vocab_size)
    teacher = t.teacher()
    engine = cfg.engine(device, local_vocab=weight.shape[0])
    fused = cfg.fuses_gradient(device, x.dtype, want)
    with no_autocast(device):
        rows = _rows(labels, t.token_weights, t.normalizer, cfg)
        stats_parts, index_parts = [], []
        head_grads: Optional[HeadGrads] = None
        if rows.n_contrib:
            st, head_grads = engine.forward(_select(x, rows.contrib_idx), weight, bias,
                                            _select(labels, rows.contrib_idx), cfg.opts,
                                            row_scale=rows.row_w / rows.divisor if fused else None, grads=want,
                                            **_teacher_kw(teacher, rows.contrib_idx))
            stats_parts.append(st)
            index_parts.append(rows.contributing.nonzero().squeeze(1) if rows.contrib_idx is None
                               else rows.contrib_idx)
        if int(rows.valid.sum()) > rows.n_contrib:
            scored_idx = (rows.valid & ~rows.contributing).nonzero().squeeze(1)
            st, _ = engine.forward(x[scored_idx], weight, bias, labels[scored_idx], cfg.opts,
                                   grads=GradRequest(False, False, False), **_teacher_kw(teacher, scored_idx))
            stats_parts.append(st)
            index_parts.append(scored_idx)
        lse, logprob, entropy, correct, kd = scatter_stats(list(zip(stats_parts, index_parts)), n, device)
        per_row = torch.zeros(n, device=device, dtype=torch.float32)
        if rows.n_contrib:
            per_row[index_parts[0]] = rows.row_w * per_token_loss(stats_parts[0], cfg.opts)
        loss = per_row if cfg.reduction == "none" else per_row.sum() / rows.divisor
    if not fused:
        return HeadLossOutputs(loss, logprob, entropy, correct, lse, kd, _empty(x), _empty(x), _empty(x))
    hg = _zero_grads(x, weight, bias) if head_grads is None \
        else _on_all_rows(head_grads, weight, bias, rows.contrib_idx, n)  # None: no contributing row
    return HeadLossOutputs(loss, logprob, entropy, correct, lse, kd, *_grad_outputs(hg, want, x, bias))


def _head_loss_fake(*args) -> HeadLossOutputs:
    t, want, cfg = _split(args)
    x, n = t.x, t.x.shape[0]
    fused = cfg.fuses_gradient(x.device, x.dtype, want)
    f32 = dict(dtype=torch.float32, device=x.device)
    loss = torch.empty((n,) if cfg.reduction == "none" else (), **f32)
    logprob, entropy, lse, kd = (torch.empty(n, **f32) for _ in range(4))
    correct = torch.empty(n, dtype=torch.bool, device=x.device)
    dx, dw, db = _grad_outputs_like(t, want) if fused else (_empty(x),) * 3
    return HeadLossOutputs(loss, logprob, entropy, correct, lse, kd, dx, dw, db)


def _grad_outputs_like(t: HeadLossInputs, want: GradRequest) -> tuple:
    """Uninitialized (dx, dw, db) of the inputs' shapes where asked, empty elsewhere (the fake kernels)."""
    return (torch.empty_like(t.x) if want.hidden else _empty(t.x),
            torch.empty_like(t.weight) if want.weight else _empty(t.x),
            torch.empty_like(t.bias) if want.bias and t.bias is not None else _empty(t.x))


def _head_loss_backward(grad_loss, lse, *args):
    t, want, cfg = _split(args)
    x, weight, bias = t.x, t.weight, t.bias
    n, device = x.shape[0], x.device
    teacher = t.teacher()
    with no_autocast(device):
        rows = _rows(t.labels, t.token_weights, t.normalizer, cfg)
        if rows.n_contrib == 0:
            hg = _zero_grads(x, weight, bias)
        else:
            if cfg.reduction == "none":
                row_scale = _select(grad_loss, rows.contrib_idx).float() * rows.row_w
            else:
                row_scale = grad_loss.float() * rows.row_w / rows.divisor
            hg = _on_all_rows(cfg.engine(device).backward(
                _select(x, rows.contrib_idx), weight, bias, _select(t.labels, rows.contrib_idx),
                _select(lse, rows.contrib_idx), row_scale, cfg.opts, want, **_teacher_kw(teacher, rows.contrib_idx)),
                weight, bias, rows.contrib_idx, n)
    return _grad_outputs(hg, want, x, bias)


def _head_loss_backward_fake(grad_loss, lse, *args):
    t, want, _ = _split(args)
    return _grad_outputs_like(t, want)


def _setup_context(ctx, inputs, output):
    t, want, cfg = _split(inputs)
    out = HeadLossOutputs._make(output)
    ctx.grads, ctx.config, ctx.has_bias = tuple(inputs[_N_INPUTS]), tuple(inputs[_N_INPUTS + 1:]), t.bias is not None
    ctx.fused = cfg.fuses_gradient(t.x.device, t.x.dtype, want)
    ctx.rescaled = ctx.handed_out = False
    # Outputs without a gradient (the statistics, and the fused dX / dW / db, [V x H]) reach the backward
    # as None: materialized, they would be zeros of their sizes, allocated and filled at every backward.
    ctx.set_materialize_grads(False)
    if ctx.fused:
        ctx.save_for_backward(out.dx, out.dw, out.db)  # the gradient the forward computed
    else:
        ctx.save_for_backward(out.lse, *t)  # the logsumexp, and the inputs to recompute from


def _input_grads(dx=None, dw=None, db=None) -> tuple:
    """The backward's result: a gradient for x, weight and bias, None for every other input."""
    grads = dict.fromkeys(HeadLossInputs._fields)
    grads.update(x=dx, weight=dw, bias=db)
    return tuple(grads.values()) + (None,) * (1 + len(HEAD_FIELDS) + len(CALL_FIELDS))  # grads, the config


def _backward(ctx, grad_loss, *_unused_stat_grads):
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # create_graph=True: a gradient of this gradient would be silently wrong (it is not one).
        raise RuntimeError("fused_linear_t3s_loss: its gradient is not differentiable (create_graph=True / a "
                           "double backward); compute second-order terms with the eager reference instead")
    want = GradRequest(*ctx.grads)
    if grad_loss is None:  # only the (detached) statistics or the fused gradient outputs were used
        return _input_grads()
    if ctx.fused:
        if ctx.rescaled:
            raise RuntimeError("fused_linear_t3s_loss: a second backward through one forward, after a backward with an "
                               "upstream gradient other than 1: the gradient the forward computed was rescaled in "
                               "place (no second copy of dW); run the forward again for each backward")
        fused = HeadGrads(*ctx.saved_tensors)
        if torch.compiler.is_compiling() or ctx.handed_out:
            # Out of place: compiled, or (retain_graph) the saved gradient already went to the caller.
            scaled = fused.scaled(grad_loss)
        else:
            # Eager, first backward: an upstream gradient of exactly 1 (loss.backward() on this loss
            # itself) needs no pass over dW; any other is applied in place. Reading it costs one sync.
            scale = float(grad_loss)
            scaled = fused if scale == 1.0 else fused.scale_(scale)
            ctx.rescaled, ctx.handed_out = scale != 1.0, True
        dx, dw, db = scaled.hidden, scaled.weight, scaled.bias
    else:
        dx, dw, db = torch.ops.t3s.head_loss_backward(grad_loss, *ctx.saved_tensors, ctx.grads, *ctx.config)
    return _input_grads(dx if want.hidden else None, dw if want.weight else None,
                        db if want.bias and ctx.has_bias else None)


_LIBRARY.impl("head_loss", _head_loss, "CompositeExplicitAutograd")
_LIBRARY.impl("head_loss_backward", _head_loss_backward, "CompositeExplicitAutograd")
torch.library.register_fake("t3s::head_loss", _head_loss_fake)
torch.library.register_fake("t3s::head_loss_backward", _head_loss_backward_fake)
torch.library.register_autograd("t3s::head_loss", _backward, setup_context=_setup_context)


def fused_head_loss(x, weight, bias, labels, token_weights, cfg: LossConfig, teacher: Optional[TeacherRows] = None,
                    normalizer: Optional[torch.Tensor] = None):
    """(loss, logprob, entropy, correct, lse, kd) through the operator: loss differentiable with
    respect to x, weight and bias where they require it (and grad mode is on), statistics detached."""
    on = torch.is_grad_enabled()
    grads = [on and x.requires_grad, on and weight.requires_grad, on and bias is not None and bias.requires_grad]
    t = teacher or TeacherRows()
    inputs = HeadLossInputs(x, weight, bias, labels, token_weights, normalizer, t.hidden, t.weight, t.bias,
                            t.topk_ids, t.topk_logprobs)
    out = HeadLossOutputs._make(torch.ops.t3s.head_loss(*inputs, grads, *cfg.args()))
    return (out.loss,) + tuple(s.detach() for s in (out.logprob, out.entropy, out.correct, out.lse, out.kd))
