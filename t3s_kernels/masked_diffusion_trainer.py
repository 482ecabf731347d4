"""HF ``Trainer`` for a masked-diffusion student patched with ``apply_t3s(model, mode="masked_diffusion")``.

The noising happens when a step's micro-batches are drawn (``get_batch_samples``), not in each
``compute_loss``: so the normalizer of the whole step (examples for ``llada_sft``, positions for
``llada_pretrain``, masked tokens for ``masked_tokens``) is known before any micro-batch's loss,
each micro-batch's weighted sum is divided by it, and the accumulated gradient equals that of
one batch as large, for every normalization (``llada_pretrain`` counts padded positions: equal
for micro-batches padded to one length, as packed pretraining data is). Under data parallelism
with ``average_tokens_across_devices`` the normalizer is summed over ranks, as HF Trainer does
with its own token count.

Conventions: LLaDA (``weighting="inverse_p"``, ``normalization="llada_sft"``, t ~ U(eps, 1)) by
default; LLaDA 2.0 is ``rate_range=(0.3, 0.8), weighting="none", normalization="masked_tokens"``
(``LLADA2``). Block diffusion (LLaDA 2.0's noisy and clean halves with block size 32) is not
supported.
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers import Trainer

from .adapters.masked_diffusion import NORMALIZATIONS, WEIGHTINGS
from .trainer_utils import (
    NOISED_KEYS,
    masked_diffusion_compute_loss,
    noise_inputs,
    pack_noised,
    step_normalizer,
    unpack_noised,
)

LLADA = dict(weighting="inverse_p", normalization="llada_sft", rate_range=None)
LLADA2 = dict(weighting="none", normalization="masked_tokens", rate_range=(0.3, 0.8))


class MaskedDiffusionTrainer(Trainer):
    """``Trainer`` with the masked-diffusion loss; see the module docstring for the options."""

    def __init__(self, *args, mask_token_id: int, weighting: str = "inverse_p", normalization: str = "llada_sft",
                 rate_range: Optional[tuple[float, float]] = None, eps: float = 1e-3, seed: int = 0, **kwargs):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}; got {normalization!r}")
        super().__init__(*args, **kwargs)
        self.mask_token_id, self.weighting, self.normalization = mask_token_id, weighting, normalization
        self.rate_range, self.eps, self.seed = rate_range, eps, seed
        self._generators: dict[str, torch.Generator] = {}
        self.loss_is_scaled_for_ga = True  # each micro-batch is divided by the step's normalizer

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            rank = self.args.process_index
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + rank)
        return self._generators[key]

    def _noise(self, inputs):
        return noise_inputs(inputs, mask_token_id=self.mask_token_id, rate_range=self.rate_range, eps=self.eps,
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
                                             noised=noised, num_items_in_batch=num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.args.world_size  # the normalizer is global; data parallelism averages gradients
        return (loss, None) if return_outputs else loss
