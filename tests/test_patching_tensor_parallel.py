"""A patched model whose LM head is sharded over the vocabulary by tensor parallelism
(``ColwiseParallel`` with replicated output, what transformers' ``tp_plan`` gives ``lm_head``), on
two gloo ranks: with ``apply_t3s(model, tensor_parallel=True)`` the loss runs vocabulary-parallel
and equals the unpatched model's (loss 1e-5, every gradient 1e-4); without the flag it is refused."""

import os
import random

import pytest
import torch
from helpers import assert_close
from models import batch, tiny_model

import t3s_kernels as t3s

pytest.importorskip("transformers")
dist = pytest.importorskip("torch.distributed")


def _worker(rank, port, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
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
        torch.save({"results": results, "refused": refused}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_head_is_exact_and_needs_saying(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(random.randint(50001, 60000), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        ref, got = saved["results"][False], saved["results"][True]
        assert_close(got["loss"], ref["loss"], 1e-5, "loss")
        for name in ref:
            if name != "loss":
                assert_close(got[name], ref[name], 1e-4, name)
        assert "apply_t3s(model, tensor_parallel=True)" in saved["refused"]
