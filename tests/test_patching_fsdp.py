"""A patched model under FSDP2 (one process, gloo): exact where the head is sharded with the root or
with the final norm; a clear refusal where it is sharded alone (a DTensor when the loss needs it)."""

import os

import pytest
from helpers import assert_close
from models import batch, tiny_model

import t3s_kernels as t3s

pytest.importorskip("transformers")
dist = pytest.importorskip("torch.distributed")


@pytest.fixture(scope="module")
def process_group():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = "29547"
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _step(grouping, patch):
    from torch.distributed.fsdp import fully_shard

    model = tiny_model("qwen3").train()
    if patch:
        t3s.apply_t3s(model, backend="torch")
    for layer in model.model.layers:
        fully_shard(layer)
    if grouping == "norm+head":
        fully_shard([model.model.norm, model.lm_head])
    elif grouping == "head":
        fully_shard(model.lm_head)
    fully_shard(model)
    ids, labels, _ = batch()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out, {n: p.grad.full_tensor() for n, p in model.named_parameters()}


@pytest.mark.parametrize("grouping", ["root", "norm+head"])
def test_fsdp2_groupings_are_exact(process_group, grouping):
    ref, ref_grads = _step(grouping, patch=False)
    out, grads = _step(grouping, patch=True)
    assert out.logits is None
    assert_close(out.loss, ref.loss, 1e-5, "loss")
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], 1e-4, name)


def test_fsdp2_head_in_its_own_group_is_refused(process_group):
    with pytest.raises(ValueError, match="sharded DTensor when the loss needs it"):
        _step("head", patch=True)
