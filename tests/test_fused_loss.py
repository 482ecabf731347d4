"""The PyTorch backend (the CPU default) against the fp64 eager reference, every option."""

import pytest
import torch

import t3s_kernels as t3s
from tests.cases import CASE_PARAMS
from tests.helpers import DEVICE, assert_close, check_token_stats, make_inputs, run_and_compare


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("input_opts,loss_opts", CASE_PARAMS)
def test_torch_backend_matches_reference(input_opts, loss_opts, dtype, reduction):
    run_and_compare(make_inputs(dtype=dtype, **input_opts), backend="torch", reduction=reduction, **loss_opts)


def test_fp16_inputs():
    run_and_compare(make_inputs(dtype=torch.float16, bias=True, weights="zeros"), backend="torch",
                    label_smoothing=0.05)


@pytest.mark.parametrize("normalizer", [5, 12.5, "tensor"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_normalizer_replaces_divisor(normalizer, reduction):
    if normalizer == "tensor":
        normalizer = torch.tensor(9.0, device=DEVICE)
    run_and_compare(make_inputs(weights="zeros", ignored=3), backend="torch", reduction=reduction,
                    normalizer=normalizer)


def test_leading_batch_dims_and_none_shape():
    inputs = make_inputs(n=36, lead=(4, 9), weights="random", ignored=3)
    out = run_and_compare(inputs, backend="torch", reduction="none")
    assert out.loss.shape == (4, 9) and out.logprob.shape == (4, 9) and out.correct.dtype == torch.bool


def test_non_contiguous_inputs():
    base = make_inputs(n=37, h=96, v=203)
    inputs = dict(base)
    inputs["hidden"] = base["hidden"][:, ::2]  # stride 2 along H
    inputs["weight"] = torch.cat([base["weight"], base["weight"]], 1)[:, ::2][:, :48]
    inputs["labels"] = torch.stack([base["labels"], base["labels"]], 1)[:, 0]
    assert not inputs["hidden"].is_contiguous() and not inputs["labels"].is_contiguous()
    run_and_compare(inputs, backend="torch")


def test_statistics_at_ignored_positions_are_zero():
    inputs = make_inputs(ignored=6, weights="zeros")
    out = t3s.fused_linear_t3s_loss(**inputs, return_stats=True, backend="torch", reduction="none")
    ignored = inputs["labels"] == -100
    assert (out.logprob[ignored] == 0).all() and (out.entropy[ignored] == 0).all()
    assert (out.lse[ignored] == 0).all() and not out.correct[ignored].any()
    assert (out.loss[ignored] == 0).all()
    # weight-0 tokens are scored but contribute nothing
    zero_w = (inputs["token_weights"] == 0) & ~ignored
    assert (out.loss[zero_w] == 0).all() and (out.lse[zero_w] != 0).all()


def test_no_contributing_token_gives_zero_loss_and_zero_grads():
    inputs = make_inputs(weights="all_zero", bias=True)
    params = [inputs[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    out = t3s.fused_linear_t3s_loss(params[0], params[1], inputs["labels"], bias=params[2],
                                    token_weights=inputs["token_weights"], backend="torch")
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()
    for p in params:
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))


def test_frozen_head_gets_no_weight_grad():
    """A frozen LM head (LoRA, say): only dX is computed, and it is still exact."""
    inputs = make_inputs(weights="zeros")
    x = inputs["hidden"].clone().requires_grad_()
    out = t3s.fused_linear_t3s_loss(x, inputs["weight"], inputs["labels"], token_weights=inputs["token_weights"],
                                    backend="torch")
    out.loss.backward()
    rx = x.detach().double().requires_grad_()
    ref, _ = t3s.reference_t3s_loss(rx, inputs["weight"], inputs["labels"], token_weights=inputs["token_weights"])
    ref.backward()
    assert inputs["weight"].grad is None
    assert_close(x.grad, rx.grad, 1e-5, "dX")


def test_stats_not_returned_by_default():
    out = t3s.fused_linear_t3s_loss(**make_inputs(), backend="torch")
    assert out.logprob is None and out.entropy is None and out.correct is None and out.lse is None


def test_multiple_token_chunks_through_the_budget():
    run_and_compare(make_inputs(bias=True, weights="zeros"), backend="torch", chunk_budget_bytes=12 * 203 * 8,
                    label_smoothing=0.1, softcap=3.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature,logit_scale", [(1.0, 1.0), (0.7, 1.0), (2.0, 0.25), (1.0, 4.0)])
def test_token_stats_matches_reference(dtype, temperature, logit_scale):
    check_token_stats("torch", dtype, temperature, logit_scale=logit_scale)


def test_t3s_loss_module():
    inputs = make_inputs(weights="zeros", bias=True)
    module = t3s.T3SLoss(label_smoothing=0.1, reduction="sum", backend="torch", bias=inputs["bias"])
    out = module(inputs["hidden"], inputs["weight"], inputs["labels"], token_weights=inputs["token_weights"])
    ref, _ = t3s.reference_t3s_loss(inputs["hidden"].double(), inputs["weight"].double(), inputs["labels"],
                                    bias=inputs["bias"].double(), token_weights=inputs["token_weights"],
                                    label_smoothing=0.1, reduction="sum")
    assert_close(out.loss, ref, 1e-5, "loss")
    assert "label_smoothing=0.1" in repr(module)


def test_autocast_runs_head_in_autocast_dtype():
    inputs = make_inputs()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = t3s.fused_linear_t3s_loss(inputs["hidden"], inputs["weight"], inputs["labels"], backend="torch")
    ref, _ = t3s.reference_t3s_loss(inputs["hidden"].bfloat16().double(), inputs["weight"].bfloat16().double(),
                                    inputs["labels"])
    assert_close(out.loss, ref, 2e-5, "loss")


def test_zero_normalizer_without_contributing_tokens_gives_zero_loss_and_grads():
    """HF Trainer passes num_items_in_batch=0 for a step without label tokens."""
    inputs = make_inputs(weights="all_zero")
    x = inputs["hidden"].clone().requires_grad_()
    out = t3s.fused_linear_t3s_loss(x, inputs["weight"], inputs["labels"], token_weights=inputs["token_weights"],
                                    normalizer=0, backend="torch")
    out.loss.backward()
    assert out.loss.item() == 0 and x.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="normalizer is 0 but 37 tokens contribute"):
        t3s.fused_linear_t3s_loss(**{**inputs, "token_weights": None}, normalizer=0, backend="torch")


@pytest.mark.parametrize("backend,strategy", [("torch", "auto"), ("triton", "chunked")])
def test_graph_semantics_match_eager(backend, strategy):
    """A second backward without retain_graph raises (the gradients are freed after the first), with
    retain_graph it gives the same gradients again; create_graph raises rather than returning a
    gradient that cannot be differentiated; weights that require grad are refused."""
    inputs = make_inputs(n=9, h=16, v=31, weights="random")
    x = inputs["hidden"].clone().requires_grad_()
    kw = dict(token_weights=inputs["token_weights"], backend=backend, strategy=strategy)
    out = t3s.fused_linear_t3s_loss(x, inputs["weight"], inputs["labels"], **kw)
    (g1,) = torch.autograd.grad(out.loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(out.loss, x)
    assert torch.equal(g1, g2)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(out.loss, x)
    out = t3s.fused_linear_t3s_loss(x, inputs["weight"], inputs["labels"], **kw)
    with pytest.raises(RuntimeError, match="gradient is not differentiable"):  # a penalty on it would be dropped
        torch.autograd.grad(out.loss, x, create_graph=True)
    with pytest.raises(ValueError, match="token_weights require grad"):
        t3s.fused_linear_t3s_loss(x, inputs["weight"], inputs["labels"],
                                  token_weights=inputs["token_weights"].clone().requires_grad_(), backend=backend)


@pytest.mark.parametrize("backend,strategy", [("torch", "auto"), ("triton", "chunked")])
def test_no_grad_forward_computes_no_gradient(backend, strategy, monkeypatch):
    """Under torch.no_grad, inputs that require grad get a forward only (no dX / dW computed)."""
    inputs = make_inputs(n=9, h=16, v=31)
    x, w = inputs["hidden"].clone().requires_grad_(), inputs["weight"].clone().requires_grad_()
    seen = []
    from t3s_kernels import function

    real = function.make_engine

    def recording(*a, **k):
        engine = real(*a, **k)
        forward = engine.forward
        engine.forward = lambda *fa, grads=None, **fk: seen.append(grads) or forward(*fa, grads=grads, **fk)
        return engine

    monkeypatch.setattr(function, "make_engine", recording)
    with torch.no_grad():
        out = t3s.fused_linear_t3s_loss(x, w, inputs["labels"], backend=backend, strategy=strategy)
    assert not out.loss.requires_grad and seen and not any(g is not None and g.any for g in seen)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_vocabulary_sized_gradient_outlives_backward(reduction):
    """What the op saves for backward (with "mean": the fused dW in the weight's dtype, [V x H]) is
    released with the graph: after backward no saved tensor is alive."""
    import weakref

    inputs = make_inputs(n=23, h=40, v=173, device="cpu")
    x, w = inputs["hidden"].clone().requires_grad_(), inputs["weight"].clone().requires_grad_()
    saved = []

    def pack(t):
        if t is not w and t is not x:  # the inputs themselves live on with the caller
            saved.append((tuple(t.shape), weakref.ref(t)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = t3s.fused_linear_t3s_loss(x, w, inputs["labels"], backend="torch", reduction=reduction)
    if reduction == "mean":
        assert (173, 40) in [shape for shape, _ in saved]  # dW, kept from forward to backward
    out.loss.sum().backward()
    del out
    alive = [shape for shape, ref in saved if ref() is not None]
    assert alive == [], alive


@pytest.mark.parametrize("upstream", [1.0, 0.25])
def test_unit_upstream_gradient_skips_the_rescale(upstream, monkeypatch):
    """loss.backward() (an upstream gradient of 1) hands back the fused gradient as it is, with no pass
    over dW; any other scale rescales it. Both equal the reference."""
    from t3s_kernels.backends.base import HeadGrads

    calls = []
    original = HeadGrads.scaled
    monkeypatch.setattr(HeadGrads, "scaled", lambda self, scale: calls.append(scale) or original(self, scale))
    inputs = make_inputs(device="cpu")
    run_and_compare(inputs, backend="torch", grad_scale=upstream)
    assert len(calls) == (0 if upstream == 1.0 else 1)
