"""One-call patching of HuggingFace models: ``apply_t3s(model)`` / ``revert_t3s(model)``.

A patched model, in training with labels, runs its own forward with the LM head captured
(capture.py): the head's input is kept, and the fused op evaluates the head on it with the model's
own head math (logit scale, soft cap, vocabulary truncation; head.py); the model's own extra loss
terms are added as the unpatched model adds them (the MoE router auxiliary loss, with the model's
coefficient; forward.py). The output is the model's own output class with ``logits=None``. In eval
mode, or without labels, it is the unpatched model exactly (logits, ``logits_to_keep``, caches).

Exact or refused. What the patch cannot reproduce it refuses at ``apply_t3s`` time, naming the
reason (refusals.py): wrapped models (DDP, FSDP1, DeepSpeed, torch.compile: patch the inner model
first), heads that are not exactly ``nn.Linear``, models that do not shift their labels (causal
mode), in-model z-losses over unlabelled positions, a user-set ``loss_function``. Two nets catch
what the registry misses:

- the *probe*: every patched forward checks that what the model did to the probe row after
  the head equals the declared head math (cost: one V-element row; capture.py);
- the *equivalence check* (``check=True``, the default; equivalence.py): ``apply_t3s`` runs the
  unpatched and the patched forward on a tiny random batch and compares the losses.

The files, one job each: state.py (what the patch records on a model), head.py (the LM head and its
head math), capture.py (the head captured; ``capture_head_inputs``, which scoring uses too),
distributed.py (FSDP2 / FSDP1 / tensor-parallel heads), attention.py (the masks a masked-diffusion
student is given and the check that it attends by them), refusals.py, forward.py (the patched
forward), equivalence.py (the patch-time check), apply.py (apply / revert). Packed batches are
prepared by ``adapters/packing.py``.
"""

from .apply import MODES, SET_BY_PATCH, apply_t3s, revert_t3s
from .attention import capture_diffusion_head_inputs
from .capture import HeadInputs, capture_head_inputs
from .equivalence import check_t3s_patch
from .head import HeadMath, head_math, lm_head
from .refusals import ANCHORS
from .state import is_t3s_patched, patch_block_size, patch_mode

__all__ = ["apply_t3s", "revert_t3s", "is_t3s_patched", "patch_mode", "check_t3s_patch", "capture_head_inputs",
           "HeadInputs", "HeadMath", "head_math", "lm_head", "MODES", "ANCHORS", "SET_BY_PATCH", "patch_block_size",
           "capture_diffusion_head_inputs"]
