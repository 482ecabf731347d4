"""A patched model whose LM head is sharded over the vocabulary by tensor parallelism
(``ColwiseParallel`` with replicated output, what transformers' ``tp_plan`` gives ``lm_head``), on
two gloo ranks: with ``apply_t3s(model, tensor_parallel=True)`` the loss runs vocabulary-parallel
and equals the unpatched model's (loss 1e-5, every gradient 1e-4); without the flag it is refused."""

import os

import pytest
import torch

import t3s_kernels as t3s
from tests.helpers import assert_close, run_on_two_ranks
from tests.models import batch, tiny_model

pytest.importorskip("transformers")
dist = pytest.importorskip("torch.distributed")


def _worker(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2,))
    ids, labels, keep = batch(seed=3)  # tensor parallelism: every rank sees the same tokens
    results, refused = {}, ""
    for patch in (False, True):
        model = tiny_model("qwen3").train()
        if patch:
            t3s.apply_t3s(model, backend="torch", tensor_parallel=True)
        parallelize_module(model.lm_head, mesh, ColwiseParallel(output_layouts=Replicate()))
        out = model(input_ids=ids, labels=labels, t3s_weights=keep) if patch else \
            model(input_ids=ids, labels=labels.masked_fill(~keep, -100))
        out.loss.backward()
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                 for n, p in model.named_parameters()}
        results[patch] = {"loss": out.loss.detach(), **grads}
    model = t3s.apply_t3s(tiny_model("qwen3").train(), backend="torch")
    parallelize_module(model.lm_head, mesh, ColwiseParallel(output_layouts=Replicate()))
    try:
        model(input_ids=ids, labels=labels)
    except ValueError as e:
        refused = str(e)
    return {"results": results, "refused": refused}


def test_tensor_parallel_head_is_exact_and_needs_saying(tmp_path):
    for saved in run_on_two_ranks(_worker, tmp_path):
        ref, got = saved["results"][False], saved["results"][True]
        assert_close(got["loss"], ref["loss"], 1e-5, "loss")
        for name in ref:
            if name != "loss":
                assert_close(got[name], ref[name], 1e-4, name)
        assert "apply_t3s(model, tensor_parallel=True)" in saved["refused"]


def _grads(model):
    return {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            for n, p in model.named_parameters()}


def _tp_plan_worker(rank, folder):
    """Models loaded by transformers with ``tp_plan="auto"`` (every layer sharded, the head Shard(0)),
    patched with ``tensor_parallel=True``: T3S weights, distillation from a whole teacher head and
    from a teacher loaded with ``tp_plan`` too, and ``token_stats`` on the local shard."""
    import transformers as tf

    ids, labels, keep = batch(seed=3)
    load = (lambda name: tf.AutoModelForCausalLM.from_pretrained(
        os.path.join(folder, name), tp_plan="auto", dtype=torch.float32))
    results = {}
    student = t3s.apply_t3s(load("student").train(), backend="torch", tensor_parallel=True)
    out = student(input_ids=ids, labels=labels, t3s_weights=keep)
    out.loss.backward()
    results["t3s"] = {"loss": out.loss.detach(), **_grads(student)}
    teacher = load("teacher").eval()
    with torch.no_grad():
        t_hidden = teacher.model(input_ids=ids).last_hidden_state
    for kind, t_weight in (("whole teacher", torch.load(os.path.join(folder, "teacher_head.pt"))),
                           ("tp teacher", teacher.lm_head.weight.detach())):
        student = t3s.apply_t3s(load("student").train(), backend="torch", tensor_parallel=True,
                                teacher_weight=t_weight, kd_weight=0.5, kd_loss="jsd", kd_temperature=2.0)
        out = student(input_ids=ids, labels=labels, t3s_weights=keep, teacher_hidden=t_hidden)
        out.loss.backward()
        results[kind] = {"loss": out.loss.detach(), **_grads(student)}
    head = student.lm_head.weight
    with torch.no_grad():
        hidden = student.model(input_ids=ids).last_hidden_state
    # The op on the Shard(0) DTensor itself, told it is tensor-parallel by its mesh.
    stats = t3s.token_stats(hidden[:, :-1], head.detach(), labels[:, 1:], backend="torch",
                            vocab_parallel=head.device_mesh)
    try:
        t3s.token_stats(hidden[:, :-1], head.detach(), labels[:, 1:], vocab_parallel=t3s.VocabShard(0, 257))
    except TypeError as e:
        results["refused"] = str(e)
    return {"results": results, "stats": stats, "hidden": hidden}


def test_tp_plan_auto_models_patched_are_exact(tmp_path):
    """Against the same models in one process without tensor parallelism (loss 1e-5, gradients 1e-4;
    statistics against token_stats of the whole head, 1e-5)."""

    student, teacher = tiny_model("qwen3", tie_word_embeddings=True), tiny_model("llama", seed=3)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(50.0)  # a peaked teacher: its rows matter (a near-uniform one hides a mix-up)
    student.save_pretrained(tmp_path / "student")
    teacher.save_pretrained(tmp_path / "teacher")
    torch.save(teacher.lm_head.weight.detach(), tmp_path / "teacher_head.pt")
    ranks = run_on_two_ranks(_tp_plan_worker, tmp_path, str(tmp_path))
    ids, labels, keep = batch(seed=3)
    ref = {}
    model = tiny_model("qwen3", tie_word_embeddings=True).train()
    out = model(input_ids=ids, labels=labels.masked_fill(~keep, -100))
    out.loss.backward()
    ref["t3s"] = {"loss": out.loss.detach(), **_grads(model)}
    with torch.no_grad():
        t_hidden = teacher.model(input_ids=ids).last_hidden_state
    model = t3s.apply_t3s(tiny_model("qwen3", tie_word_embeddings=True).train(), backend="torch",
                          teacher_weight=teacher.lm_head.weight.detach(), kd_weight=0.5, kd_loss="jsd",
                          kd_temperature=2.0)
    out = model(input_ids=ids, labels=labels, t3s_weights=keep, teacher_hidden=t_hidden)
    out.loss.backward()
    ref["whole teacher"] = ref["tp teacher"] = {"loss": out.loss.detach(), **_grads(model)}
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
    whole = t3s.token_stats(hidden[:, :-1], model.lm_head.weight, labels[:, 1:], backend="torch")
    for saved in ranks:
        for kind, want in ref.items():
            got = saved["results"][kind]
            assert_close(got["loss"], want["loss"], 1e-5, f"{kind} loss")
            for name in want:
                if name != "loss":
                    assert_close(got[name], want[name], 1e-4, f"{kind} {name}")
        assert_close(saved["hidden"], hidden, 1e-5, "backbone")
        for key in ("logprob", "entropy"):
            assert_close(getattr(saved["stats"], key), getattr(whole, key), 1e-5, f"token_stats {key}")
        assert torch.equal(saved["stats"].correct, whole.correct)
        assert "pass its local part" in saved["results"]["refused"]
