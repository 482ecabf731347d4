"""torch.compile: the fused op is one torch.library operator (function.py), so dynamo traces the
API around it with no graph break, ``fullgraph=True`` compiles, and a patched model compiles whole.
Compiled results equal eager ones: the operator runs the same code; only the code around it is
traced (tolerance 1e-6 for the op, the single-process fp32 ones for a model: 1e-5 loss, 1e-4
gradients, as every patch test)."""

import pytest
import torch

import t3s_kernels as t3s
from tests.helpers import assert_close, make_inputs
from tests.models import batch, tiny_model

dynamo = pytest.importorskip("torch._dynamo")

_SPARSE_K = 6
OPTION_SETS = {
    "plain": dict(),
    "stats, none, rich": dict(reduction="none", return_stats=True, label_smoothing=0.1, z_loss=1e-3, softcap=4.0,
                              logit_scale=0.5),
    "weights, tensor normalizer": dict(normalizer=torch.tensor(17.0), return_stats=True),
    "dense teacher": dict(kd_weight=0.5, kd_loss="jsd", jsd_beta=0.3, kd_temperature=2.0, return_stats=True),
    "sparse teacher": dict(kd_weight=0.7, sparse_tail="bucket", return_stats=True),
}


def _teacher_args(name, inputs):
    g = torch.Generator().manual_seed(5)
    n, v = inputs["labels"].shape[0], inputs["weight"].shape[0]
    if name == "dense teacher":
        return dict(teacher_hidden=torch.randn(n, 24, generator=g), teacher_weight=torch.randn(v, 24, generator=g))
    if name == "sparse teacher":
        top = torch.log_softmax(torch.randn(n, v, generator=g) * 2, -1).topk(_SPARSE_K, -1)
        return dict(teacher_topk_ids=top.indices, teacher_topk_logprobs=top.values)
    return {}


def _loss_and_stats(x, w, b, labels, token_weights, options):
    out = t3s.fused_linear_t3s_loss(x, w, labels, bias=b, token_weights=token_weights, backend="torch", **options)
    stats = tuple(s for s in (out.logprob, out.entropy, out.correct, out.kd) if s is not None)
    return (out.loss,) + stats


@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_op_compiles_fullgraph_without_graph_breaks(name):
    inputs = make_inputs(n=29, h=32, v=71, bias=True, weights="zeros", ignored=3, device="cpu")
    options = {**OPTION_SETS[name], **_teacher_args(name, inputs)}
    args = [inputs[k].clone().requires_grad_(k != "labels") if k != "token_weights" else inputs[k]
            for k in ("hidden", "weight", "bias", "labels", "token_weights")]

    def f(x, w, b, labels, token_weights):
        return _loss_and_stats(x, w, b, labels, token_weights, options)

    explained = dynamo.explain(f)(*args)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    got, want = compiled(*args), f(*args)
    for k, (a, e) in enumerate(zip(got, want)):
        assert a.dtype == e.dtype and a.shape == e.shape, k
        assert_close(a, e, 1e-6, f"{name} output {k}")
    g = torch.linspace(0.5, 1.5, got[0].numel()).view(got[0].shape)
    for k, (a, e) in enumerate(zip(torch.autograd.grad(got[0], args[:3], g),
                                   torch.autograd.grad(want[0], args[:3], g))):
        assert_close(a, e, 1e-6, f"{name} gradient {k}")


def test_compiled_upstream_scale_equals_eager_bitwise():
    """Compiled, the backward scales the fused gradient out of place (no value read on the host); the
    product is formed in float32 and rounded once, as the eager in-place scaling does: bf16 gradients
    equal bitwise at a scale bf16 cannot hold (1/3)."""
    inputs = make_inputs(n=29, h=32, v=71, dtype=torch.bfloat16, weights="zeros", device="cpu")
    third = torch.tensor(1.0) / 3

    def grads(f):
        x, w = (inputs[k].clone().requires_grad_() for k in ("hidden", "weight"))
        return torch.autograd.grad(f(x, w, inputs["labels"], inputs["token_weights"]) * third, (x, w))

    def f(x, w, labels, token_weights):
        return t3s.fused_linear_t3s_loss(x, w, labels, token_weights=token_weights, backend="torch").loss

    eager = grads(f)
    dynamo.reset()
    for got, want in zip(grads(torch.compile(f, fullgraph=True, backend="inductor")), eager):
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_compiled_op_still_refuses_bad_values():
    """The checks that read values run inside the operator: a compiled call refuses as an eager one."""
    inputs = make_inputs(n=9, h=16, v=31, device="cpu")
    labels = inputs["labels"].clone()
    labels[2] = 31
    compiled = torch.compile(lambda x, w, y: t3s.fused_linear_t3s_loss(x, w, y, backend="torch").loss,
                             fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, V\) = \[0, 31\)"):
        compiled(inputs["hidden"], inputs["weight"], labels)


@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
def test_patched_model_compiles_fullgraph_and_is_exact(family):
    """A compiled patched model (AOTAutograd: the operator's fake and autograd registrations are
    what it traces) against the unpatched eager model, T3S weights as -100 labels."""
    ids, labels, keep = batch()
    ref_model = tiny_model(family).train()
    ref = ref_model(input_ids=ids, labels=labels.masked_fill(~keep, -100)).loss
    ref.backward()
    model = t3s.apply_t3s(tiny_model(family).train(), backend="torch")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for step in range(2):  # the second call runs the cached graph
        model.zero_grad()
        loss = compiled(input_ids=ids, labels=labels, t3s_weights=keep, num_items_in_batch=None).loss
        loss.backward()
        assert_close(loss, ref, 1e-5, f"loss, call {step}")
        for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
            assert_close(p.grad, q.grad, 1e-4, f"{name}, call {step}")


def test_compiled_patched_model_refuses_an_unmodelled_head():
    """The per-forward probe of the head math becomes an in-graph assertion when compiled."""
    from tests.test_patching import _doubling_llama

    model = t3s.apply_t3s(_doubling_llama().train(), backend="torch", check=False)
    ids, labels, _ = batch()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="transforms its LM head's output in a way the patch does not model"):
        compiled(input_ids=ids, labels=labels)
