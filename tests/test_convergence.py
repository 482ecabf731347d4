"""Convergence on mini models: train patched and unpatched from the same seed for a few dozen
AdamW steps; losses, final parameters and per-token log-probabilities agree.

Tolerances (fp32): one step's loss and gradients agree to ~1e-6 relative (test_patching);
over 30 Adam steps the differences seen are up to 3e-7 relative on the losses, 3e-6 absolute
on the parameters (lr = 1e-3 moves each by up to 3e-2) and 1e-6 on the log-probabilities.
The bounds leave a 10-30x margin: 1e-5, 5e-5 and 2e-5."""

import pytest
import torch
import torch.nn.functional as F

import t3s_kernels as t3s
from tests.helpers import assert_close
from tests.models import batch, tiny_model

pytest.importorskip("transformers")
STEPS = 30


def train(family, patched, use_mask):
    model = tiny_model(family, seed=0).train()
    if patched:
        t3s.apply_t3s(model, backend="torch")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(STEPS):
        ids, labels, mask = batch(b=4, t=16, seed=100 + step % 3)  # three batches, in turn
        if patched:
            out = model(input_ids=ids, labels=labels, t3s_weights=mask if use_mask else None)
            loss = out.loss
            assert out.logits is None
        else:
            target = labels if not use_mask else torch.where(mask, labels, torch.full_like(labels, -100))
            logits = model(input_ids=ids).logits.float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    model.eval()
    ids, labels, _ = batch(b=2, t=16, seed=999)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()  # eval: the patched model gives logits as usual
    logprobs = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.stack(losses), dict(model.named_parameters()), logprobs


@pytest.mark.parametrize("use_mask", [False, True], ids=["all_tokens", "t3s_mask"])
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_patched_training_matches_unpatched(family, use_mask):
    ref_losses, ref_params, ref_logprobs = train(family, patched=False, use_mask=use_mask)
    losses, params, logprobs = train(family, patched=True, use_mask=use_mask)
    assert ref_losses[-3:].mean() < ref_losses[:3].mean() - 0.1  # it did learn the three batches
    assert_close(losses, ref_losses, 1e-5, "losses")
    for name, p in ref_params.items():
        assert (params[name] - p).abs().max().item() <= 5e-5, name
    assert (logprobs - ref_logprobs).abs().max().item() <= 2e-5
