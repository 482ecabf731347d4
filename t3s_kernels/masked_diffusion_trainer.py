"""HF ``Trainer`` for a masked-diffusion student patched with ``apply_t3s(model, mode="masked_diffusion")``.

The noising happens when a step's micro-batches are drawn (``get_batch_samples``), not in each
``compute_loss``: so the normalizer of the whole step (examples for ``llada_sft``, positions for
``llada_pretrain``, masked tokens for ``masked_tokens``) is known before any micro-batch's loss,
each micro-batch's weighted sum is divided by it, and the accumulated gradient equals that of
one batch as large, for every normalization (``llada_pretrain`` counts padded positions: equal
for micro-batches padded to one length, as packed pretraining data is). Under data parallelism
with ``average_tokens_across_devices`` the normalizer is summed over ranks, as HF Trainer does
with its own token count.

Conventions, each as its authors' trainer sets it (docs/method.md gives the sources):

  * ``LLADA``: LLaDA 1 / MDLM SFT: ``weighting="inverse_p"``, ``normalization="llada_sft"``,
    t ~ U(eps, 1) per sequence; full attention.
  * ``LLADA2``: LLaDA 2.0 with full attention: one rate per sequence from U(0.3, 0.8), no 1/t, the
    per-sequence masked mean.
  * ``LLADA2_BLOCK``: LLaDA 2.0's SFT (dFactory): the same, with block diffusion: patch with
    ``apply_t3s(model, mode="masked_diffusion", block_size=32)``; padding labelled (maskable, trained,
    attended like any token), as LLaDA 2.0 pads.
  * ``BD3LM``: BD3-LM: one rate per block, the 1/t weight, the mean over answer tokens, labelled
    padding; block diffusion as above.

``padding``: "dropped" (default: padded positions are never masked, never attended) or "labelled"
(the pad token is a token: LLaDA 2.0 and BD3-LM). ``rate``: one masking rate per "sequence" or per
"block" (the patch's ``block_size``). A model patched with ``block_size`` gets ``[x_t ; x_0]`` and
its block mask from the patch: this module passes the clean ids beside the noisy ones.

Only ``MaskedDiffusionTrainer`` needs transformers (the ``hf`` extra); it is built on first use, so
the loss pieces import without it.
"""

from __future__ import annotations

from typing import Optional

import torch

from .adapters.masked_diffusion import NORMALIZATIONS, WEIGHTINGS, NoisedBatch, loss_weights, noise
from .adapters.packing import is_packed, segment_ids
from .extras import require
from .patching import patch_block_size, patch_mode
from .trainer_utils import FORCE_COLUMN, KEEP_COLUMN

NOISED_KEYS = ("t3s_noisy_ids", "t3s_masked", "t3s_p_mask", "t3s_answer", "t3s_forced", "t3s_segments")


PADDINGS = ("dropped", "labelled")
RATES = ("sequence", "block")


def check_conventions(*, weighting: str, normalization: str, padding: str = "dropped", rate: str = "sequence",
                      block_size: Optional[int] = None) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}; got {normalization!r}")
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}; got {padding!r}")
    if rate not in RATES:
        raise ValueError(f"rate must be one of {RATES}; got {rate!r}")
    if rate == "block" and block_size is None:
        raise ValueError("rate='block' draws one rate per block: patch the model with apply_t3s(model, "
                         "mode='masked_diffusion', block_size=...)")


def _model_attention_mask(inputs: dict, padding: str):
    """The attention mask the model is given: the collator's, or none where padding is labelled (attended
    like any token)."""
    return None if padding == "labelled" else inputs.get("attention_mask")


def noise_inputs(inputs: dict[str, torch.Tensor], *, mask_token_id: int, rate_range=None, eps: float = 1e-3,
                 padding: str = "dropped", rate_block_size: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> NoisedBatch:
    """The forward process on a collated batch: the answer is what ``prompt_length`` and the labels
    (-100 on the prompt) allow, never the prompt; ``t3s_force_mask`` is forced in. With
    ``padding="labelled"`` the padded positions are answer positions too (their target is the pad token
    the collator put there); ``rate_block_size`` draws one rate per block."""
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}; got {padding!r}")
    prompt_lengths, labels = inputs.get("prompt_length"), inputs.get("labels")
    if prompt_lengths is None and labels is None:
        raise ValueError("masked-diffusion training needs the prompt: a 'prompt_length' column, or 'labels' "
                         "with -100 on the prompt; prompt tokens are never masked")
    if KEEP_COLUMN in inputs:
        raise ValueError(f"the batch has '{KEEP_COLUMN}', an AR keep-mask; a masked-diffusion student takes a force "
                         f"set ('{FORCE_COLUMN}', from `t3s select --rule dllm`)")
    force = inputs.get(FORCE_COLUMN)
    attention = inputs.get("attention_mask")
    if force is not None and attention is not None:
        force = force.bool() & attention.bool()
    position_ids = inputs.get("position_ids")
    segments = segment_ids(position_ids) if is_packed(position_ids, attention) else None
    maskable = None if labels is None else labels != -100
    if padding == "labelled" and attention is not None:
        padded = ~attention.bool()
        maskable = padded if maskable is None else maskable | padded
    return noise(inputs["input_ids"], mask_token_id=mask_token_id, prompt_lengths=prompt_lengths,
                 attention_mask=_model_attention_mask(inputs, padding), maskable=maskable,
                 force_mask=None if force is None else force.bool(), rate_range=rate_range, eps=eps,
                 segments=segments, rate_block_size=rate_block_size, generator=generator)


def masked_diffusion_compute_loss(model, inputs: dict[str, torch.Tensor], *, mask_token_id: int,
                                  normalization: str = "llada_sft", weighting: str = "inverse_p",
                                  rate_range=None, padding: str = "dropped", rate: str = "sequence",
                                  generator: Optional[torch.Generator] = None,
                                  noised: Optional[NoisedBatch] = None, num_items_in_batch=None):
    """One masked-diffusion training loss for a model patched with ``mode="masked_diffusion"``:
    noise the answer tokens (:func:`noise_inputs`, or pass ``noised``), and let the fused head score
    the masked positions only.

    The weighted sum is divided by this micro-batch's normalizer (``loss_weights``), or by
    ``num_items_in_batch`` when given: the normalizer of the whole accumulation step, in the
    normalization's unit (examples for llada_sft, positions for llada_pretrain, masked tokens for
    masked_tokens; see :func:`step_normalizer`). Only the latter is exact under gradient
    accumulation for every normalization; :class:`t3s_kernels.masked_diffusion_trainer.MaskedDiffusionTrainer`
    does it for HF Trainer."""
    if patch_mode(model) != "masked_diffusion":  # a causal patch would shift the masked positions' labels
        raise ValueError("masked_diffusion_compute_loss needs a model patched with apply_t3s(model, "
                         f"mode='masked_diffusion'); this one is {patch_mode(model) or 'not patched'}")
    block_size = patch_block_size(model)
    check_conventions(weighting=weighting, normalization=normalization, padding=padding, rate=rate,
                      block_size=block_size)
    batch = noised if noised is not None else noise_inputs(
        inputs, mask_token_id=mask_token_id, rate_range=rate_range, padding=padding,
        rate_block_size=block_size if rate == "block" else None, generator=generator)
    weights, normalizer = loss_weights(batch, weighting=weighting, normalization=normalization)
    if num_items_in_batch is not None:
        normalizer = num_items_in_batch
    ids = inputs["input_ids"]
    labels = torch.where(batch.masked, ids, torch.full_like(ids, -100))
    extra = {"position_ids": inputs["position_ids"]} if "position_ids" in inputs else {}
    if block_size is not None:
        extra["t3s_clean_ids"] = ids  # x_0 beside x_t: the patch lays out [x_t ; x_0] and its block mask
    out = model(input_ids=batch.noisy_ids, attention_mask=_model_attention_mask(inputs, padding), labels=labels,
                t3s_weights=weights, num_items_in_batch=normalizer, **extra)
    return out.loss


def step_normalizer(batches: list[NoisedBatch], normalization: str) -> float:
    """The normalizer of one batch made of ``batches`` (an accumulation step's micro-batches)."""
    if normalization == "masked_tokens":  # counted over the whole step, floored at 1 once
        return float(max(sum(int(b.masked.sum()) for b in batches), 1))
    if normalization == "answer_tokens":
        return float(max(sum(int(b.answer_mask.sum()) for b in batches), 1))
    return float(sum(loss_weights(b, weighting="none", normalization=normalization)[1] for b in batches))


def pack_noised(batch: NoisedBatch) -> dict[str, torch.Tensor]:
    """A noised batch as plain tensors in the inputs dict (so that a trainer moves them to the device)."""
    forced = batch.forced if batch.forced is not None else torch.zeros_like(batch.masked)
    segments = batch.segments if batch.segments is not None else torch.zeros_like(batch.noisy_ids)
    return dict(zip(NOISED_KEYS, (batch.noisy_ids, batch.masked, batch.p_mask, batch.answer_mask, forced, segments)))


def unpack_noised(inputs: dict[str, torch.Tensor]) -> NoisedBatch:
    noisy, masked, p_mask, answer, forced, segments = (inputs.pop(k) for k in NOISED_KEYS)
    return NoisedBatch(noisy_ids=noisy, masked=masked, p_mask=p_mask, answer_mask=answer, forced=forced,
                       segments=segments if bool(segments.any()) else None)


LLADA = dict(weighting="inverse_p", normalization="llada_sft", rate_range=None)
LLADA2 = dict(weighting="none", normalization="sequence_masked_mean", rate_range=(0.3, 0.8))
LLADA2_BLOCK = dict(LLADA2, padding="labelled")  # with apply_t3s(..., block_size=32)
BD3LM = dict(weighting="inverse_p", normalization="answer_tokens", rate_range=None, rate="block", padding="labelled")


def _trainer_class():
    """``MaskedDiffusionTrainer``, a subclass of transformers' ``Trainer``, made once transformers is there."""
    Trainer = require("transformers", "MaskedDiffusionTrainer").Trainer

    class MaskedDiffusionTrainer(Trainer):
        """``Trainer`` with the masked-diffusion loss; see the module docstring for the options."""

        def __init__(self, *args, mask_token_id: int, weighting: str = "inverse_p", normalization: str = "llada_sft",
                     rate_range: Optional[tuple[float, float]] = None, eps: float = 1e-3, seed: int = 0,
                     padding: str = "dropped", rate: str = "sequence", **kwargs):
            model = kwargs.get("model", args[0] if args else None)
            check_conventions(weighting=weighting, normalization=normalization, padding=padding, rate=rate,
                              block_size=None if model is None else patch_block_size(model))
            super().__init__(*args, **kwargs)
            self.mask_token_id, self.weighting, self.normalization = mask_token_id, weighting, normalization
            self.rate_range, self.eps, self.seed, self.padding, self.rate = rate_range, eps, seed, padding, rate
            self._generators: dict[str, torch.Generator] = {}
            self.loss_is_scaled_for_ga = True  # each micro-batch is divided by the step's normalizer

        def _generator(self, device: torch.device) -> torch.Generator:
            key = str(device)
            if key not in self._generators:
                rank = self.args.process_index
                self._generators[key] = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + rank)
            return self._generators[key]

        def _noise(self, inputs):
            block_size = patch_block_size(self.model) if self.rate == "block" else None
            return noise_inputs(inputs, mask_token_id=self.mask_token_id, rate_range=self.rate_range, eps=self.eps,
                                padding=self.padding, rate_block_size=block_size,
                                generator=self._generator(inputs["input_ids"].device))

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
            noised = []
            for b in batches:
                nb = self._noise(b)
                b.update(pack_noised(nb))
                noised.append(nb)
            total = torch.tensor(step_normalizer(noised, self.normalization), device=device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                total = self.accelerator.gather(total).sum()
            return batches, total

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if NOISED_KEYS[0] in inputs:  # a training micro-batch, noised with its step
                noised = unpack_noised(inputs)
            else:  # evaluation: noised here, normalized on its own
                noised = self._noise(inputs)
                num_items_in_batch = None
            loss = masked_diffusion_compute_loss(model, inputs, mask_token_id=self.mask_token_id,
                                                 normalization=self.normalization, weighting=self.weighting,
                                                 padding=self.padding, rate=self.rate, noised=noised,
                                                 num_items_in_batch=num_items_in_batch)
            if num_items_in_batch is not None and self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.args.world_size  # the normalizer is global; data parallelism averages gradients
            return (loss, None) if return_outputs else loss

    MaskedDiffusionTrainer.__qualname__ = "MaskedDiffusionTrainer"  # pickled by this module's name
    return MaskedDiffusionTrainer


def __getattr__(name: str):
    if name == "MaskedDiffusionTrainer":  # the class is made on first use: it needs transformers
        cls = _trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
