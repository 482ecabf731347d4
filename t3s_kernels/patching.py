"""One-call patching of HuggingFace models: ``apply_t3s(model)`` / ``revert_t3s(model)``.

A patched model, in training with labels, runs its own forward with the LM head swapped for a
capture: the head's input (the hidden states after whatever the model does to them first: a
BERT-style transform, MiniCPM3's hidden scale, ...) is kept, and the head returns a (1, 1, V)
*probe* row instead of the [tokens x vocab] logits. The fused op then evaluates the head on
the captured hidden states with the model's own head math (logit scale, soft cap, vocabulary
truncation; :func:`head_math`), and the model's own extra loss terms are added as the unpatched
model adds them (the MoE router auxiliary loss, with the model's coefficient). The output is
the model's own output class with ``logits=None``. In eval mode, or without labels, it is the
unpatched model exactly (logits, ``logits_to_keep``, caches).

Exact or refused. What the patch cannot reproduce it refuses at ``apply_t3s`` time, naming the
reason: wrapped models (DDP, FSDP1, DeepSpeed, torch.compile: patch the inner model first),
heads that are not exactly ``nn.Linear``, models that do not shift their labels (causal mode),
in-model z-losses over unlabelled positions, a user-set ``loss_function``. Two nets catch what
the registry misses:

- the *probe*: every patched forward checks that what the model did to the probe row after
  the head equals the declared head math (cost: one V-element row);
- the *equivalence check* (``check=True``, the default): ``apply_t3s`` runs the unpatched and
  the patched forward on a tiny random batch (2 x 16 tokens, same RNG state, so dropout and
  router noise draw the same) and compares the losses (and the MoE auxiliary loss); a mismatch
  raises, naming the architecture and both losses. Cost: two forward passes of that batch, no
  backward. With parameters on the meta device (deferred initialization) it runs at the first
  training forward instead.
"""

from __future__ import annotations

import inspect
import math
import types
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from .adapters.causal import as_token_weights, causal_lm_loss
from .adapters.masked_diffusion import dream_shift
from .adapters.packing import block_diagonal_mask, is_packed, sequence_starts
from .api import T3SLoss
from .validation import is_dtensor

MODES = ("causal", "masked_diffusion")
_STATE = "_t3s_patch"

# ---------------------------------------------------------------------------------------------
# The model's own head math, read from its config.

SOFTCAP_NAMES = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
# model_type -> how the model scales the head's output: logits * f(config, model).
LOGIT_SCALES = {
    **{t: lambda cfg, m: 1.0 / cfg.logits_scaling  # logits / logits_scaling
       for t in ("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared", "granitemoehybrid")},
    **{t: lambda cfg, m: getattr(m, "logit_scale", None) or cfg.logit_scale or 1.0  # logits * logit_scale
       for t in ("cohere", "cohere2", "cohere2_moe", "cohere_compass_text")},
    "hyperclovax": lambda cfg, m: cfg.logits_scaling,  # logits * logits_scaling (not a divisor here)
    "falcon_h1": lambda cfg, m: m.model.lm_head_multiplier,
}
# Families whose causal-LM loss compares position t with label t (no shift).
UNSHIFTED_LABELS = ("bart", "mbart", "marian", "pegasus", "plbart", "mvp", "blenderbot", "blenderbot-small",
                    "bigbird_pegasus", "trocr", "whisper", "xlnet", "xlm", "prophetnet", "cpmant")
# Where a model keeps the coefficient of its router auxiliary loss (on itself or its config).
AUX_COEF_NAMES = ("router_aux_loss_coef", "aux_loss_coef")


@dataclass(frozen=True)
class HeadMath:
    """What the model does to the head's output z: ``logits = logit_scale * softcap * tanh(z / softcap)``,
    and the first ``vocab`` columns only (None: all)."""

    logit_scale: float = 1.0
    softcap: Optional[float] = None
    vocab: Optional[int] = None

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        z = z[..., :self.vocab] if self.vocab is not None else z
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z * self.logit_scale


def _configs(model):
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return (config, text) if text is not config else (config,)


def head_math(model) -> HeadMath:
    """The model's head math, from its config (see ``LOGIT_SCALES``, ``SOFTCAP_NAMES``)."""
    scale, cap, vocab = 1.0, None, None
    for cfg in _configs(model):
        if cfg.model_type in LOGIT_SCALES:
            scale = float(LOGIT_SCALES[cfg.model_type](cfg, model))
        for name in SOFTCAP_NAMES:
            if getattr(cfg, name, None):
                cap = float(getattr(cfg, name))
        if getattr(cfg, "unpadded_vocab_size", None):
            vocab = int(cfg.unpadded_vocab_size)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"apply_t3s: {type(model).__name__}'s logit scale is {scale}; expected a finite number > 0")
    return HeadMath(logit_scale=scale, softcap=cap, vocab=vocab)


def _is_fsdp1_wrapper(module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(module, FullyShardedDataParallel)


def _is_plain_linear(module) -> bool:
    """Exactly ``nn.Linear``, FSDP2's wrapper class of exactly ``nn.Linear`` (``fully_shard`` swaps the
    class), or an FSDP1 unit wrapping exactly ``nn.Linear``."""
    cls = type(module)
    if cls is torch.nn.Linear:
        return True
    if _is_fsdp1_wrapper(module):
        return type(module.module) is torch.nn.Linear
    if not _is_fsdp_module(module):
        return False
    from torch.distributed.fsdp import FSDPModule

    return [b for b in cls.__bases__ if b is not FSDPModule] == [torch.nn.Linear]


def lm_head(model) -> torch.nn.Linear:
    """The model's LM head: the module whose output is the logits (``get_output_embeddings()``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        head = getattr(model, "lm_head", None)
    if head is None:
        raise TypeError(f"apply_t3s cannot patch {type(model).__name__}: it has no LM head "
                        "(get_output_embeddings() / lm_head), as HuggingFace causal LMs have")
    if not _is_plain_linear(head):
        raise TypeError(f"apply_t3s cannot patch {type(model).__name__}: its LM head is a {type(head).__name__}, "
                        "not exactly torch.nn.Linear, so its forward may scale or transform the logits in ways the "
                        "fused op does not reproduce")
    return head


# ---------------------------------------------------------------------------------------------
# Running the model with its head captured.

def _probe_row(vocab: int, device: torch.device) -> torch.Tensor:
    """A fixed (1, 1, V) float32 row of distinct values in [-4, 4): what the capture returns as logits.
    The fractional parts of i * (golden ratio), computed in float64, are distinct and spread evenly;
    plain arithmetic, so a compiled forward traces it."""
    i = torch.arange(vocab, dtype=torch.float64, device=device)
    return (torch.frac(i * 0.6180339887498949) * 8 - 4).float().view(1, 1, vocab)


class _Capture(torch.nn.Module):
    """Stands in for the LM head: records its input and returns a copy of the probe row. Other
    attributes (``weight``, for a model that reads the head's dtype) come from the head."""

    def __init__(self, head: torch.nn.Linear):
        super().__init__()
        self.out_features, self.inputs = head.out_features, []
        self.__dict__["_head"] = head  # not registered as a submodule

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_head"], name)

    def forward(self, x):
        self.inputs.append(x)
        return _probe_row(self.out_features, x.device)  # a fresh row: the model may write into it


class _HeadCapture:
    """Within the context, the model's LM head module is replaced in its parent by a :class:`_Capture`.

    The head module itself is not called, so hooks on it (FSDP2's unshard / reshard, for a head
    sharded in a group of its own or with the final norm) do not run: its parameters stay as the
    rest of the forward left them, for the fused op to use."""

    def __init__(self, model, head: torch.nn.Linear):
        for name, module in model.named_modules():
            if module is head and name:
                parent_name, _, self.attr = name.rpartition(".")
                self.parent = model.get_submodule(parent_name) if parent_name else model
                break
        else:
            raise ValueError(f"apply_t3s: {type(model).__name__}'s LM head is not one of its submodules")
        self.head, self.stand_in = head, _Capture(head)

    @property
    def inputs(self) -> list:
        return self.stand_in.inputs

    def __enter__(self):
        setattr(self.parent, self.attr, self.stand_in)
        return self

    def __exit__(self, *exc):
        setattr(self.parent, self.attr, self.head)
        return False


@dataclass
class HeadInputs:
    """What the fused op needs to evaluate a model's head: the head's input, its (truncated)
    weight and bias, the head math, and the model's output without logits."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    math: HeadMath
    outputs: object


def _accepts(fn, name: str) -> bool:
    params = inspect.signature(fn).parameters.values()
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def _unit_roundoff(dtype: torch.dtype) -> float:
    """Half the spacing of the dtype's numbers at 1 (0 for float32, whose rounding the tolerances absorb)."""
    return {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}.get(dtype, 0.0)


def run_with_head_captured(model, forward, *args, **kwargs) -> HeadInputs:
    """Call ``forward`` (the unpatched forward of ``model``; labels are not passed) with the LM
    head captured, check what the model did to the probe row against :func:`head_math`, and
    return the head's inputs. Raises ``ValueError`` where the model does something else."""
    name = type(model).__name__
    head = lm_head(model)
    math_ = head_math(model)
    with _HeadCapture(model, head) as capture:
        outputs = forward(*args, **kwargs)
    if len(capture.inputs) != 1:
        raise ValueError(f"apply_t3s: {name} called its LM head {len(capture.inputs)} times in one forward; the "
                         "patch supports models that call it once")
    logits = outputs.get("logits") if hasattr(outputs, "get") else None
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"apply_t3s: {name}'s forward returned no logits tensor; cannot verify its head math")
    probe = _probe_row(head.out_features, logits.device)
    expected = math_.apply(probe)
    if tuple(logits.shape) != tuple(expected.shape):
        raise ValueError(f"apply_t3s: {name} reshapes its LM head's output ({tuple(probe.shape)} became "
                         f"{tuple(logits.shape)}, the head math expects {tuple(expected.shape)}); not supported")
    err = (logits.float() - expected).abs().max()
    tol = 2 * _unit_roundoff(logits.dtype) or 1e-5  # a half-precision output rounds each probe value once
    agrees = err <= tol * expected.abs().max().clamp(min=1.0)
    if torch.compiler.is_compiling():  # no host sync in a compiled graph: the check raises when it runs
        torch._assert_async(agrees, "apply_t3s: the model transforms its LM head's output in a way the patch does "
                            "not model; the fused loss would be silently wrong, so it is refused")
    elif not bool(agrees):
        raise ValueError(f"apply_t3s: {name} transforms its LM head's output in a way the patch does not model "
                         f"(model_type {model.config.model_type!r}, declared head math {math_}; the probe row "
                         f"differs by {err.item():.3g}); the fused loss would be silently wrong, so it is refused")
    weight, bias = vocabulary_rows(head.weight, head.bias, math_.vocab)
    return HeadInputs(capture.inputs[0], weight, bias, math_, outputs)


def vocabulary_rows(weight, bias, vocab: Optional[int]):
    """The head's rows of the real vocabulary: a model that pads its vocabulary drops the extra
    rows' logits (``HeadMath.vocab``), and so does the loss."""
    if vocab is not None and weight.shape[0] > vocab:
        return weight[:vocab], None if bias is None else bias[:vocab]
    return weight, bias


def model_head_inputs(model, **forward_kwargs) -> HeadInputs:
    """The head's inputs for a forward of ``model`` (patched or not; no labels): what scoring feeds
    to ``token_stats`` so that it sees the same head math as training."""
    forward = _original_forward(model) if is_t3s_patched(model) else model.forward
    if _accepts(forward, "use_cache"):
        forward_kwargs.setdefault("use_cache", False)
    return run_with_head_captured(model, forward, **forward_kwargs)


def _aux_loss_coef(model) -> float:
    for owner in (model, *_configs(model)):
        for key in AUX_COEF_NAMES:
            value = getattr(owner, key, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    raise ValueError(f"apply_t3s: {type(model).__name__} returned a router auxiliary loss but its coefficient is "
                     f"not under any of {AUX_COEF_NAMES}; refusing rather than dropping or mis-weighting it")


def _without_logits(outputs, loss):
    """The model's own output class, with ``loss`` and no logits."""
    fields = {k: v for k, v in outputs.items() if k not in ("logits", "loss")}
    return type(outputs)(loss=loss, **fields)


# ---------------------------------------------------------------------------------------------
# Refusals at patch time.

def _refuse_wrappers(model) -> None:
    wrappers = {"DistributedDataParallel": "DDP", "DataParallel": "DataParallel",
                "FullyShardedDataParallel": "FSDP1", "DeepSpeedEngine": "DeepSpeed", "OptimizedModule": "torch.compile"}
    for cls in type(model).__mro__:
        if cls.__name__ in wrappers:
            raise TypeError(f"apply_t3s got a {wrappers[cls.__name__]} wrapper ({cls.__name__}); patch the inner "
                            "model before wrapping it: apply_t3s(model), then wrap")


def _refuse_unsupported(model, mode: str) -> None:
    name = type(model).__name__
    for cfg in _configs(model):
        if mode == "causal" and cfg.model_type in UNSHIFTED_LABELS:
            raise ValueError(f"apply_t3s cannot patch {name} in causal mode: it does not shift its labels (its loss "
                             "scores position t against label t), while the patch shifts them as causal LMs do")
        if getattr(cfg, "z_loss_coefficient", 0):
            raise ValueError(f"apply_t3s cannot patch {name} with z_loss_coefficient={cfg.z_loss_coefficient}: its "
                             "z-loss averages lse^2 over every position, labelled or not, which the fused op does not "
                             "compute; set config.z_loss_coefficient = 0 and pass z_loss= to apply_t3s for the "
                             "per-token z-loss")
    if "_loss_function" in vars(model):
        raise ValueError(f"apply_t3s cannot patch {name}: its loss_function was replaced by the user; the fused op "
                         "computes causal-LM cross-entropy, not that function")


# ---------------------------------------------------------------------------------------------
# The patched forward.

def is_t3s_patched(model) -> bool:
    return _STATE in vars(model) or _STATE in vars(type(model))


def patch_mode(model) -> Optional[str]:
    """The ``mode`` apply_t3s patched ``model`` with ("causal" or "masked_diffusion"), or None."""
    return _state(model)["mode"] if is_t3s_patched(model) else None


def _state(model) -> dict:
    if _STATE in vars(model):
        return vars(model)[_STATE]
    for cls in type(model).__mro__:
        if _STATE in vars(cls):
            return vars(cls)[_STATE]
    raise ValueError(f"{type(model).__name__} is not patched by apply_t3s")


def _original_forward(model):
    """The unpatched forward bound to ``model``. Looked up through the model itself (not a closure),
    so a deep copy of a patched model calls its own original forward, not the source's."""
    if _STATE in vars(model):
        return vars(model)[_STATE]["original"]
    return types.MethodType(_state(model)["original"], model)


TEACHER_INPUTS = ("teacher_hidden", "teacher_topk_ids", "teacher_topk_logprobs")


ANCHORS = ("ignore", "count")


def _refuse_counted_anchors(labels, shift_labels, t3s_weights, ignore_index: int) -> None:
    """Under the default ``anchors="ignore"`` a weight-0 token must not carry a label when the caller
    divides by ``num_items_in_batch``: HF counts labels, so the count would include the anchors."""
    target, w = (shift_labels, t3s_weights) if shift_labels is not None else (labels[..., 1:], t3s_weights[..., 1:])
    if bool(((w == 0) & (target != ignore_index)).any()):
        raise ValueError("t3s_weights drops labelled tokens while num_items_in_batch (HF's count of labels) counts "
                         "them, so the loss would shrink by the kept fraction. Give anchors label -100 "
                         "(T3SDataCollator does, by default), or apply_t3s(..., anchors='count') to divide by every "
                         "label token on purpose")


def _fused_forward(model, loss: T3SLoss, mode: str, shift: Optional[str], args, kwargs, *, labels, shift_labels,
                   t3s_weights, num_items_in_batch, teacher):
    name = type(model).__name__
    original = _original_forward(model)
    if "_loss_function" in vars(model):
        raise ValueError(f"{name}.loss_function was replaced after apply_t3s; the fused op would ignore it. "
                         "revert_t3s(model) to use your loss function")
    keep = kwargs.get("logits_to_keep", 0)
    if not (isinstance(keep, int) and keep == 0):
        raise ValueError("logits_to_keep selects positions for generation; it cannot be combined with labels in "
                         "training (the loss needs every position)")
    if kwargs.get("return_dict") is False:
        raise ValueError("return_dict=False is not supported in a patched training forward (the logits do not "
                         "exist to fill the tuple); use the default return_dict=True")
    ignore_index = kwargs.get("ignore_index", -100)
    if (mode == "causal" and t3s_weights is not None and num_items_in_batch is not None
            and _state(model).get("anchors", "ignore") == "ignore"):
        _refuse_counted_anchors(labels, shift_labels, t3s_weights, ignore_index)
    call = {k: v for k, v in kwargs.items()
            if k not in ("ignore_index", "num_items_in_batch") or _accepts(original, k)}
    if num_items_in_batch is not None and _accepts(original, "num_items_in_batch"):
        call["num_items_in_batch"] = num_items_in_batch
    if is_packed(call.get("position_ids"), call.get("attention_mask")):
        labels, shift_labels = _prepare_packed(model, original, mode, call, labels, shift_labels, ignore_index,
                                               counted=num_items_in_batch is not None)
    head_in = run_with_head_captured(model, original, *args, labels=None, **call)
    hidden, options = head_in.hidden, dict(loss.options)
    head = lm_head(model)
    through_module = (is_dtensor(head_in.weight) and _is_fsdp_module(head)) or _is_fsdp1_wrapper(head)
    if is_dtensor(head_in.weight) and not through_module:
        if not _state(model).get("tensor_parallel"):
            raise ValueError(f"{name}'s LM head weight is a DTensor not managed by FSDP2 (a tensor-parallel head?). "
                             "Say so explicitly: apply_t3s(model, tensor_parallel=True) computes the loss "
                             "vocabulary-parallel over its mesh; placements alone are not proof of tensor parallelism")
        _check_tensor_parallel_head(name, head_in)
        options["vocab_parallel"] = head_in.weight.device_mesh  # the op runs on this rank's rows
    options.update(softcap=head_in.math.softcap, logit_scale=head_in.math.logit_scale)
    options.update({k: v for k, v in teacher.items() if v is not None})
    if mode == "masked_diffusion":
        # labels are already aligned with the positions (no shift), -100 where not masked.
        labels, shift_labels = None, labels if shift_labels is None else shift_labels
        if shift == "dream":
            hidden = dream_shift(hidden)
    elif shift_labels is not None:
        labels = None

    def compute(x, weight, bias):
        weight, bias = vocabulary_rows(weight, bias, head_in.math.vocab)
        weights = as_token_weights(t3s_weights, labels if shift_labels is None else shift_labels, "t3s_weights")
        return causal_lm_loss(x, weight, labels, shift_labels=shift_labels, token_weights=weights,
                              num_items_in_batch=num_items_in_batch, bias=bias, ignore_index=ignore_index,
                              **options).loss

    if through_module:
        total = _call_through_fsdp_head(head, hidden, compute)
    else:
        total = compute(hidden, head_in.weight, head_in.bias)
    aux = head_in.outputs.get("aux_loss")
    if aux is not None:
        total = total + _aux_loss_coef(model) * aux.to(total.device)
    return _without_logits(head_in.outputs, total)


def _is_fsdp_module(module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(module, FSDPModule)


def _check_tensor_parallel_head(name: str, head_in: HeadInputs) -> None:
    """What the vocabulary-parallel loss of a tensor-parallel head cannot take (the op checks the rest:
    a Shard(0) head on a 1-D mesh, a teacher split alike or whole)."""
    if is_dtensor(head_in.hidden):
        raise ValueError(f"{name}'s LM head input is a DTensor (sequence parallelism?); the vocabulary-parallel "
                         "loss takes the replicated hidden states")
    if head_in.math.vocab is not None and head_in.math.vocab < head_in.weight.shape[0]:
        raise ValueError(f"{name} drops padded vocabulary rows; not supported with a tensor-parallel head")


def _call_through_fsdp_head(head, hidden, compute):
    """The loss computed *inside* a call of the sharded head module, as its forward: the hooks of
    FSDP2 (or FSDP1's wrapper) around that call all-gather the weight (and cast it and the input
    under a mixed-precision policy), reshard after, and gather again in backward, exactly as for
    the Linear it replaces; the gradient reaches the sharded parameter through the reduce-scatter.
    FSDP1's wrapper calls the Linear inside it: that Linear's forward is the one replaced."""
    linear = head.module if _is_fsdp1_wrapper(head) else head

    def forward(x):
        return compute(x, linear.weight, linear.bias)

    linear.forward = forward  # an instance attribute: the class's forward (and the hooks) stay
    try:
        return head(hidden)
    finally:
        del linear.forward


# Attention implementations whose varlen kernels take packed sequences from position_ids.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


def _prepare_packed(model, original, mode: str, call: dict, labels, shift_labels, ignore_index: int, *,
                    counted: bool):
    """A packed batch (adapters/packing.py): make the model's own forward keep sequences apart, and
    never let a sequence's last token predict the next one's first (the causal shift across a
    boundary). Returns the labels with those targets ignored."""
    name = type(model).__name__
    position_ids, mask = call["position_ids"], call.get("attention_mask")
    if mask is not None:
        if mask.dim() == 2 and bool(mask.bool().all()):
            call.pop("attention_mask")  # all ones says nothing, and would switch off transformers' packing
        else:
            raise ValueError("a packed batch (position_ids restart inside a row) came with an attention_mask: "
                             "transformers then ignores the packing and lets the sequences attend to each other. "
                             "Pass position_ids without attention_mask (T3SDataCollator(packed=True) does)")
    if not _accepts(original, "use_cache"):
        raise ValueError(f"{name}'s forward takes no use_cache, so a cache may switch off the packed attention "
                         "mask: packed batches are not supported for it; pad instead")
    call["use_cache"] = False  # with a cache, transformers' mask builder ignores packed position_ids
    implementation = getattr(model.config, "_attn_implementation", None)
    if mode == "masked_diffusion" and implementation not in VARLEN_ATTENTION:
        call["attention_mask"] = block_diagonal_mask(position_ids, model.dtype)
    if mode != "causal":
        return labels, shift_labels
    starts = sequence_starts(position_ids)
    if shift_labels is not None:
        crossing = torch.zeros_like(starts)
        crossing[:, :-1] = starts[:, 1:]  # shift_labels[t] is the label of token t + 1
        target = shift_labels
    else:
        crossing, target = starts, labels
    if counted and bool((target[crossing] != ignore_index).any()):
        raise ValueError("a packed batch labels the first token of a sequence, which the previous sequence's last "
                         "token would predict; num_items_in_batch counts it. Label each sequence's first token "
                         "-100 (T3SDataCollator(packed=True) and DataCollatorWithFlattening do)")
    target = target.masked_fill(crossing, ignore_index)
    return (labels, target) if shift_labels is not None else (target, shift_labels)


def _make_forward(mode: str, shift: Optional[str], loss: T3SLoss):
    """The patched forward."""

    def forward(self, *args, labels=None, t3s_weights=None, shift_labels=None, num_items_in_batch=None,
                teacher_hidden=None, teacher_topk_ids=None, teacher_topk_logprobs=None, **kwargs):
        if args:  # positional arguments by the original forward's names, so that labels given positionally count
            named = inspect.signature(_original_forward(self)).bind_partial(*args).arguments
            if "labels" in named:
                labels = named.pop("labels")
            args, kwargs = (), {**named, **kwargs}
        want_fused = self.training and (labels is not None or shift_labels is not None)
        teacher = dict(teacher_hidden=teacher_hidden, teacher_topk_ids=teacher_topk_ids,
                       teacher_topk_logprobs=teacher_topk_logprobs)
        if not want_fused and any(v is not None for v in teacher.values()):
            raise ValueError("teacher inputs are for the training loss; pass labels too (and train mode)")
        if not want_fused:
            if t3s_weights is not None and self.training:
                raise ValueError("t3s_weights were given without labels; pass labels (or shift_labels) too")
            if shift_labels is not None:
                kwargs["shift_labels"] = shift_labels
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return _original_forward(self)(*args, labels=labels, **kwargs)
        if "t3s_force_mask" in kwargs:
            raise ValueError("t3s_force_mask is a masked-diffusion force set; this forward takes t3s_weights (loss "
                             "weights or an AR keep-mask), or noise the batch with masked_diffusion_compute_loss")
        state = _state(self)
        if state.get("check_pending"):
            state["check_pending"] = False
            check_t3s_patch(self)
        return _fused_forward(self, loss, mode, shift, args, kwargs, labels=labels, shift_labels=shift_labels,
                              t3s_weights=t3s_weights, num_items_in_batch=num_items_in_batch, teacher=teacher)

    forward._t3s_loss = loss  # what the equivalence check swaps for the plain loss
    return forward


def _patched_signature(original) -> inspect.Signature:
    """The original forward's signature (self included) plus the patch's keyword arguments: HF
    Trainer keeps only the dataset columns the forward names, and passes loss kwargs when it has ``**kwargs``."""
    sig = inspect.signature(getattr(original, "__func__", original))
    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    names = {p.name for p in params}
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None)
             for n in ("t3s_weights", "shift_labels", "num_items_in_batch", *TEACHER_INPUTS) if n not in names]
    return sig.replace(parameters=params + extra + [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])


# ---------------------------------------------------------------------------------------------
# The equivalence check.

def _check_batch(model, seq_len: int = 16, batch_size: int = 2, seed: int = 0):
    head = lm_head(model)
    vocab = min(head.out_features, head_math(model).vocab or head.out_features)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g).to(head.weight.device)
    labels = ids.clone()
    labels[:, :3] = -100
    labels[0, -2:] = -100
    return ids, labels


def _losses_agree(got: float, ref: float, tol: float) -> bool:
    return abs(got - ref) <= tol * max(abs(ref), 1e-6)


def check_t3s_patch(model, *, seed: int = 0) -> None:
    """Run the unpatched and the patched forward of ``model`` on a tiny random batch (same RNG
    state) and raise ``ValueError`` if their losses (or MoE auxiliary losses) differ.

    The patched side runs with the plain loss (no smoothing, z-loss or distillation: the
    unpatched model computes plain cross-entropy), on the backend and strategy the patch uses.
    Tolerance: 1e-5 relative for float32 heads; for half-precision heads the unpatched model
    rounds its logits to 8 (bf16) or 11 (fp16) bits before the loss while the fused op keeps
    them in float32, which moves a cross-entropy by at most 2 u max|z| (u the unit roundoff).
    """
    name = type(model).__name__
    state = _state(model)
    mode = state["mode"]
    if mode != "causal":
        return  # masked-diffusion students have no unpatched loss of the same meaning to compare with
    original = _original_forward(model)
    ids, labels = _check_batch(model, seed=seed)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    if _accepts(original, "use_cache"):
        kwargs["use_cache"] = False
    if any(hasattr(cfg, "output_router_logits") for cfg in _configs(model)) and _accepts(original,
                                                                                         "output_router_logits"):
        kwargs["output_router_logits"] = True
    forward = model.forward
    plain = T3SLoss(**{k: v for k, v in forward._t3s_loss.options.items()
                       if k in ("backend", "strategy", "chunk_budget_bytes")})
    was_training = model.training
    devices = [ids.device] if ids.device.type == "cuda" else []
    model.train()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            try:
                ref = original(labels=labels, **kwargs)
            except Exception as e:  # any failure of the unpatched model itself
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                warnings.warn(f"apply_t3s: the equivalence check was skipped: the unpatched {name} could not run a "
                              f"tiny random batch ({reason}). The per-forward probe of the head math still runs.",
                              stacklevel=3)
                return
            torch.manual_seed(seed)
            try:
                got = _fused_forward(model, plain, mode, state["shift"], (), kwargs, labels=labels, shift_labels=None,
                                     t3s_weights=None, num_items_in_batch=None,
                                     teacher={k: None for k in TEACHER_INPUTS})
            except (TypeError, ValueError):
                raise
            except Exception as e:  # said with its cause, at patch time rather than in training
                raise ValueError(f"apply_t3s: the patched {name} failed on a tiny random batch where the unpatched "
                                 f"model ran ({type(e).__name__}: {str(e).splitlines()[0][:200]}); refused") from e
    finally:
        model.train(was_training)
    logits = ref.logits.float()
    tol = 1e-5 + 4 * _unit_roundoff(ref.logits.dtype) * logits.abs().max().item() / max(abs(ref.loss.item()), 1e-6)
    problems = []
    if not _losses_agree(got.loss.item(), ref.loss.item(), tol):
        problems.append(f"loss {got.loss.item():.7g} vs unpatched {ref.loss.item():.7g}")
        unshifted = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        if _losses_agree(unshifted.item(), ref.loss.item(), tol):
            problems.append("the unpatched loss scores position t against label t: the model does not shift labels")
    ref_aux, got_aux = ref.get("aux_loss"), got.get("aux_loss")
    if ref_aux is not None and (got_aux is None or not _losses_agree(got_aux.item(), ref_aux.item(), 1e-6)):
        problems.append("the router auxiliary loss differs")
    if problems:
        raise ValueError(f"apply_t3s: the patched {name} does not reproduce the unpatched model on a random batch: "
                         f"{'; '.join(problems)} (relative tolerance {tol:.1e}). The patch is refused rather than "
                         "silently wrong; apply_t3s(..., check=False) skips this check at your own risk")


def _on_meta(model) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# apply / revert.

def apply_t3s(model, *, mode: str = "causal", shift: Optional[str] = None, patch_class: bool = False,
              check: bool = True, anchors: str = "ignore", tensor_parallel: bool = False, **loss_options):
    """Patch ``model`` (an instance; with ``patch_class=True`` its class, for every instance) so that
    training forwards with labels use the fused loss. ``loss_options`` are ``fused_linear_t3s_loss``'s
    (``label_smoothing``, ``z_loss``, ``backend``, ``strategy``, ...; for distillation
    ``teacher_weight=teacher.lm_head.weight``, ``kd_weight``, ``kd_loss``, ``kd_temperature``, and then
    ``teacher_hidden=`` or ``teacher_topk_ids=``/``teacher_topk_logprobs=`` in each forward call).
    The model's own head math (logit scale, soft cap) and ``ignore_index`` (a forward argument, as
    in HuggingFace) come from the model and the call.

    ``anchors`` fixes what a weight-0 token (T3S's imitation anchor) means for the normalization.
    ``"ignore"`` (default): as if it had label -100, the usual implementation and what the method's
    loss means: the sum over kept tokens is divided by the kept count (without ``num_items_in_batch``)
    or by ``num_items_in_batch``, which must then not count anchors (``T3SDataCollator`` gives them
    label -100; a forward that would divide by a count including them raises). ``"count"``: divide
    by ``num_items_in_batch`` as given, anchors included.

    ``tensor_parallel=True`` says the LM head is (or will be) sharded over the vocabulary by tensor
    parallelism (a ``Shard(0)`` DTensor on a 1-D mesh, as transformers' ``tp_plan`` and
    ``ColwiseParallel`` make it): the loss then runs vocabulary-parallel over that mesh, exactly.
    It is never inferred from the placements (FSDP2's parameters look the same).

    ``check`` (default True) runs the equivalence check described in the module docstring (two
    forward passes of a 2 x 16 batch; at the first training forward when the parameters are on
    the meta device). In masked-diffusion mode there is no unpatched loss of the same meaning to
    compare with: only the per-forward probe runs. Returns the model; raises ``TypeError`` /
    ``ValueError`` naming the reason where the patch cannot be exact (and leaves the model unpatched)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if shift not in (None, "dream"):
        raise ValueError(f"shift must be None or 'dream'; got {shift!r}")
    if shift is not None and mode != "masked_diffusion":
        raise ValueError("shift='dream' is a masked-diffusion convention; use mode='masked_diffusion'")
    if not isinstance(check, bool):
        raise TypeError(f"check must be a bool; got {check!r}")
    if anchors not in ANCHORS:
        raise ValueError(f"anchors must be one of {ANCHORS}; got {anchors!r}")
    if not isinstance(tensor_parallel, bool):
        raise TypeError(f"tensor_parallel must be a bool; got {tensor_parallel!r}")
    for reserved in ("bias", "token_weights", "normalizer", "softcap", "logit_scale", "ignore_index",
                     "vocab_parallel", *TEACHER_INPUTS):
        if reserved in loss_options:
            raise ValueError(f"{reserved} is set by the patch from the model and the batch; do not pass it "
                             "(ignore_index and teacher inputs go to each forward call)")
    _refuse_wrappers(model)
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"apply_t3s cannot patch {type(model).__name__}: it patches HuggingFace models (an "
                        "nn.Module with a config and an LM head)")
    lm_head(model)
    head_math(model)
    _refuse_unsupported(model, mode)
    if is_t3s_patched(model):
        raise ValueError(f"{type(model).__name__} is already patched; call revert_t3s first")
    loss = T3SLoss(**loss_options)  # validates the option names and values now, not at the first step
    state = dict(mode=mode, shift=shift, anchors=anchors, tensor_parallel=tensor_parallel, check_pending=False)
    forward = _make_forward(mode, shift, loss)
    if patch_class:
        cls = type(model)
        forward.__signature__ = _patched_signature(cls.forward)
        setattr(cls, _STATE, dict(state, original=cls.forward))
        cls.forward = forward
    else:
        forward.__signature__ = _patched_signature(model.forward)
        setattr(model, _STATE, dict(state, original=model.forward))  # bound to model; deepcopy rebinds it
        model.forward = types.MethodType(forward, model)
    if check:
        if _on_meta(model):
            _state(model)["check_pending"] = True
        else:
            try:
                check_t3s_patch(model)
            except Exception:
                revert_t3s(model)
                raise
    return model


def revert_t3s(model):
    """Undo ``apply_t3s``; returns the model."""
    if _STATE in vars(model):
        del model.forward  # the instance attribute; the class's forward shows through again
        delattr(model, _STATE)
    elif _STATE in vars(type(model)):
        cls = type(model)
        cls.forward = getattr(cls, _STATE)["original"]
        delattr(cls, _STATE)
    else:
        raise ValueError(f"{type(model).__name__} is not patched by apply_t3s")
    return model
