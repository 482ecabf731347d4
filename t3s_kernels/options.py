"""The op's options, declared once: each one's name, type, default, documentation and check.

Three dataclasses declare every scalar option of ``fused_linear_t3s_loss``, ``token_stats``,
``T3SLoss`` and ``apply_t3s``:

- ``LogitTransform``: what turns the head's output ``z = x @ W.T + b`` into the logits
  ``s = logit_scale * softcap * tanh(z / softcap)`` (identity without a cap). A model's own head
  math is one (``patching.head_math``), and so is every backend's view of the head.
- ``HeadOptions`` (a ``LogitTransform``): everything a backend needs to evaluate the head and its
  loss on one row of logits,

      l = ce_weight * CE_eps(s, y) + z_loss * lse(s) ** 2 (+ kd_weight * KD)
      CE_eps(s, y) = lse - (1 - eps) * s_y - (eps / V) * sum_j s_j

  (PyTorch's label-smoothing convention).
- ``CallOptions``: how one call runs beside the head function: which label is ignored, how the
  per-token losses reduce, which backend runs, its memory plan, what the call returns.

A field's ``metadata`` holds its documentation, its check and the public functions that take it
(``api``: "loss" for ``fused_linear_t3s_loss`` / ``T3SLoss``, "stats" for ``token_stats``). From
these declarations come the operator's schema and argument packing (function.py), the public
signatures and their docs, the validation of every value and ``T3SLoss``'s defaults (api.py), and
the options the patch sets from the model (patching/). CONTRIBUTING.md walks through adding one.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .validation import check_choice, check_flag, check_number, check_positive_int, check_whole_number

BACKENDS = ("auto", "triton", "torch")
REDUCTIONS = ("mean", "sum", "none")
KD_LOSSES = ("forward_kl", "reverse_kl", "jsd")
SPARSE_TAILS = ("renormalize", "bucket")
GRAD_ACCUM_DTYPES = ("float32", "weight")
LOGITS_DTYPES = ("auto", "float32", "input")

# Memory the chunked engine may spend on one token chunk's [rows x vocab] buffers. On a GPU 1 GiB
# keeps the matmuls large (>= 1152 rows at V = 152K); on a CPU a smaller chunk is as fast (the
# matmuls are compute-bound at any size) and stays in cache longer: 96 MiB, 256 rows at V = 65536,
# holds the peak below PyTorch's own chunked linear_cross_entropy at about 2% of the time of 256 MiB
# (benchmarks/RESULTS.md, "PyTorch's linear_cross_entropy").
DEFAULT_CHUNK_BUDGET_BYTES = {"cuda": 1 << 30, "cpu": 96 << 20}

# Options that existed, and what a caller who still passes one is told.
REMOVED_OPTIONS = {
    "strategy": "strategy was removed: the chunked engine (token chunks, cuBLAS matmuls, one fused epilogue per "
                "chunk) is the only way the loss walks the logits, so there is nothing to choose. Drop the argument; "
                "for the least memory pass a small chunk_budget_bytes with grad_accum_dtype='weight'. (The tile "
                "strategy went first, by measurement: benchmarks/RESULTS.md, 'Qwen3-8B's head')",
}


def _option(default=dataclasses.MISSING, *, doc: str, check: Callable[[str, Any], None], api=("loss",)):
    """A declared option: its default, one line of documentation, its check, the functions that take it."""
    return field(default=default, metadata=dict(doc=doc, check=check, api=frozenset(api)))


def _choice(choices):
    return lambda name, value: check_choice(name, value, choices)


def _number(**bounds):
    return lambda name, value: check_number(name, value, **bounds)


@dataclass(frozen=True, kw_only=True)
class LogitTransform:
    """``s = logit_scale * softcap * tanh(z / softcap)``: a soft cap (None: none), then a multiplier."""

    softcap: Optional[float] = _option(
        None, doc="soft cap c of the logits, c * tanh(z / c) (Gemma's final_logit_softcapping); None: no cap",
        check=_number(low=0, low_open=True, allow_none=True), api=("loss", "stats"))
    logit_scale: float = _option(
        1.0, doc="a model's own logit multiplier, applied after the cap (Cohere's logit_scale, 1 / Granite's "
                 "logits_scaling); the KD term's kd_temperature divides the result",
        check=_number(low=0, low_open=True), api=("loss", "stats"))

    @property
    def has_softcap(self) -> bool:
        return self.softcap is not None

    def apply(self, z):
        """The transform of a tensor of head outputs, out of place (the patch's probe, the references)."""
        if self.softcap is not None:
            z = self.softcap * (z / self.softcap).tanh()
        return z * self.logit_scale


@dataclass(frozen=True, kw_only=True)
class HeadOptions(LogitTransform):
    """Everything a backend needs to evaluate the head and its loss on one row of logits."""

    vocab_size: int = _option(
        doc="the whole vocabulary's size V (every rank's entries together under tensor parallelism); from the "
            "weight, not an option a caller passes", check=check_whole_number, api=())
    ce_weight: float = _option(1.0, doc="weight of the cross-entropy term", check=_number(low=0))
    label_smoothing: float = _option(
        0.0, doc="label smoothing eps in [0, 1), PyTorch's convention", check=_number(low=0, high=1, high_open=True))
    z_loss: float = _option(0.0, doc="coefficient of the per-token z-loss lse^2", check=_number(low=0))
    kd_weight: float = _option(
        0.0, doc="weight of the distillation term (needs a teacher: teacher_hidden + teacher_weight, or "
                 "teacher_topk_ids + teacher_topk_logprobs)", check=_number(low=0))
    kd_loss: str = _option(
        "forward_kl", doc="the divergence: 'forward_kl' (KL(teacher || student)), 'reverse_kl' or 'jsd'",
        check=_choice(KD_LOSSES))
    jsd_beta: float = _option(
        0.5, doc="the JSD's mixture weight; 0 and 1 give the forward and the reverse KL (TRL's convention)",
        check=_number(low=0, high=1))
    kd_temperature: float = _option(
        1.0, doc="divides both heads' logits in the distillation term only", check=_number(low=0, low_open=True))
    kd_t2_scaling: bool = _option(False, doc="multiply the distillation term by kd_temperature^2", check=check_flag)
    sparse_tail: str = _option(
        "renormalize", doc="a sparse top-k teacher's missing mass: 'renormalize' (both restricted to its support) "
                           "or 'bucket' (one tail entry)", check=_choice(SPARSE_TAILS))

    @property
    def has_smoothing(self) -> bool:
        return self.label_smoothing != 0.0

    @property
    def kd_coef(self) -> float:
        """The per-token KD term's coefficient: kd_weight, times kd_temperature^2 with kd_t2_scaling."""
        return self.kd_weight * (self.kd_temperature ** 2 if self.kd_t2_scaling else 1.0)


@dataclass(frozen=True, kw_only=True)
class CallOptions:
    """How one call runs beside the head function."""

    ignore_index: int = _option(-100, doc="the label of positions that are not scored", check=check_whole_number,
                                api=("loss", "stats"))
    reduction: str = _option(
        "mean", doc="'mean' (over contributing tokens), 'sum', or 'none' (per token, in the labels' shape)",
        check=_choice(REDUCTIONS))
    return_stats: bool = _option(
        False, doc="also return logprob, entropy, correct and lse per token (detached float32 / bool)",
        check=check_flag)
    temperature: float = _option(1.0, doc="divides the logits of every statistic",
                                 check=_number(low=0, low_open=True), api=("stats",))
    backend: str = _option("auto", doc="'auto' (Triton on CUDA, PyTorch elsewhere), 'triton' or 'torch'",
                           check=_choice(BACKENDS), api=("loss", "stats"))
    chunk_budget_bytes: Optional[int] = _option(
        None, doc="memory one token chunk's [rows x vocab] buffers may use (None: 1 GiB on a GPU, 96 MiB on a CPU)",
        check=check_positive_int, api=("loss", "stats"))
    grad_accum_dtype: str = _option(
        "float32", doc="what dW and db add up in across token chunks: 'float32' (rounded once, at the end) or "
                       "'weight' (the weight's dtype, as Liger-Kernel and Cut Cross-Entropy do: half the memory, "
                       "one rounding a chunk)", check=_choice(GRAD_ACCUM_DTYPES))
    logits_dtype: str = _option(
        "auto", doc="what a Triton chunk holds its logits in: 'float32', 'input' (the inputs' dtype, dL/dz written "
                    "over them: a third of the memory a logit) or 'auto' ('input' unless return_stats)",
        check=_choice(LOGITS_DTYPES))


@dataclass(frozen=True)
class GradRequest:
    """Which gradients the caller wants; a frozen LM head skips dW and db entirely."""

    hidden: bool = True
    weight: bool = True
    bias: bool = False

    @property
    def any(self) -> bool:
        return self.hidden or self.weight or self.bias


# ---------------------------------------------------------------------------------------------
# What the declarations give the rest of the package.

@dataclass(frozen=True)
class Option:
    """One declared option, read off its dataclass field."""

    name: str
    type: Any  # the evaluated annotation: float, int, bool, str, or Optional[...] of one
    default: Any
    doc: str
    check: Callable[[str, Any], None]
    api: frozenset
    owner: type  # the dataclass that declares it
    is_float: bool  # float or Optional[float]: an int given is taken as a float


def declared(cls) -> "list[Option]":
    """The options ``cls`` declares (its own and inherited fields), in field order."""
    hints = typing.get_type_hints(cls)
    return [Option(f.name, hints[f.name], f.default, f.metadata["doc"], f.metadata["check"], f.metadata["api"], cls,
                   float in (hints[f.name], *typing.get_args(hints[f.name]))) for f in dataclasses.fields(cls)]


OPTIONS = {o.name: o for cls in (HeadOptions, CallOptions) for o in declared(cls)}
HEAD_FIELDS = tuple(f.name for f in dataclasses.fields(HeadOptions))
# The options the patch sets from the model's head math (patching.head_math), never a caller.
TRANSFORM_OPTIONS = tuple(f.name for f in dataclasses.fields(LogitTransform))
_OPTIONS_OF = {api: {name: o for name, o in OPTIONS.items() if api in o.api} for api in ("loss", "stats")}
_DEFAULTS_OF = {api: {name: o.default for name, o in options.items()} for api, options in _OPTIONS_OF.items()}


def options_of(api: str) -> "dict[str, Option]":
    """The options a public function takes ("loss" or "stats"), in declaration order."""
    return _OPTIONS_OF[api]


def check_options(given: dict, api: str, caller: str, also: tuple = ()) -> None:
    """Refuse a removed option, or one ``caller`` takes neither among the declared options of ``api`` nor in
    ``also`` (naming the closest it takes), and check every declared one's value."""
    allowed = options_of(api)
    unknown = []
    for name, value in given.items():
        if name in REMOVED_OPTIONS:
            raise TypeError(REMOVED_OPTIONS[name])
        if name in allowed:
            allowed[name].check(name, value)
        elif name not in also:
            unknown.append(name)
    if unknown:
        known = [*allowed, *also]
        close = [m for name in unknown for m in difflib.get_close_matches(name, known, n=1)]
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise TypeError(f"{caller} got unknown option(s) {unknown}{hint}; expected some of {sorted(known)}")


def resolve_options(given: dict, api: str, caller: str) -> dict:
    """Every declared option of ``api``: the given ones, checked (floats as floats), and the declared
    defaults for the rest."""
    check_options(given, api, caller)
    declared = options_of(api)
    return {**_DEFAULTS_OF[api], **{name: float(value) if declared[name].is_float and value is not None else value
                                    for name, value in given.items()}}


def pick(names: tuple, values: dict) -> dict:
    """The entries of ``values`` named in ``names`` (a dataclass's field names: ``HEAD_FIELDS``, ...). Names
    are computed once, at import: ``dataclasses.fields`` in a call would break a torch.compile graph."""
    return {name: values[name] for name in names if name in values}


def resolved_logits_dtype(logits_dtype: str, return_stats: bool) -> str:
    """'auto' is the inputs' dtype where no statistics are returned and float32 where they are: bf16
    logits move T3S's per-token confidences by up to 0.03 nats (benchmarks/RESULTS.md, 'What
    half-precision logits do to the statistics')."""
    if logits_dtype != "auto":
        return logits_dtype
    return "float32" if return_stats else "input"


def options_doc(api: str, indent: str = "    ") -> str:
    """The options of ``api`` as docstring lines: name (default): documentation."""
    return "\n".join(f"{indent}{o.name} ({o.default!r}): {o.doc}" for o in options_of(api).values())
