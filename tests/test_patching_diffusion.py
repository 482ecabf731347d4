"""Masked-diffusion students as their authors train them: block diffusion (LLaDA 2.0, BD3-LM) through the
patched model against the unpatched model's own logits on the same noise and the same mask (the mask
written here from its definition), the attention check on stand-ins that attend as real model code
does (tests/standins.py), and the conventions a model's type fixes.

Tolerances as every patch test: loss 1e-5, every gradient 1e-4 (fp32, sums in another order)."""

import pytest
import torch
import torch.nn.functional as F

import t3s_kernels as t3s
from t3s_kernels.adapters import block_diffusion as bd
from t3s_kernels.adapters.masked_diffusion import loss_weights
from t3s_kernels.masked_diffusion_trainer import masked_diffusion_compute_loss, noise_inputs
from t3s_kernels.patching.state import patch_state
from tests.helpers import assert_close

pytest.importorskip("transformers")
from tests.standins import StandInLM  # noqa: E402 - needs transformers

MASK = 96


def rule_mask(length: int, block_size: int, key_valid=None) -> torch.Tensor:
    """The block-diffusion attention of docs/method.md, position by position (queries rows): an x_t query
    of block b sees x_t block b and x_0 blocks < b; an x_0 query of block b sees x_0 blocks <= b; padded
    keys are seen by no one, and a padded query sees itself."""
    total = 2 * length
    allowed = torch.zeros(total, total, dtype=torch.bool)
    for q in range(total):
        for k in range(total):
            q_clean, k_clean = q >= length, k >= length
            bq, bk = (q % length) // block_size, (k % length) // block_size
            if not q_clean:
                allowed[q, k] = (not k_clean and bq == bk) or (k_clean and bk < bq)
            else:
                allowed[q, k] = k_clean and bk <= bq
    allowed = allowed[None, None].repeat(1 if key_valid is None else key_valid.shape[0], 1, 1, 1)
    if key_valid is not None:
        for r in range(key_valid.shape[0]):
            for k in range(total):
                if not key_valid[r, k % length]:
                    allowed[r, 0, :, k] = False
            allowed[r, 0] |= torch.eye(total, dtype=torch.bool)
    return allowed


def batch(b=3, length=13, pad_row=1, pad=3, prompt=2, seed=0, vocab=90):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, length), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    attn = torch.ones(b, length, dtype=torch.long)
    if pad:
        attn[pad_row, -pad:] = 0
        labels[pad_row, -pad:] = -100
        ids[pad_row, -pad:] = 0
    force = torch.zeros(b, length, dtype=torch.bool)
    force[0, prompt + 1] = True
    return dict(input_ids=ids, labels=labels, attention_mask=attn, t3s_force_mask=force)


def grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


def reference_loss(model, inputs, nb, *, block_size, padding, weighting, normalization, shift=None,
                   bool_mask=False):
    """The authors' loss from the unpatched model's full logits: ``[x_t ; x_0]`` under ``rule_mask`` (as
    an additive mask, or a boolean one for a model that takes that), the first half's logits,
    cross-entropy at x_t's masked positions, weighted and normalized."""
    ids = inputs["input_ids"]
    b, length = ids.shape
    key_valid = inputs["attention_mask"].bool() if padding == "dropped" else None
    allowed = rule_mask(length, block_size, key_valid)
    mask = allowed if bool_mask else torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    positions = torch.arange(length).repeat(2)[None].expand(b, -1)
    logits = model(input_ids=torch.cat([nb.noisy_ids, ids], 1), position_ids=positions,
                   attention_mask=mask).logits[:, :length].float()
    if shift == "dream":
        logits = torch.cat([logits[:, :1], logits[:, :-1]], 1)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1), reduction="none").view(b, length)
    w, divisor = loss_weights(nb, weighting=weighting, normalization=normalization)
    return (ce * w * nb.masked).sum() / divisor


def test_the_block_mask_is_the_rule():
    for length, block_size in ((13, 4), (8, 8), (5, 1), (7, 32)):
        assert torch.equal(bd.dense_block_mask(length, block_size), rule_mask(length, block_size))
    valid = torch.tensor([[1] * 9 + [0] * 4, [1] * 13]).bool()
    assert torch.equal(bd.dense_block_mask(13, 4, valid), rule_mask(13, 4, valid))


CONVENTIONS = [  # LLaDA 2.0's, its padding dropped, BD3-LM's, LLaDA's 1/t by blocks, Dream's shift
    dict(weighting="none", normalization="sequence_masked_mean", rate_range=(0.3, 0.8), padding="labelled"),
    dict(weighting="none", normalization="sequence_masked_mean", rate_range=(0.3, 0.8), padding="dropped"),
    dict(weighting="inverse_p", normalization="answer_tokens", rate="block", padding="labelled"),
    dict(weighting="inverse_p", normalization="llada_sft", rate="block", padding="dropped"),
    dict(weighting="none", normalization="masked_tokens", rate_range=(0.3, 0.8), padding="dropped", shift="dream"),
]


@pytest.mark.parametrize("convention", CONVENTIONS, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("behaviour", ["honours", "causal_under_2d", "bool_4d"])
def test_block_diffusion_equals_the_unpatched_model(convention, behaviour):
    """Loss and every gradient of the patched model equal the authors' loss from the unpatched logits;
    the forced token is masked and trained; a padded row under "dropped" padding trains no pad."""
    convention = dict(convention)
    shift = convention.pop("shift", None)
    block_size = 4
    model = StandInLM(behaviour).train()
    inputs = batch()
    t3s.apply_t3s(model, mode="masked_diffusion", block_size=block_size, shift=shift, backend="torch")
    loss = masked_diffusion_compute_loss(model, inputs, mask_token_id=MASK,
                                         generator=torch.Generator().manual_seed(7), **convention)
    got = grads(model, loss)
    assert patch_state(model)["mask_form"] == ("bool" if behaviour == "bool_4d" else "additive")
    t3s.revert_t3s(model)
    noise_kw = {k: v for k, v in convention.items() if k in ("rate_range", "padding")}
    nb = noise_inputs(inputs, mask_token_id=MASK, generator=torch.Generator().manual_seed(7),
                      rate_block_size=block_size if convention.get("rate") == "block" else None, **noise_kw)
    assert bool(nb.masked[0, 3]), "the forced token"
    if convention["padding"] == "dropped":
        assert not bool(nb.masked[1, -3:].any())
    ref = reference_loss(model, inputs, nb, block_size=block_size, padding=convention["padding"],
                         weighting=convention["weighting"], normalization=convention["normalization"], shift=shift,
                         bool_mask=behaviour == "bool_4d")
    assert_close(loss, ref, 1e-5, "loss")
    for k, (a, e) in enumerate(zip(got, grads(model, ref))):
        assert_close(a, e, 1e-4, f"gradient {k}")


def test_a_block_rate_is_drawn_per_block():
    inputs = batch(b=2, length=16, pad=0)
    nb = noise_inputs(inputs, mask_token_id=MASK, rate_block_size=4, generator=torch.Generator().manual_seed(0))
    rates = nb.p_mask[:, 4:].reshape(2, 3, 4)
    assert torch.equal(rates, rates[..., :1].expand_as(rates)), "one rate a block"
    assert len(set(rates[..., 0].flatten().tolist())) == 6, "each block its own"


def test_flex_attention_takes_the_same_mask_as_a_block_mask():
    """A transformers model loaded with flex_attention gets a BlockMask and computes what SDPA computes with
    the 4-D additive mask (forward only: PyTorch's flex attention has no backward on a CPU)."""
    from t3s_kernels.toy import MASK_ID, tiny_bidirectional_lm

    inputs = batch(b=2, length=12, vocab=500)
    losses = []
    for attention in ("sdpa", "flex_attention"):
        model = tiny_bidirectional_lm("llama", attn_implementation=attention).train()
        t3s.apply_t3s(model, mode="masked_diffusion", block_size=4, backend="torch")
        with torch.no_grad():
            losses.append(masked_diffusion_compute_loss(model, inputs, mask_token_id=MASK_ID, weighting="none",
                                                        normalization="masked_tokens", padding="dropped",
                                                        generator=torch.Generator().manual_seed(3)))
    assert_close(losses[1], losses[0], 1e-5, "loss")


@pytest.mark.parametrize("behaviour,form", [("honours", "2d"), ("causal_under_2d", "additive"), ("bool_4d", "2d"),
                                            ("only_2d", "2d")])
def test_a_padded_batch_reaches_the_model_in_the_form_it_honours(behaviour, form):
    """Full attention, padding dropped: the check at the first padded batch finds the form of the padding
    mask the model's code honours (the collator's 2-D mask, first; a 4-D additive one where a 2-D one
    turns it causal, as LLaDA 2.0's code under transformers 4.x; the 2-D one too where a 4-D one raises,
    as LLaDA 1's), and the loss and every gradient equal the honest model's on the same weights and
    noise. (The boolean form, for a model that casts a 4-D mask to bool, is found by the block test.)"""
    inputs = batch(b=3, length=12, pad=4)
    results = []
    for who in ("honours", behaviour):
        model = StandInLM(who, seed=1).train()
        t3s.apply_t3s(model, mode="masked_diffusion", backend="torch")
        loss = masked_diffusion_compute_loss(model, inputs, mask_token_id=MASK, weighting="none",
                                             normalization="masked_tokens", generator=torch.Generator().manual_seed(2))
        results.append((loss, grads(model, loss), patch_state(model).get("mask_form")))
    (loss_0, grads_0, _), (loss_1, grads_1, chosen) = results
    assert chosen == form
    assert_close(loss_1, loss_0, 1e-6, "loss")
    for k, (a, e) in enumerate(zip(grads_1, grads_0)):
        assert_close(a, e, 1e-5, f"gradient {k}")
    if behaviour == "causal_under_2d":
        unpatched, honest = StandInLM(behaviour, seed=1), StandInLM("honours", seed=1)
        with torch.no_grad():  # without the repair, the two differ: the check above could not pass by luck
            a = unpatched(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            b = honest(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("behaviour,block_size,when,pattern", [
    ("causal", None, "patch", r"attends causally"),
    ("causal", 4, "patch", r"does not reach the noisy block 1|reaches the noisy block 0"),
    ("ignores", 4, "patch", r"reaches the noisy block 0"),
    ("ignores", None, "forward", r"ignores the padding mask.*padding='labelled'"),
    ("only_2d", 4, "patch", r"with a 4-D additive mask: its forward raised RuntimeError.*with a 4-D boolean mask: "
                            r"its forward raised RuntimeError.*takes a 4-D attention mask \(additive or boolean\) "
                            r"and position_ids"),
])
def test_a_model_that_does_not_attend_as_declared_is_refused(behaviour, block_size, when, pattern):
    model = StandInLM(behaviour).train()
    if when == "patch":
        with pytest.raises(ValueError, match=pattern):
            t3s.apply_t3s(model, mode="masked_diffusion", block_size=block_size, backend="torch")
        assert not t3s.is_t3s_patched(model)
        return
    t3s.apply_t3s(model, mode="masked_diffusion", block_size=block_size, backend="torch")  # unpadded: fine
    masked_diffusion_compute_loss(model, batch(pad=0), mask_token_id=MASK, weighting="none",
                                  normalization="masked_tokens")  # an unpadded batch: exact for this model
    for _ in range(2):  # the first padded batch is checked, and every later one until one passes
        with pytest.raises(ValueError, match=pattern):
            masked_diffusion_compute_loss(model, batch(pad=3), mask_token_id=MASK, weighting="none",
                                          normalization="masked_tokens", generator=torch.Generator().manual_seed(0))


def test_a_model_that_ignores_masks_trains_with_labelled_padding():
    """No mask is sent where padding is labelled: the mask-blind model is then exact, and accepted."""
    model = StandInLM("ignores").train()
    t3s.apply_t3s(model, mode="masked_diffusion", backend="torch")
    inputs = batch(pad=3)
    loss = masked_diffusion_compute_loss(model, inputs, mask_token_id=MASK, weighting="none",
                                         normalization="sequence_masked_mean", padding="labelled",
                                         generator=torch.Generator().manual_seed(0))
    t3s.revert_t3s(model)
    nb = noise_inputs(inputs, mask_token_id=MASK, padding="labelled", generator=torch.Generator().manual_seed(0))
    assert bool(nb.answer_mask[1, -3:].all()), "labelled padding is maskable"
    logits = model(input_ids=nb.noisy_ids).logits.float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), inputs["input_ids"].reshape(-1),
                         reduction="none").view(nb.masked.shape)
    w, divisor = loss_weights(nb, weighting="none", normalization="sequence_masked_mean")
    assert_close(loss, (ce * w * nb.masked).sum() / divisor, 1e-5, "loss")


def test_conventions_from_the_model_type():
    """Dream's type fixes its shift (position t - 1 predicts token t): by default it is taken, and a
    contradicting shift is refused; LLaDA's types refuse the Dream shift."""
    from t3s_kernels.patching.state import patch_state

    dream = StandInLM(model_type="Dream")
    t3s.apply_t3s(dream, mode="masked_diffusion", backend="torch")
    assert patch_state(dream)["shift"] == "dream"
    t3s.revert_t3s(dream)
    with pytest.raises(ValueError, match=r"shift=None contradicts StandInLM's own convention .*'Dream'"):
        t3s.apply_t3s(dream, mode="masked_diffusion", shift=None, backend="torch")
    for kind in ("llada", "llada2_moe"):
        with pytest.raises(ValueError, match="shift='dream' contradicts"):
            t3s.apply_t3s(StandInLM(model_type=kind), mode="masked_diffusion", shift="dream", backend="torch")
    plain = StandInLM()
    t3s.apply_t3s(plain, mode="masked_diffusion", backend="torch")
    assert patch_state(plain)["shift"] is None


def test_block_mode_refusals():
    model = StandInLM().train()
    with pytest.raises(ValueError, match="block_size is for block-diffusion students"):
        t3s.apply_t3s(model, block_size=4)
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        t3s.apply_t3s(model, mode="masked_diffusion", block_size=0)
    t3s.apply_t3s(model, mode="masked_diffusion", block_size=4, backend="torch")
    inputs = batch(pad=0)
    labels = torch.where(inputs["t3s_force_mask"], inputs["input_ids"], torch.full_like(inputs["input_ids"], -100))
    with pytest.raises(ValueError, match="pass the clean sequence x_0 as t3s_clean_ids"):
        model(input_ids=inputs["input_ids"], labels=labels)
    packed = torch.cat([torch.arange(6), torch.arange(7)])[None]
    with pytest.raises(ValueError, match="a packed batch cannot be trained by block diffusion"):
        model(input_ids=inputs["input_ids"][:1], labels=labels[:1], t3s_clean_ids=inputs["input_ids"][:1],
              position_ids=packed)
    t3s.revert_t3s(model)
    t3s.apply_t3s(model, mode="masked_diffusion", backend="torch")
    with pytest.raises(ValueError, match="t3s_clean_ids is the clean half of a block-diffusion input"):
        model(input_ids=inputs["input_ids"], labels=labels, t3s_clean_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match="rate='block' draws one rate per block"):
        masked_diffusion_compute_loss(model, inputs, mask_token_id=MASK, rate="block")


def test_flash_attention_is_refused_for_block_diffusion():
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2', which cannot take the "
                                         "block-diffusion mask"):
        bd.block_layout(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long), block_size=4,
                        attention="flash_attention_2", dtype=torch.float32, model_name="M")


@pytest.mark.parametrize("weight_tying,scale_logits", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("block_size", [None, 4])
def test_llada_head_forms(weight_tying, scale_logits, block_size):
    """LLaDA 1's own head forms: the input embedding as the head (no module call) and logits scaled by
    1 / sqrt(d_model); loss and every gradient (the tied embedding's from both its uses) equal the
    unpatched model's, and the patch leaves the model tied as it was."""
    from tests.standins import LLaDALikeLM

    model = LLaDALikeLM(weight_tying=weight_tying, scale_logits=scale_logits).train()
    inputs = batch(pad=0)
    t3s.apply_t3s(model, mode="masked_diffusion", block_size=block_size, backend="torch")
    assert t3s.patching.head_math(model).logit_scale == (0.25 if scale_logits else 1.0)
    loss = masked_diffusion_compute_loss(model, inputs, mask_token_id=MASK, weighting="none",
                                         normalization="masked_tokens", generator=torch.Generator().manual_seed(4))
    got = grads(model, loss)
    assert model.model.config.weight_tying == weight_tying and hasattr(model.model.transformer, "ff_out") != \
        weight_tying
    t3s.revert_t3s(model)
    nb = noise_inputs(inputs, mask_token_id=MASK, generator=torch.Generator().manual_seed(4))
    if block_size is None:
        logits = model(input_ids=nb.noisy_ids).logits.float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), inputs["input_ids"].reshape(-1),
                             reduction="none").view(nb.masked.shape)
        ref = (ce * nb.masked).sum() / nb.masked.sum()
    else:
        ref = reference_loss(model, inputs, nb, block_size=block_size, padding="labelled", weighting="none",
                             normalization="masked_tokens")
    assert_close(loss, ref, 1e-5, "loss")
    for k, (a, e) in enumerate(zip(got, grads(model, ref))):
        assert_close(a, e, 1e-4, f"gradient {k}")
