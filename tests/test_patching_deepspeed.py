"""DeepSpeed ZeRO-3 on two gloo ranks (DeepSpeed's CPU accelerator): a patched model inside the
engine's forward equals the unpatched one (loss 1e-5, every full gradient 1e-4); a teacher whose
head is partitioned away is gathered by the op (the same as its whole head); ``token_stats`` on a
partitioned head too; and a partitioned head that needs a gradient outside the engine's forward is
refused. Skipped where DeepSpeed is not installed (it is in the CI's test environment)."""


import pytest
import torch

import t3s_kernels as t3s
from tests.helpers import assert_close, run_on_two_ranks
from tests.models import batch, tiny_model

pytest.importorskip("transformers")
deepspeed = pytest.importorskip("deepspeed")
dist = pytest.importorskip("torch.distributed")

# Persistence threshold 0: every parameter is partitioned, however small (tiny models' would stay whole).
CONFIG = {"train_micro_batch_size_per_gpu": 3,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "optimizer": {"type": "SGD", "params": {"lr": 0.0}}, "zero_allow_untested_optimizer": True}


def _full_grads(model):
    from deepspeed.utils import safe_get_full_grad

    return {n: safe_get_full_grad(p).clone() for n, p in model.named_parameters()}


def _worker(rank):
    deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeed's communication over the existing group
    ids, labels, keep = batch(seed=1 + rank)
    results = {}
    for patch in (False, True):
        model = tiny_model("qwen3").train()
        if patch:
            t3s.apply_t3s(model, backend="torch")
        engine, *_ = deepspeed.initialize(model=model, config=CONFIG, model_parameters=model.parameters())
        out = engine(input_ids=ids, labels=labels, t3s_weights=keep) if patch else \
            engine(input_ids=ids, labels=labels.masked_fill(~keep, -100))
        engine.backward(out.loss)
        results[patch] = {"loss": out.loss.detach(), **_full_grads(model)}

    teacher = tiny_model("llama", seed=3, tie_word_embeddings=False).eval()
    whole_head = teacher.lm_head.weight.detach().clone()
    teacher_engine, *_ = deepspeed.initialize(model=teacher, config=CONFIG, model_parameters=teacher.parameters())
    with torch.no_grad():
        t_hidden = teacher_engine.module.model(input_ids=ids).last_hidden_state
    partitioned = teacher.lm_head.weight
    assert partitioned.numel() == 0, "the teacher's head should be partitioned away outside its forward"
    for kind, t_weight in (("whole", whole_head), ("partitioned", partitioned)):
        model = t3s.apply_t3s(tiny_model("qwen3").train(), backend="torch", teacher_weight=t_weight,
                              kd_weight=0.5, kd_temperature=2.0)
        engine, *_ = deepspeed.initialize(model=model, config=CONFIG, model_parameters=model.parameters())
        out = engine(input_ids=ids, labels=labels, t3s_weights=keep, teacher_hidden=t_hidden)
        engine.backward(out.loss)
        results[kind] = {"loss": out.loss.detach(), **_full_grads(model)}

    with torch.no_grad():
        stats = t3s.token_stats(t_hidden, partitioned, labels, backend="torch")
    refused = ""
    try:  # the student's own partitioned head, with a gradient, outside the engine's forward
        t3s.fused_linear_t3s_loss(t_hidden[..., :32].detach().float(), model.lm_head.weight, labels,
                                  backend="torch")
    except ValueError as e:
        refused = str(e)
    return {"results": results, "stats": stats, "t_hidden": t_hidden, "refused": refused}


def test_zero3_patched_teacher_gathered_and_refusals(tmp_path):
    ranks = run_on_two_ranks(_worker, tmp_path)
    teacher_head = tiny_model("llama", seed=3, tie_word_embeddings=False).lm_head.weight.detach()
    for rank, saved in enumerate(ranks):
        res = saved["results"]
        for ref_kind, got_kind in ((False, True), ("whole", "partitioned")):
            ref, got = res[ref_kind], res[got_kind]
            assert_close(got["loss"], ref["loss"], 1e-5, f"rank {rank} {got_kind} loss")
            for name in ref:
                if name != "loss":
                    assert_close(got[name], ref[name], 1e-4, f"rank {rank} {got_kind} {name}")
        _, labels, _ = batch(seed=1 + rank)
        whole = t3s.token_stats(saved["t_hidden"], teacher_head, labels, backend="torch")
        for key in ("logprob", "entropy"):
            assert_close(getattr(saved["stats"], key), getattr(whole, key), 1e-6, f"token_stats {key}")
        assert "partitioned parameter (ds_id" in saved["refused"] and "that needs a gradient" in saved["refused"]
