"""Pieces a HuggingFace-style trainer needs to feed T3S masks: a padding collator for the
mask column, and the masked-diffusion ``compute_loss``."""

from __future__ import annotations

from typing import Any, Optional

import torch

from .adapters.masked_diffusion import loss_weights, noise
from .patching import is_t3s_patched

MASK_COLUMN = "t3s_weights"


def train_and_report(trainer) -> list[float]:
    """Run ``trainer.train()``, print the logged training losses, return them (the recipes' ending)."""
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"trained {result.global_step} steps; logged losses: {', '.join(f'{x:.3f}' for x in losses)}")
    return losses


class T3SDataCollator:
    """Pads ``input_ids`` (with ``pad_token_id``), ``labels`` (with -100), ``attention_mask``
    and the T3S mask column ``t3s_weights`` (bool or float per token, padded with 0/False),
    right-padding to the longest example.

    Give it the model: a batch with a mask column for a model that is not patched raises,
    since an unpatched model (and HF Trainer's column pruning) would drop it silently.
    """

    def __init__(self, pad_token_id: int, model: Optional[torch.nn.Module] = None, ignore_index: int = -100):
        self.pad_token_id = pad_token_id
        self.model = model
        self.ignore_index = ignore_index

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("T3SDataCollator got an empty batch")
        has_mask = MASK_COLUMN in features[0]
        if has_mask and self.model is not None and not is_t3s_patched(self.model):
            raise ValueError(f"the batch has a '{MASK_COLUMN}' column but {type(self.model).__name__} is not "
                             "patched: call t3s_kernels.apply_t3s(model) first")
        longest = max(len(f["input_ids"]) for f in features)

        def pad(key, value, dtype):
            rows = []
            for f in features:
                seq = torch.as_tensor(f[key], dtype=dtype)
                if seq.shape[0] != len(f["input_ids"]):
                    raise ValueError(f"'{key}' has {seq.shape[0]} entries but input_ids has {len(f['input_ids'])}")
                rows.append(torch.cat([seq, torch.full((longest - seq.shape[0],), value, dtype=dtype)]))
            return torch.stack(rows)

        out = {"input_ids": pad("input_ids", self.pad_token_id, torch.long)}
        out["attention_mask"] = pad("attention_mask", 0, torch.long) if "attention_mask" in features[0] else \
            torch.stack([torch.cat([torch.ones(len(f["input_ids"]), dtype=torch.long),
                                    torch.zeros(longest - len(f["input_ids"]), dtype=torch.long)]) for f in features])
        if "labels" in features[0]:
            out["labels"] = pad("labels", self.ignore_index, torch.long)
        if has_mask:
            first = torch.as_tensor(features[0][MASK_COLUMN])
            out[MASK_COLUMN] = pad(MASK_COLUMN, 0, torch.bool if first.dtype == torch.bool else torch.float32)
        for key in ("prompt_length",):
            if key in features[0]:
                out[key] = torch.tensor([f[key] for f in features], dtype=torch.long)
        return out


def masked_diffusion_compute_loss(model, inputs: dict[str, torch.Tensor], *, mask_token_id: int,
                                  normalization: str = "llada_sft", weighting: str = "inverse_p",
                                  rate_range=None, generator: Optional[torch.Generator] = None):
    """One masked-diffusion training loss for a model patched with ``mode="masked_diffusion"``:
    noise the answer tokens (forcing the T3S-selected ones), and let the fused head score the
    masked positions only. Use it in ``Trainer.compute_loss`` (see integrations/)."""
    if not is_t3s_patched(model):
        raise ValueError("masked_diffusion_compute_loss needs a model patched with apply_t3s(model, "
                         "mode='masked_diffusion')")
    ids = inputs["input_ids"]
    prompt_lengths, labels = inputs.get("prompt_length"), inputs.get("labels")
    if prompt_lengths is None and labels is None:
        raise ValueError("masked_diffusion_compute_loss needs the prompt: a 'prompt_length' column, or 'labels' "
                         "with -100 on the prompt; prompt tokens are never masked")
    maskable = None if labels is None else labels != -100
    force = inputs.get(MASK_COLUMN)
    if force is not None:
        force = force.bool() & inputs["attention_mask"].bool()
    batch = noise(ids, mask_token_id=mask_token_id, prompt_lengths=prompt_lengths,
                  attention_mask=inputs.get("attention_mask"), maskable=maskable, force_mask=force,
                  rate_range=rate_range, generator=generator)
    weights, normalizer = loss_weights(batch, weighting=weighting, normalization=normalization)
    labels = torch.where(batch.masked, ids, torch.full_like(ids, -100))
    out = model(input_ids=batch.noisy_ids, attention_mask=inputs.get("attention_mask"), labels=labels,
                t3s_weights=weights, num_items_in_batch=normalizer)
    return out.loss
