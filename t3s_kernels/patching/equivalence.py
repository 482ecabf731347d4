"""The patch-time equivalence check: the unpatched and the patched forward of a model on a tiny random
batch, compared; a mismatch refuses the patch. The net under the head-math registry (head.py)."""

from __future__ import annotations

import warnings

import torch

from ..api import TEACHER_ROW_INPUTS, T3SLoss
from .capture import accepts, unit_roundoff
from .forward import fused_forward
from .head import head_math, lm_head, model_configs
from .state import original_forward, patch_state

# The loss options the check keeps: where the patched loss runs; the unpatched model computes plain
# cross-entropy, so no smoothing, z-loss or distillation.
_RUN_OPTIONS = ("backend", "chunk_budget_bytes")


def _check_batch(model, seq_len: int = 16, batch_size: int = 2, seed: int = 0):
    head = lm_head(model)
    vocab = min(head.out_features, head_math(model).vocab_size or head.out_features)
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
    state, so dropout and router noise draw the same) and raise ``ValueError`` if their losses (or
    MoE auxiliary losses) differ. Cost: two forward passes of a 2 x 16 batch, no backward.

    The patched side runs with the plain loss (no smoothing, z-loss or distillation: the
    unpatched model computes plain cross-entropy), on the backend the patch uses.
    Tolerance: 1e-5 relative for float32 heads; for half-precision heads the unpatched model
    rounds its logits to 8 (bf16) or 11 (fp16) bits before the loss while the fused op keeps
    them in float32, which moves a cross-entropy by at most 2 u max|z| (u the unit roundoff).
    """
    name = type(model).__name__
    state = patch_state(model)
    mode = state["mode"]
    if mode != "causal":
        return  # masked-diffusion students have no unpatched loss of the same meaning to compare with
    original = original_forward(model)
    ids, labels = _check_batch(model, seed=seed)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    if accepts(original, "use_cache"):
        kwargs["use_cache"] = False
    if any(hasattr(cfg, "output_router_logits") for cfg in model_configs(model)) and accepts(original,
                                                                                            "output_router_logits"):
        kwargs["output_router_logits"] = True
    plain = T3SLoss(**{k: v for k, v in state["loss"].options.items() if k in _RUN_OPTIONS})
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
                got = fused_forward(model, plain, mode, state["shift"], (), kwargs, labels=labels, shift_labels=None,
                                    t3s_weights=None, num_items_in_batch=None,
                                    teacher=dict.fromkeys(TEACHER_ROW_INPUTS))
            except (TypeError, ValueError):
                raise
            except Exception as e:  # said with its cause, at patch time rather than in training
                raise ValueError(f"apply_t3s: the patched {name} failed on a tiny random batch where the unpatched "
                                 f"model ran ({type(e).__name__}: {str(e).splitlines()[0][:200]}); refused") from e
    finally:
        model.train(was_training)
    logits = ref.logits.float()
    tol = 1e-5 + 4 * unit_roundoff(ref.logits.dtype) * logits.abs().max().item() / max(abs(ref.loss.item()), 1e-6)
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
