"""A patched model under FSDP2 and FSDP1 (gloo, one and two processes): exact in every grouping of
the head: with the root, with the final norm, and alone (the loss then runs inside the head
module's FSDP call)."""

import os

import pytest

import t3s_kernels as t3s
from tests.helpers import assert_close, run_on_two_ranks
from tests.models import batch, tiny_model

pytest.importorskip("transformers")
dist = pytest.importorskip("torch.distributed")


@pytest.fixture(scope="module")
def process_group():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = "29547"
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _sharded(patch, grouping, bf16=False):
    """A tiny Qwen3, patched or not, under FSDP2: one group per layer, the head in ``grouping``
    ("root": with the root, "norm+head": with the final norm, "head": alone), then the root;
    ``bf16``: a mixed-precision policy (bf16 parameters in compute, fp32 gradient reduction)."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = dict(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)) if bf16 else {}
    model = tiny_model("qwen3").train()
    if patch:
        t3s.apply_t3s(model, backend="torch")
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    if grouping == "norm+head":
        fully_shard([model.model.norm, model.lm_head], **kw)
    elif grouping == "head":
        fully_shard(model.lm_head, **kw)
    fully_shard(model, **kw)
    return model


def _step(grouping, patch):
    model = _sharded(patch, grouping)
    ids, labels, _ = batch()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out, {n: p.grad.full_tensor() for n, p in model.named_parameters()}


@pytest.mark.parametrize("grouping", ["root", "norm+head", "head"])
def test_fsdp2_groupings_are_exact(process_group, grouping):
    ref, ref_grads = _step(grouping, patch=False)
    out, grads = _step(grouping, patch=True)
    assert out.logits is None
    assert_close(out.loss, ref.loss, 1e-5, "loss")
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], 1e-4, name)


def _two_rank_worker(rank, grouping):

    results = {}
    for patch in (False, True):
        model = _sharded(patch, grouping)
        ids, labels, keep = batch(seed=1 + rank)  # each rank its own data, as data parallelism has
        out = model(input_ids=ids, labels=labels, t3s_weights=keep if patch else None) if patch else \
            model(input_ids=ids, labels=labels.masked_fill(~keep, -100))
        out.loss.backward()
        results[patch] = {"loss": out.loss.detach(),
                          **{n: p.grad.full_tensor() for n, p in model.named_parameters()}}
    return results


@pytest.mark.parametrize("grouping", ["head", "norm+head"])
def test_fsdp2_two_ranks_sharded_head_is_exact(tmp_path, grouping):
    """Two processes (gloo), the head's weight really split between them: the patched loss (T3S mask as
    weights) equals the unpatched model's with anchors labelled -100, and every gathered gradient too."""
    for res in run_on_two_ranks(_two_rank_worker, tmp_path, grouping):
        ref, got = res[False], res[True]
        assert_close(got["loss"], ref["loss"], 1e-5, "loss")
        for name in ref:
            assert_close(got[name], ref[name], 1e-4, name)


def test_fsdp2_bf16_policy_with_the_head_alone(process_group):
    """Under a bf16 policy FSDP2 casts the head's weight and input inside its call, where the loss runs.
    The unpatched model rounds its logits to bf16 before the loss, the fused op keeps them in fp32:
    the loss moves by at most about 2 u max|z| (u = 2^-8; |z| < 4 here), and the gradients, through
    bf16 matmuls on both sides, agree to bf16 resolution (TOLERANCE[bf16] = 1.5e-2 of the largest)."""
    import torch

    from tests.helpers import TOLERANCE

    results = []
    for patch in (False, True):
        model = _sharded(patch, "head", bf16=True)
        ids, labels, _ = batch()
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.full_tensor() for n, p in model.named_parameters()}))
    (ref, ref_grads), (got, grads) = results
    assert_close(got, ref, 2 * 2 ** -8 * 4 / ref.abs().item(), "loss")
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], TOLERANCE[torch.bfloat16]["grad"], name)


def _fsdp1_worker(rank):
    """FSDP1 (patch, then wrap): the head with the root or in a unit of its own, with the original
    parameters exposed or not; the gradients are each rank's shards of the flat parameters."""
    import functools

    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    results = {}
    for grouping in ("root", "head"):
        for orig in (True, False):
            for patch in (False, True):
                model = tiny_model("qwen3").train()
                if patch:
                    t3s.apply_t3s(model, backend="torch")
                head = model.lm_head
                policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: m is head) \
                    if grouping == "head" else None
                wrapped = FullyShardedDataParallel(model, auto_wrap_policy=policy, use_orig_params=orig,
                                                   device_id=torch.device("cpu"))
                ids, labels, keep = batch(seed=1 + rank)
                out = wrapped(input_ids=ids, labels=labels, t3s_weights=keep) if patch else \
                    wrapped(input_ids=ids, labels=labels.masked_fill(~keep, -100))
                out.loss.backward()
                flat = [p.grad.clone() for p in wrapped.parameters() if p.grad is not None]
                results[grouping, orig, patch] = {"loss": out.loss.detach(), "grads": flat}
    return results


def test_fsdp1_groupings_two_ranks_are_exact(tmp_path):
    """The patched loss under FSDP1 equals the unpatched one (anchors labelled -100), and so does
    every rank's shard of every reduced gradient, whether the head is its own unit or not."""
    for rank, res in enumerate(run_on_two_ranks(_fsdp1_worker, tmp_path)):
        for grouping in ("root", "head"):
            for orig in (True, False):
                ref, got = res[grouping, orig, False], res[grouping, orig, True]
                name = f"rank {rank} {grouping} use_orig_params={orig}"
                assert_close(got["loss"], ref["loss"], 1e-5, f"{name} loss")
                assert len(got["grads"]) == len(ref["grads"]) > 0, name
                for k, (g, r) in enumerate(zip(got["grads"], ref["grads"])):
                    assert_close(g, r, 1e-4, f"{name} flat gradient {k}")
