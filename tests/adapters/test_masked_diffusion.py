"""The masked-diffusion adapter against a direct eager transcription of each convention
(docs/method.md): the forward process, the loss and its gradients."""

import pytest
import torch

import t3s_kernels.adapters.masked_diffusion as md
from tests.helpers import assert_close, count_head_rows

B, T, H, V, MASK = 4, 13, 16, 97, 96


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V - 1, (B, T), generator=g)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).float()
    weight = torch.randn(V, H, generator=g) * 0.4
    prompt = torch.tensor([2, 0, 5, 3])
    return ids, hidden, weight, prompt


def test_noise_never_masks_prompts_and_always_masks_forced():
    ids, _, _, prompt = inputs()
    force = torch.zeros(B, T, dtype=torch.bool)
    force[0, 2], force[2, 12], force[3, 5] = True, True, True
    for seed in range(20):
        nb = md.noise(ids, mask_token_id=MASK, prompt_lengths=prompt, force_mask=force,
                      generator=torch.Generator().manual_seed(seed))
        positions = torch.arange(T)[None, :]
        assert not (nb.masked & (positions < prompt[:, None])).any()
        assert (nb.masked[force]).all()
        assert torch.equal(nb.noisy_ids[nb.masked], torch.full((int(nb.masked.sum()),), MASK))
        assert torch.equal(nb.noisy_ids[~nb.masked], ids[~nb.masked])
        p = nb.p_mask[nb.answer_mask]
        assert ((p >= 1e-3) & (p <= 1)).all()


def test_noise_is_reproducible_and_rate_range():
    ids, _, _, prompt = inputs()
    a = md.noise(ids, mask_token_id=MASK, generator=torch.Generator().manual_seed(3))
    b = md.noise(ids, mask_token_id=MASK, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.masked, b.masked)
    c = md.noise(ids, mask_token_id=MASK, rate_range=(0.3, 0.8), generator=torch.Generator().manual_seed(3))
    assert ((c.p_mask >= 0.3) & (c.p_mask <= 0.8)).all()


def test_noise_rejects_bad_input():
    ids, _, _, prompt = inputs()
    force = torch.zeros(B, T, dtype=torch.bool)
    force[0, 0] = True  # a prompt position
    with pytest.raises(ValueError, match="force_mask selects prompt"):
        md.noise(ids, mask_token_id=MASK, prompt_lengths=prompt, force_mask=force)
    with pytest.raises(ValueError, match=r"mask_token_id must lie in \[0, vocab_size\)"):
        md.noise(ids, mask_token_id=V, vocab_size=V)
    with pytest.raises(ValueError, match="force_mask must be a bool tensor of shape"):
        md.noise(ids, mask_token_id=MASK, force_mask=force[:, 1:])
    with pytest.raises(ValueError, match="prompt_lengths must have shape"):
        md.noise(ids, mask_token_id=MASK, prompt_lengths=prompt[:2])


def eager(hidden, weight, ids, nb, *, weighting, normalization, shift=None, exclude=False):
    """The reference formulas, written out with full logits in float64."""
    h, w = hidden.double(), weight.double()
    if shift == "dream":
        h = torch.cat([h[:, :1], h[:, :-1]], 1)
    logits = h @ w.t()
    if exclude:
        logits[..., MASK] = float("-inf")
    ce = -torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    term = torch.where(nb.masked, ce, torch.zeros_like(ce))
    if weighting == "inverse_p":
        term = torch.where(nb.masked, term / nb.p_mask.double(), term)
    if normalization == "llada_pretrain":
        return term.sum() / (B * T)
    if normalization == "llada_sft":
        answer_len = nb.answer_mask.sum(1).double()
        return (term.sum(1) / answer_len).sum() / B
    if normalization == "sequence_masked_mean":  # each sequence's mean over its masked tokens, averaged
        return (term.sum(1) / nb.masked.sum(1).clamp(min=1).double()).sum() / B
    if normalization == "answer_tokens":
        return term.sum() / nb.answer_mask.sum()
    return term.sum() / nb.masked.sum()


@pytest.mark.parametrize("weighting,normalization,shift,exclude", [
    ("inverse_p", "llada_sft", None, False),
    ("inverse_p", "llada_pretrain", None, False),
    ("none", "masked_tokens", None, False),
    ("inverse_p", "llada_sft", "dream", False),
    ("none", "masked_tokens", None, True),
    ("none", "sequence_masked_mean", None, False),
    ("inverse_p", "answer_tokens", None, False),
])
def test_loss_conventions_match_reference(weighting, normalization, shift, exclude):
    ids, hidden, weight, prompt = inputs()
    nb = md.noise(ids, mask_token_id=MASK, prompt_lengths=prompt, generator=torch.Generator().manual_seed(1))
    x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = md.masked_diffusion_loss(x, w, ids, nb, mask_token_id=MASK, weighting=weighting,
                                   normalization=normalization, shift=shift, exclude_mask_token=exclude,
                                   backend="torch")
    rx, rw = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = eager(rx, rw, ids, nb, weighting=weighting, normalization=normalization, shift=shift, exclude=exclude)
    assert_close(out.loss, ref, 1e-5, "loss")
    gx, gw = torch.autograd.grad(out.loss, (x, w))
    rgx, rgw = torch.autograd.grad(ref, (rx, rw))
    assert_close(gx, rgx, 1e-5, "dX")
    assert_close(gw, rgw, 1e-5, "dW")


def test_head_sees_only_masked_rows(monkeypatch):
    ids, hidden, weight, prompt = inputs()
    nb = md.noise(ids, mask_token_id=MASK, prompt_lengths=prompt, generator=torch.Generator().manual_seed(2))
    seen = count_head_rows(monkeypatch)
    md.masked_diffusion_loss(hidden.requires_grad_(), weight, ids, nb, mask_token_id=MASK, backend="torch")
    assert seen == [int(nb.masked.sum())] and seen[0] < B * T


def test_loss_rejects_bad_options():
    ids, hidden, weight, _ = inputs()
    nb = md.noise(ids, mask_token_id=MASK)
    with pytest.raises(ValueError, match="normalization must be one of"):
        md.masked_diffusion_loss(hidden, weight, ids, nb, mask_token_id=MASK, normalization="mean")
    with pytest.raises(ValueError, match="weighting must be one of"):
        md.masked_diffusion_loss(hidden, weight, ids, nb, mask_token_id=MASK, weighting="1/t")
    with pytest.raises(ValueError, match=r"mask_token_id must lie in \[0, V\)"):
        md.masked_diffusion_loss(hidden, weight, ids, nb, mask_token_id=V)


def test_forced_tokens_weigh_one_under_inverse_p():
    """A token masked with probability 1 has importance weight 1; ordinary masked tokens 1/p;
    ``inverse_p_all`` keeps 1/p on forced tokens too, by explicit choice."""
    ids, _, _, prompt = inputs()
    force = torch.zeros(B, T, dtype=torch.bool)
    force[0, 3], force[1, 7], force[3, 9] = True, True, True
    nb = md.noise(ids, mask_token_id=MASK, prompt_lengths=prompt, force_mask=force,
                  generator=torch.Generator().manual_seed(4))
    w, _ = md.loss_weights(nb, weighting="inverse_p", normalization="masked_tokens")
    assert torch.equal(w[force], torch.ones(3))
    ordinary = nb.masked & ~force
    assert ordinary.any()
    assert_close(w[ordinary], 1.0 / nb.p_mask[ordinary], 1e-7, "1/p")
    w_all, _ = md.loss_weights(nb, weighting="inverse_p_all", normalization="masked_tokens")
    assert_close(w_all[force], 1.0 / nb.p_mask[force], 1e-7, "1/p on forced")
    assert (w_all[force] > 1).all()


def test_the_expected_weight_of_every_answer_token_is_one():
    """Over many draws of the masking, E[1[masked] * w] = 1 for ordinary and forced tokens alike."""
    ids, _, _, prompt = inputs()
    force = torch.zeros(B, T, dtype=torch.bool)
    force[2, 8] = True
    total = torch.zeros(B, T)
    draws = 4000
    g = torch.Generator().manual_seed(0)
    for _ in range(draws):
        nb = md.noise(ids, mask_token_id=MASK, prompt_lengths=prompt, force_mask=force, generator=g, eps=0.2)
        w, _ = md.loss_weights(nb, weighting="inverse_p", normalization="masked_tokens")
        total += torch.where(nb.masked, w, torch.zeros_like(w))
    mean = total / draws
    answer = nb.answer_mask
    assert abs(mean[2, 8].item() - 1.0) < 1e-6
    assert (mean[answer] - 1).abs().max() < 0.25  # Monte Carlo: 4000 draws of 1/t with t >= 0.2
    assert (mean[~answer] == 0).all()


def test_maskable_positions_bound_the_answer():
    ids, _, _, _ = inputs()
    labels = ids.clone()
    labels[:, :4] = -100
    for seed in range(10):
        nb = md.noise(ids, mask_token_id=MASK, maskable=labels != -100, generator=torch.Generator().manual_seed(seed))
        assert not nb.masked[:, :4].any() and torch.equal(nb.answer_mask, labels != -100)
