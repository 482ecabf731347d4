"""Under HF Trainer, gradient accumulation 4 equals one batch 4x as large (one SGD step, lr 1, no
clipping: the parameter change is the gradient), for the AR path (patched model, T3S keep-mask,
anchors dropped) and the masked-diffusion path under every normalization. Tolerance 1e-5 of the
largest change: fp32 sums in another order."""

import tempfile

import pytest
import torch

import t3s_kernels as t3s
import t3s_kernels.masked_diffusion_trainer as mdt
import t3s_kernels.trainer_utils as tu
from t3s_kernels.toy import MASK_ID, PAD_ID, synthetic_traces, tiny_bidirectional_lm, tiny_causal_lm

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")


def one_step(make_model, make_trainer, rows, *, batch_size, accumulation):
    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with tempfile.TemporaryDirectory() as tmp:
        args = transformers.TrainingArguments(
            output_dir=tmp, max_steps=1, per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation, learning_rate=1.0, max_grad_norm=0.0,
            lr_scheduler_type="constant", report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
            remove_unused_columns=False, seed=0)
        trainer = make_trainer(model, args, datasets.Dataset.from_list(rows))
        trainer.create_optimizer_and_scheduler(num_training_steps=1)
        trainer.optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda _: 1.0)
        trainer.train()
    return {n: before[n] - p.detach() for n, p in model.named_parameters()}


def assert_same_step(a, b):
    scale = max(v.abs().max().item() for v in b.values())
    assert scale > 0
    for name in b:
        err = (a[name] - b[name]).abs().max().item()
        assert err <= 1e-5 * scale, f"{name}: {err:.3e} > 1e-5 x {scale:.3e}"


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_ar_accumulation_equals_one_large_batch(packed):
    """Packed micro-batches (one padding-free row each) under accumulation equal one padded batch."""
    rows = [{k: r[k] for k in ("input_ids", "labels", "t3s_weights")} for r in synthetic_traces(8, seed=3)]

    def make_model():
        return t3s.apply_t3s(tiny_causal_lm("qwen3", attn_implementation="sdpa"), backend="torch")

    def make_trainer(model, args, data, packed=False):
        return transformers.Trainer(model=model, args=args, train_dataset=data,
                                    data_collator=tu.T3SDataCollator(pad_token_id=PAD_ID, model=model, packed=packed))

    accumulated = one_step(make_model, lambda *a: make_trainer(*a, packed=packed), rows, batch_size=2, accumulation=4)
    large = one_step(make_model, make_trainer, rows, batch_size=8, accumulation=1)
    assert_same_step(accumulated, large)


def _rowwise_noise(real):
    """The forward process drawn per example from a generator seeded by its tokens, so that an example
    is noised the same in a micro-batch and in the large batch."""

    def noise(input_ids, *, generator=None, segments=None, **kw):
        if segments is not None:  # a packed row: each sequence noised as a row of its own, then joined again
            assert input_ids.shape[0] == 1
            parts = []
            for k in range(int(segments.max()) + 1):
                cols = (segments[0] == k).nonzero().squeeze(1)
                row = {n: (v[:, cols] if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}
                parts.append(noise(input_ids[:, cols], **row))
            fields = ("noisy_ids", "masked", "p_mask", "answer_mask")
            out = {f: torch.cat([getattr(p, f) for p in parts], 1) for f in fields}
            forced = None if parts[0].forced is None else torch.cat([p.forced for p in parts], 1)
            return mdt.NoisedBatch(**out, forced=forced, segments=segments)
        parts = []
        for i in range(input_ids.shape[0]):
            row = {k: (v[i:i + 1] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            g = torch.Generator().manual_seed(int(input_ids[i][row["attention_mask"][0].bool()].sum()
                                                  if row.get("attention_mask") is not None else input_ids[i].sum()))
            parts.append(real(input_ids[i:i + 1], generator=g, **row))
        fields = ("noisy_ids", "masked", "p_mask", "answer_mask")
        out = {f: torch.cat([getattr(p, f) for p in parts]) for f in fields}
        forced = None if parts[0].forced is None else torch.cat([p.forced for p in parts])
        return mdt.NoisedBatch(**out, forced=forced)

    return noise


@pytest.mark.parametrize("convention", [
    dict(weighting="inverse_p", normalization="llada_sft", rate_range=None),
    dict(weighting="none", normalization="masked_tokens", rate_range=(0.3, 0.8)),
    dict(weighting="inverse_p", normalization="llada_pretrain", rate_range=None),
])
def test_masked_diffusion_accumulation_equals_one_large_batch(monkeypatch, convention):
    equal = convention["normalization"] == "llada_pretrain"  # counts padded positions: one length for all
    _masked_diffusion_accumulation_equals_one_batch(monkeypatch, convention, equal_lengths=equal)


def _masked_diffusion_accumulation_equals_one_batch(monkeypatch, convention, *, equal_lengths, attention=None,
                                                    **patch):
    """MaskedDiffusionTrainer under accumulation 4 (batch 2) against one batch of 8, the student (of the
    ``attention`` implementation, None: transformers' default) patched with ``apply_t3s(..., **patch)``."""
    from t3s_kernels.masked_diffusion_trainer import MaskedDiffusionTrainer

    monkeypatch.setattr(mdt, "noise", _rowwise_noise(mdt.noise))
    traces = synthetic_traces(8, select_fraction=0.1, use="force_mask", seed=5,
                              **(dict(min_len=24, max_len=24) if equal_lengths else {}))
    rows = [{k: r[k] for k in ("input_ids", "labels", "t3s_force_mask")} for r in traces]

    def make_model():
        model = tiny_bidirectional_lm("llama", **({} if attention is None else dict(attn_implementation=attention)))
        return t3s.apply_t3s(model, mode="masked_diffusion", backend="torch", **patch)

    def make_trainer(model, args, data):
        return MaskedDiffusionTrainer(model=model, args=args, train_dataset=data, mask_token_id=MASK_ID,
                                      data_collator=tu.T3SDataCollator(pad_token_id=PAD_ID, model=model),
                                      **convention)

    accumulated = one_step(make_model, make_trainer, rows, batch_size=2, accumulation=4)
    large = one_step(make_model, make_trainer, rows, batch_size=8, accumulation=1)
    assert_same_step(accumulated, large)


@pytest.mark.parametrize("convention", [
    dict(weighting="inverse_p", normalization="llada_sft", rate_range=None),
    dict(weighting="none", normalization="masked_tokens", rate_range=(0.3, 0.8)),
])
def test_masked_diffusion_packed_accumulation_equals_one_padded_batch(monkeypatch, convention):
    """Packed micro-batches (each example noised as in its own row; the block-diagonal mask; per-sequence
    normalization) under accumulation 4 equal one padded batch 4x as large."""
    from t3s_kernels.masked_diffusion_trainer import MaskedDiffusionTrainer

    monkeypatch.setattr(mdt, "noise", _rowwise_noise(mdt.noise))
    traces = synthetic_traces(8, select_fraction=0.1, use="force_mask", seed=5)
    rows = [{k: r[k] for k in ("input_ids", "labels", "t3s_force_mask")} for r in traces]

    def make_model():
        return t3s.apply_t3s(tiny_bidirectional_lm("llama", attn_implementation="sdpa"), mode="masked_diffusion",
                             backend="torch")

    def make_trainer(model, args, data, packed=False):
        return MaskedDiffusionTrainer(model=model, args=args, train_dataset=data, mask_token_id=MASK_ID,
                                      data_collator=tu.T3SDataCollator(pad_token_id=PAD_ID, model=model, packed=packed),
                                      **convention)

    accumulated = one_step(make_model, lambda *a: make_trainer(*a, packed=True), rows, batch_size=2, accumulation=4)
    large = one_step(make_model, make_trainer, rows, batch_size=8, accumulation=1)
    assert_same_step(accumulated, large)


@pytest.mark.parametrize("convention", [
    dict(mdt.LLADA2_BLOCK),
    dict(mdt.BD3LM),
    dict(weighting="none", normalization="sequence_masked_mean", rate_range=(0.3, 0.8), padding="dropped"),
], ids=["llada2-block", "bd3lm", "block-padding-dropped"])
def test_block_diffusion_accumulation_equals_one_large_batch(monkeypatch, convention):
    """A block-diffusion student (block size 8) under accumulation 4 equals one batch 4x as large, for
    LLaDA 2.0's and BD3-LM's conventions. Labelled padding trains the pad tokens a batch pads to, so
    there the examples are of one length (as LLaDA 2.0 pads to a fixed multiple of the block size)."""
    _masked_diffusion_accumulation_equals_one_batch(monkeypatch, convention,
                                                    equal_lengths=convention.get("padding") == "labelled",
                                                    attention="sdpa", block_size=8)
