"""The patched forward: in training with labels, the model's own forward with its head captured
(capture.py), then the fused loss on the captured hidden states with the model's head math, plus
the model's own extra loss terms; the model's own output class with ``logits=None``. Otherwise the
unpatched forward, exactly."""

from __future__ import annotations

import inspect
from typing import Optional

from ..adapters.causal import as_token_weights, causal_lm_loss
from ..adapters.masked_diffusion import dream_shift
from ..adapters.packing import is_packed, prepare_packed_forward
from ..api import TEACHER_ROW_INPUTS, T3SLoss
from ..validation import is_dtensor
from .attention import check_attention, diffusion_arguments, key_valid_of
from .capture import HeadInputs, accepts, run_with_head_captured
from .distributed import call_through_head, check_tensor_parallel_head, runs_through_module
from .head import kept_vocabulary, lm_head, model_configs
from .refusals import refuse_counted_anchors, refuse_generation_options, refuse_replaced_loss
from .state import original_forward, patch_state

# Where a model keeps the coefficient of its router auxiliary loss (on itself or its config).
AUX_COEF_NAMES = ("router_aux_loss_coef", "aux_loss_coef")
# What the patched forward takes beside the model's own arguments.
PATCH_INPUTS = ("t3s_weights", "shift_labels", "num_items_in_batch", "t3s_clean_ids", *TEACHER_ROW_INPUTS)


def aux_loss_coef(model) -> float:
    for owner in (model, *model_configs(model)):
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


def make_forward(mode: str, shift: Optional[str], loss: T3SLoss):
    """The patched forward."""

    def forward(self, *args, labels=None, t3s_weights=None, shift_labels=None, num_items_in_batch=None,
                t3s_clean_ids=None, teacher_hidden=None, teacher_topk_ids=None, teacher_topk_logprobs=None,
                **kwargs):
        if args:  # positional arguments by the original forward's names, so that labels given positionally count
            named = inspect.signature(original_forward(self)).bind_partial(*args).arguments
            if "labels" in named:
                labels = named.pop("labels")
            args, kwargs = (), {**named, **kwargs}
        want_fused = self.training and (labels is not None or shift_labels is not None)
        teacher = dict(teacher_hidden=teacher_hidden, teacher_topk_ids=teacher_topk_ids,
                       teacher_topk_logprobs=teacher_topk_logprobs)
        if not want_fused and any(v is not None for v in teacher.values()):
            raise ValueError("teacher inputs are for the training loss; pass labels too (and train mode)")
        if not want_fused and t3s_clean_ids is not None:
            raise ValueError("t3s_clean_ids (a block-diffusion step's clean half) is for the training loss; pass "
                             "labels too (and train mode)")
        if not want_fused:
            if t3s_weights is not None and self.training:
                raise ValueError("t3s_weights were given without labels; pass labels (or shift_labels) too")
            if shift_labels is not None:
                kwargs["shift_labels"] = shift_labels
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return original_forward(self)(*args, labels=labels, **kwargs)
        if "t3s_force_mask" in kwargs:
            raise ValueError("t3s_force_mask is a masked-diffusion force set; this forward takes t3s_weights (loss "
                             "weights or an AR keep-mask), or noise the batch with masked_diffusion_compute_loss")
        deferred_check = patch_state(self).pop("deferred_check", None)  # parameters were on the meta device
        if deferred_check is not None:
            deferred_check(self)
        return fused_forward(self, loss, mode, shift, args, kwargs, labels=labels, shift_labels=shift_labels,
                             t3s_weights=t3s_weights, num_items_in_batch=num_items_in_batch, teacher=teacher,
                             clean_ids=t3s_clean_ids)

    forward._t3s_loss = loss  # what the equivalence check swaps for the plain loss
    return forward


def patched_signature(original) -> inspect.Signature:
    """The original forward's signature (self included) plus the patch's keyword arguments: HF
    Trainer keeps only the dataset columns the forward names, and passes loss kwargs when it has ``**kwargs``."""
    sig = inspect.signature(getattr(original, "__func__", original))
    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    names = {p.name for p in params}
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in PATCH_INPUTS if n not in names]
    return sig.replace(parameters=params + extra + [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])


def _loss_options(model, head_in: HeadInputs, loss: T3SLoss, teacher: dict) -> dict:
    """The fused op's options for this forward: the patch's, the model's head math, the batch's teacher
    inputs, and for a tensor-parallel head its mesh."""
    name = type(model).__name__
    options = {**loss.options, **head_in.math.transform(), **{k: v for k, v in teacher.items() if v is not None}}
    if is_dtensor(head_in.weight) and not runs_through_module(lm_head(model), head_in.weight):
        if not patch_state(model).get("tensor_parallel"):
            raise ValueError(f"{name}'s LM head weight is a DTensor not managed by FSDP2 (a tensor-parallel head?). "
                             "Say so explicitly: apply_t3s(model, tensor_parallel=True) computes the loss "
                             "vocabulary-parallel over its mesh; placements alone are not proof of tensor parallelism")
        check_tensor_parallel_head(name, head_in.hidden, head_in.weight, head_in.math.vocab_size)
        options["vocab_parallel"] = head_in.weight.device_mesh  # the op runs on this rank's entries
    return options


def fused_forward(model, loss: T3SLoss, mode: str, shift: Optional[str], args, kwargs, *, labels, shift_labels,
                  t3s_weights, num_items_in_batch, teacher, clean_ids=None):
    original = original_forward(model)
    state = patch_state(model)
    block_size = state.get("block_size")
    refuse_replaced_loss(model, "{name}.loss_function was replaced after apply_t3s; the fused op would ignore it. "
                                "revert_t3s(model) to use your loss function")
    refuse_generation_options(kwargs)
    ignore_index = kwargs.get("ignore_index", -100)
    if (mode == "causal" and t3s_weights is not None and num_items_in_batch is not None
            and patch_state(model).get("anchors", "ignore") == "ignore"):
        refuse_counted_anchors(labels, shift_labels, t3s_weights, ignore_index)
    call = {k: v for k, v in kwargs.items()
            if k not in ("ignore_index", "num_items_in_batch") or accepts(original, k)}
    if num_items_in_batch is not None and accepts(original, "num_items_in_batch"):
        call["num_items_in_batch"] = num_items_in_batch
    packed = is_packed(call.get("position_ids"), call.get("attention_mask"))
    if packed and block_size is not None:
        raise ValueError("a packed batch cannot be trained by block diffusion here: the block mask is built for one "
                         "sequence a row; pad instead (packing with a document-level block mask is not supported)")
    if packed:
        labels, shift_labels = prepare_packed_forward(
            call, labels, shift_labels, causal=mode == "causal",
            attention=getattr(model.config, "_attn_implementation", None), dtype=model.dtype,
            takes_use_cache=accepts(original, "use_cache"), ignore_index=ignore_index,
            counted=num_items_in_batch is not None, model_name=type(model).__name__)
    if mode == "masked_diffusion":
        if args:
            raise ValueError("a masked-diffusion training forward takes its inputs by name (input_ids=...)")
        # The first unpacked training batch, as sent, and the first padded one: a check that fails leaves
        # its kind pending, so a refused model stays refused.
        pending = state.get("attention_pending", ())
        kind = ("padded" if key_valid_of(call) is not None else "plain") if pending and not packed else None
        if kind in pending:  # reading the mask costs a host sync: only while a check is pending
            form = check_attention(model, original, call, clean_ids=clean_ids, block_size=block_size,
                                   where=f"the first {'padded ' if kind == 'padded' else ''}training batch")
            state["mask_form"] = form or state.get("mask_form")
            state["attention_pending"] = state["attention_pending"] - {kind, "plain"}
        call = diffusion_arguments(model, call, clean_ids, block_size)
    head_in = run_with_head_captured(model, original, *args, labels=None, **call)
    hidden, options = head_in.hidden, _loss_options(model, head_in, loss, teacher)
    if block_size is not None:
        hidden = hidden[:, :hidden.shape[1] // 2]  # x_t's half: the loss is read at the noisy positions
    if mode == "masked_diffusion":
        # labels are already aligned with the positions (no shift), -100 where not masked.
        labels, shift_labels = None, labels if shift_labels is None else shift_labels
        if shift == "dream":
            hidden = dream_shift(hidden)
    elif shift_labels is not None:
        labels = None

    def compute(x, weight, bias):
        weight, bias = kept_vocabulary(weight, bias, head_in.math.vocab_size)
        weights = as_token_weights(t3s_weights, labels if shift_labels is None else shift_labels, "t3s_weights")
        return causal_lm_loss(x, weight, labels, shift_labels=shift_labels, token_weights=weights,
                              num_items_in_batch=num_items_in_batch, bias=bias, ignore_index=ignore_index,
                              **options).loss

    head = lm_head(model)
    if runs_through_module(head, head_in.weight):
        total = call_through_head(head, hidden, compute)
    else:
        total = compute(hidden, head_in.weight, head_in.bias)
    aux = head_in.outputs.get("aux_loss")
    if aux is not None:
        total = total + aux_loss_coef(model) * aux.to(total.device)
    return _without_logits(head_in.outputs, total)
