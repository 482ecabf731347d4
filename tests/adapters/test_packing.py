"""Packed (padding-free) batches equal padded ones: the collator, the patched forward (causal and
masked-diffusion students, eager and SDPA attention), masked-diffusion noising per sequence, and
scoring. flash-attn's varlen path takes the same position ids (the GPU check runs it)."""

import pytest
import torch

import t3s_kernels as t3s
from t3s_kernels.adapters.masked_diffusion import NoisedBatch, noise
from t3s_kernels.adapters.packing import block_diagonal_mask, segment_ids, sequence_starts
from t3s_kernels.masked_diffusion_trainer import masked_diffusion_compute_loss, noise_inputs
from t3s_kernels.pipeline.data import Example
from t3s_kernels.pipeline.scoring import score_batch_causal, score_batch_causal_packed
from t3s_kernels.toy import MASK_ID, PAD_ID, tiny_bidirectional_lm, tiny_causal_lm
from t3s_kernels.trainer_utils import T3SDataCollator

pytest.importorskip("transformers")


def rows(seed=0, lengths=(9, 5, 12)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 500, (n,), generator=g).tolist()
        labels = [-100] * 3 + ids[3:]
        keep = (torch.rand(n, generator=g) > 0.3).tolist()
        out.append({"input_ids": ids, "labels": labels, "t3s_weights": keep})
    return out


def step(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def assert_same(a, b, rel=2e-5):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert torch.allclose(loss_a, loss_b, rtol=rel, atol=1e-7), (loss_a, loss_b)
    for ga, gb in zip(grads_a, grads_b):
        assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-6 * max(gb.abs().max().item(), 1e-3))


def test_boundaries_come_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert sequence_starts(pos).nonzero()[:, 1].tolist() == [3, 5]
    assert segment_ids(pos).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2]]
    padded = torch.tensor([[0, 1, 2, 1, 1]])  # right padding with position 1: not a boundary
    assert not sequence_starts(padded, torch.tensor([[1, 1, 1, 0, 0]])).any()
    mask = block_diagonal_mask(pos, torch.float32)
    assert mask.shape == (1, 1, 9, 9) and mask[0, 0, 3, 2] < -1e30 and mask[0, 0, 3, 4] == 0


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_causal_packed_batch_equals_padded(attn):
    """Loss (mean over kept tokens) and every gradient, with a T3S keep-mask."""
    model = t3s.apply_t3s(tiny_causal_lm("qwen3", attn_implementation=attn))
    model.train()
    features = rows()
    padded = T3SDataCollator(PAD_ID, model=model)(features)
    packed = T3SDataCollator(PAD_ID, model=model, packed=True)(features)
    assert packed["input_ids"].shape == (1, 26) and "attention_mask" not in packed
    assert packed["position_ids"][0, 9].item() == 0 and packed["labels"][0, [0, 9, 14]].tolist() == [-100] * 3
    assert_same(step(model, packed), step(model, padded))
    # HF Trainer's count of labels is the same for both batches: dividing by it stays exact.
    n = int((padded["labels"][:, 1:] != -100).sum())
    assert_same(step(model, {**packed, "num_items_in_batch": n}), step(model, {**padded, "num_items_in_batch": n}))


def test_packed_batch_refusals():
    model = t3s.apply_t3s(tiny_causal_lm("qwen3", attn_implementation="sdpa"))
    model.train()
    packed = T3SDataCollator(PAD_ID, model=model, packed=True)(rows())
    partial = torch.ones_like(packed["input_ids"])
    partial[0, -1] = 0
    with pytest.raises(ValueError, match="packed batch .* came with an attention_mask"):
        model(**packed, attention_mask=partial)
    ones = step(model, {**packed, "attention_mask": torch.ones_like(partial)})  # all ones: accepted, the same
    assert_same(ones, step(model, packed))
    labelled = dict(packed, labels=packed["input_ids"].clone())
    with pytest.raises(ValueError, match="labels the first token of a sequence"):
        model(**{k: v for k, v in labelled.items() if k != "t3s_weights"}, num_items_in_batch=10)
    with pytest.raises(ValueError, match="'prompt_length' cannot describe a packed row"):
        T3SDataCollator(PAD_ID, model=model, packed=True)([{"input_ids": [5, 6], "prompt_length": 1}])


def test_noise_draws_one_rate_per_packed_sequence():
    ids = torch.randint(3, 500, (1, 4000))
    pos = torch.cat([torch.arange(2000), torch.arange(2000)])[None]
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[0, :10] = False
    maskable[0, 2000:2010] = False
    nb = noise(ids, mask_token_id=MASK_ID, maskable=maskable, segments=segment_ids(pos),
               generator=torch.Generator().manual_seed(0))
    p = nb.p_mask[0]
    assert p[10:2000].unique().numel() == 1 and p[2010:].unique().numel() == 1 and p[10] != p[2010]
    assert not nb.masked[0, :10].any() and not nb.masked[0, 2000:2010].any()  # prompts never masked


def _pack_noised(padded: NoisedBatch, ids: torch.Tensor, lengths):
    """The packed row holding exactly the padded batch's noised sequences."""
    def cat(t):
        return torch.cat([t[r, :n] for r, n in enumerate(lengths)])[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    forced = None if padded.forced is None else cat(padded.forced)
    return NoisedBatch(noisy_ids=cat(padded.noisy_ids), masked=cat(padded.masked), p_mask=cat(padded.p_mask),
                       answer_mask=cat(padded.answer_mask), forced=forced, segments=segment_ids(pos)), cat(ids), pos


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("normalization", ["llada_sft", "masked_tokens"])
def test_masked_diffusion_packed_batch_equals_padded(attn, normalization):
    """A bidirectional student: each packed sequence sees only itself (the block-diagonal mask), is
    normalized by its own answer length (llada_sft), and the step's divisor counts sequences."""
    model = t3s.apply_t3s(tiny_bidirectional_lm("qwen3", attn_implementation=attn), mode="masked_diffusion")
    model.train()
    features = rows(1)
    lengths = [len(f["input_ids"]) for f in features]
    padded = T3SDataCollator(PAD_ID)([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])
    nb = noise_inputs(padded, mask_token_id=MASK_ID, generator=torch.Generator().manual_seed(3))
    packed_nb, packed_ids, pos = _pack_noised(nb, padded["input_ids"], lengths)
    packed = {"input_ids": packed_ids, "position_ids": pos}

    def run(inputs, noised):
        model.zero_grad(set_to_none=True)
        loss = masked_diffusion_compute_loss(model, inputs, mask_token_id=MASK_ID, normalization=normalization,
                                             noised=noised)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    assert_same(run(packed, packed_nb), run(padded, nb))


def test_masked_diffusion_collator_keeps_labels_and_noises_per_sequence():
    model = t3s.apply_t3s(tiny_bidirectional_lm("qwen3"), mode="masked_diffusion")
    features = [{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}, {"input_ids": [9, 10], "labels": [9, 10]}]
    packed = T3SDataCollator(PAD_ID, model=model, packed=True)(features)
    assert packed["labels"].tolist() == [[5, 6, 7, 8, 9, 10]]  # no shift, so no boundary label


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_scoring_equals_padded(attn):
    model = tiny_causal_lm("qwen3", attn_implementation=attn).eval()
    exs = [Example(f"e{i}", f["input_ids"], f["labels"]) for i, f in enumerate(rows(2))]
    for got, want in zip(score_batch_causal_packed(model, exs), score_batch_causal(model, exs)):
        assert torch.equal(got["scored"], want["scored"]) and torch.equal(got["correct"], want["correct"])
        assert torch.allclose(got["logprob"], want["logprob"], atol=2e-5)
        assert torch.allclose(got["entropy"], want["entropy"], atol=2e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn runs on CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["causal", "masked_diffusion"])
def test_flash_attention_varlen_packed_equals_padded(mode):
    """flash-attn's varlen kernels take the boundaries from position_ids (no 4D mask): causal, and
    non-causal for a bidirectional student. bf16 compute: tolerance 2e-2 of the loss (bf16's 2^-8
    per matmul input over two layers)."""
    pytest.importorskip("flash_attn")
    make = tiny_causal_lm if mode == "causal" else tiny_bidirectional_lm
    model = make("qwen3", attn_implementation="flash_attention_2").to(device="cuda", dtype=torch.bfloat16)
    model = t3s.apply_t3s(model, mode=mode)
    model.train()
    features = [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in rows(4)]
    collate = T3SDataCollator(PAD_ID, model=model, packed=True)
    packed = {k: v.cuda() for k, v in collate(features).items()}
    padded = {k: v.cuda() for k, v in T3SDataCollator(PAD_ID)(features).items()}
    if mode == "causal":
        got, want = model(**packed).loss, model(**padded).loss
    else:
        nb = noise_inputs(padded, mask_token_id=MASK_ID, generator=torch.Generator("cuda").manual_seed(0))
        lengths = [len(f["input_ids"]) for f in features]
        packed_nb, ids, pos = _pack_noised(nb, padded["input_ids"], lengths)
        got = masked_diffusion_compute_loss(model, {"input_ids": ids, "position_ids": pos.cuda()},
                                            mask_token_id=MASK_ID, noised=packed_nb)
        want = masked_diffusion_compute_loss(model, padded, mask_token_id=MASK_ID, noised=nb)
    assert torch.allclose(got.float(), want.float(), rtol=2e-2), (got, want)
