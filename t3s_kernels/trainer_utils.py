"""What a HuggingFace-style trainer needs to feed T3S masks: a collator that pads (or packs) the
mask column. (The masked-diffusion ``compute_loss`` sits with its trainer, masked_diffusion_trainer.py.)"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .patching import ANCHORS, is_t3s_patched, patch_mode
from .pipeline.selection import COLUMNS

KEEP_COLUMN, FORCE_COLUMN = COLUMNS["keep"], COLUMNS["force_mask"]


def _column_dtype(features: list[dict[str, Any]], key: str) -> torch.dtype:
    """bool when every example's entries are bool, float32 when every example's are numbers; mixed refused."""
    kinds = set()
    for f in features:
        t = torch.as_tensor(f[key])
        if t.numel():
            kinds.add("bool" if t.dtype == torch.bool else "number")
    if len(kinds) > 1:
        raise ValueError(f"'{key}' mixes bool masks and numeric weights across the batch's examples; use one kind")
    return torch.float32 if kinds == {"number"} else torch.bool


class T3SDataCollator:
    """Pads ``input_ids`` (with ``pad_token_id``), ``labels`` (with -100), ``attention_mask`` and a
    T3S mask column, right-padding to the longest example. The two mask columns mean different
    things and each trainer takes only its own (``pipeline.selection.COLUMNS``):

    * ``t3s_weights``: an AR keep-mask (bool: True keeps a token in the loss) or float loss
      weights. With ``anchors="ignore"`` (the default) a token of weight 0 also gets label -100:
      exactly "anchors get label -100", the usual implementation and what the method's loss means,
      so HF Trainer's ``num_items_in_batch`` counts the kept tokens only and the loss is the mean
      over kept tokens, exact under gradient accumulation. ``anchors="count"`` leaves the labels:
      the summed loss over kept tokens is then divided by every label token, anchors included.
    * ``t3s_force_mask``: a masked-diffusion force set (bool), padded with False.

    Give it the model: a batch with a mask column for a model that is not patched raises, since an
    unpatched model (and HF Trainer's column pruning) would drop the column silently. A wrapper of a
    patched model (a PEFT model whose base model is patched, DDP, torch.compile) is patched.

    ``packed=True`` flattens the batch into one row without padding (for flash-attn's varlen
    kernels, or transformers' packed masks on eager/SDPA): ``position_ids`` restart at 0 for each
    example, no ``attention_mask``, the mask column concatenated alike, and for a causal student
    each example's first token labelled -100, so that no sequence predicts the next one's first
    token (HF's ``DataCollatorWithFlattening`` does the same); a masked-diffusion student (the model
    patched with ``mode="masked_diffusion"``) keeps its labels, since it does not shift.
    """

    def __init__(self, pad_token_id: int, model: Optional[torch.nn.Module] = None, ignore_index: int = -100,
                 anchors: str = "ignore", packed: bool = False):
        if anchors not in ANCHORS:
            raise ValueError(f"anchors must be one of {ANCHORS}; got {anchors!r}")
        if pad_token_id is None:
            raise ValueError("pad_token_id is None (the tokenizer has no pad token): pass "
                             "pad_token_id=tokenizer.eos_token_id, or set tokenizer.pad_token first")
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise TypeError(f"pad_token_id must be a token id (an int >= 0); got {pad_token_id!r}")
        if packed and model is None:
            raise ValueError("packed=True needs the model (model=...): a causal student's packed labels drop each "
                             "example's first token, a masked-diffusion student's keep it, and the model says which")
        self.pad_token_id = pad_token_id
        self.model = model
        self.ignore_index = ignore_index
        self.anchors = anchors
        self.packed = bool(packed)

    def _check_mask_columns(self, features: list[dict[str, Any]]) -> Optional[str]:
        present = [c for c in (KEEP_COLUMN, FORCE_COLUMN) if any(c in f for f in features)]
        if len(present) > 1:
            raise ValueError(f"the batch has both '{KEEP_COLUMN}' (an AR keep-mask) and '{FORCE_COLUMN}' (a "
                             "masked-diffusion force set); a student takes one")
        if not present:
            return None
        column = present[0]
        missing = [i for i, f in enumerate(features) if column not in f]
        if missing:
            raise ValueError(f"example {missing[0]} of the batch lacks the '{column}' column that others have")
        if self.model is None:
            raise ValueError(f"the batch has a '{column}' column: give T3SDataCollator the model (model=...) so that "
                             "it can check the model is patched; an unpatched model ignores the column")
        if not is_t3s_patched(self.model):  # a wrapper (PEFT, DDP) of a patched model is patched
            raise ValueError(f"the batch has a '{column}' column but {type(self.model).__name__} is not "
                             "patched: call t3s_kernels.apply_t3s(model) first")
        return column

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("T3SDataCollator got an empty batch")
        column = self._check_mask_columns(features)
        if self.packed:
            _check_packable(features)
        join = _one_row if self.packed else _padded_rows

        def gather(key, dtype, fill):
            return join([_sequence(f, key, dtype) for f in features], fill)

        lengths = [len(f["input_ids"]) for f in features]
        out = {"input_ids": gather("input_ids", torch.long, self.pad_token_id)}
        if self.packed:
            out["position_ids"] = join([torch.arange(n) for n in lengths], 0)
        elif "attention_mask" in features[0]:
            out["attention_mask"] = gather("attention_mask", torch.long, 0)
        else:
            out["attention_mask"] = join([torch.ones(n, dtype=torch.long) for n in lengths], 0)
        if "labels" in features[0]:
            out["labels"] = gather("labels", torch.long, self.ignore_index)
            if self.packed and patch_mode(self.model) != "masked_diffusion":
                # the causal shift must not cross a boundary: each example's first token is no target
                out["labels"][0, torch.tensor([0] + lengths[:-1]).cumsum(0)] = self.ignore_index
        if column == KEEP_COLUMN:
            out[column] = gather(column, _column_dtype(features, column), 0)
            if self.anchors == "ignore" and "labels" in out:
                out["labels"] = out["labels"].masked_fill(out[column] == 0, self.ignore_index)
        elif column == FORCE_COLUMN:
            if _column_dtype(features, column) != torch.bool:
                raise ValueError(f"'{column}' is a force set: bool per token (True forces a token into the mask)")
            out[column] = gather(column, torch.bool, False)
        if "prompt_length" in features[0]:
            out["prompt_length"] = torch.tensor([f["prompt_length"] for f in features], dtype=torch.long)
        return out


def _sequence(feature: dict[str, Any], key: str, dtype: torch.dtype) -> torch.Tensor:
    """One example's ``key`` as a 1-D tensor, as long as its input_ids."""
    seq = torch.as_tensor(feature[key], dtype=dtype)
    if seq.shape[0] != len(feature["input_ids"]):
        raise ValueError(f"'{key}' has {seq.shape[0]} entries but input_ids has {len(feature['input_ids'])}")
    return seq


def _padded_rows(seqs: list[torch.Tensor], fill) -> torch.Tensor:
    longest = max(s.shape[0] for s in seqs)
    return torch.stack([torch.cat([s, torch.full((longest - s.shape[0],), fill, dtype=s.dtype)]) for s in seqs])


def _one_row(seqs: list[torch.Tensor], fill) -> torch.Tensor:
    """The sequences back to back in one row (a packed batch: nothing to fill)."""
    return torch.cat(seqs)[None]


def _check_packable(features: list[dict[str, Any]]) -> None:
    if "prompt_length" in features[0]:
        raise ValueError("'prompt_length' cannot describe a packed row; give 'labels' with -100 on the prompt")
    for i, f in enumerate(features):
        if "attention_mask" in f and not all(int(a) == 1 for a in f["attention_mask"]):
            raise ValueError(f"example {i} has padding in its attention_mask; a packed batch has none")
