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


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_graph_semantics_match_eager(backend):
    """A second backward without retain_graph raises (the gradients are freed after the first), with
    retain_graph it gives the same gradients again; create_graph raises rather than returning a
    gradient that cannot be differentiated; weights that require grad are refused."""
    inputs = make_inputs(n=9, h=16, v=31, weights="random")
    x = inputs["hidden"].clone().requires_grad_()
    kw = dict(token_weights=inputs["token_weights"], backend=backend)
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


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_grad_forward_computes_no_gradient(backend, monkeypatch):
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
        out = t3s.fused_linear_t3s_loss(x, w, inputs["labels"], backend=backend)
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


def _grads_with_upstream(inputs, upstream, saved=None, **options):
    """(dX, dW) of ``upstream * loss`` through the op, the tensors that reach ``.grad``; ``saved``
    collects the data pointers of what the op saves for backward."""
    x, w = (inputs[k].clone().requires_grad_() for k in ("hidden", "weight"))
    pack = (lambda t: saved.append(t.data_ptr()) or t) if saved is not None else (lambda t: t)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = t3s.fused_linear_t3s_loss(x, w, inputs["labels"], token_weights=inputs["token_weights"],
                                        backend="torch", **options)
    (out.loss * upstream if upstream != 1.0 else out.loss).backward()
    return x.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_upstream_gradient_scales_the_fused_gradient_once_in_place(dtype, monkeypatch):
    """The forward's gradient times the upstream scale: formed in float32 and rounded once (1/3 is not
    first rounded to bf16's 0.33398, a +0.2% bias on every element), bitwise what the unit-scale
    gradient times the scale is; in place (dW reaching ``.grad`` is the very buffer the forward saved:
    no second [V x H] at the backward's peak); and no pass at all for exactly 1."""
    from t3s_kernels.backends.base import HeadGrads

    inputs = make_inputs(n=41, h=24, v=97, dtype=dtype, weights="zeros", device="cpu")
    calls = []
    original = HeadGrads.scale_
    monkeypatch.setattr(HeadGrads, "scale_", lambda self, scale: calls.append(scale) or original(self, scale))
    dx1, dw1 = _grads_with_upstream(inputs, 1.0)
    assert calls == []
    saved = []
    third = torch.tensor(1.0) / 3
    dx, dw = _grads_with_upstream(inputs, third, saved)
    assert calls == [float(third)]
    assert dw.data_ptr() in saved and dx.data_ptr() in saved
    for got, unit in ((dx, dx1), (dw, dw1)):
        assert torch.equal(got, (unit.float() * third).to(dtype))
    if dtype == torch.bfloat16:
        assert not torch.equal(dw, dw1 * third.to(dtype))  # the test tells the rounded scale apart


def test_second_backward_after_an_in_place_rescale_is_refused():
    """With retain_graph: after a first backward at upstream 1 (the saved gradient handed out as it
    is) later ones are exact and leave what was handed out untouched; after a first at any other
    scale (applied in place) a second is refused."""
    inputs = make_inputs(n=9, h=16, v=31, device="cpu")
    x = inputs["hidden"].clone().requires_grad_()
    out = t3s.fused_linear_t3s_loss(x, inputs["weight"], inputs["labels"], backend="torch")
    (g1,) = torch.autograd.grad(out.loss, x, retain_graph=True)
    kept = g1.clone()
    (g2,) = torch.autograd.grad(out.loss * 0.5, x, retain_graph=True)
    (g3,) = torch.autograd.grad(out.loss, x)
    assert torch.equal(g1, kept) and torch.equal(g2, kept * 0.5) and torch.equal(g3, kept)
    out = t3s.fused_linear_t3s_loss(x, inputs["weight"], inputs["labels"], backend="torch")
    (g1,) = torch.autograd.grad(out.loss * 0.5, x, retain_graph=True)
    assert torch.equal(g1, kept * 0.5)
    with pytest.raises(RuntimeError, match="second backward through one forward.*run the forward again"):
        torch.autograd.grad(out.loss, x)


@pytest.mark.parametrize("upstream", [65536.0, 4096.0, 1.0 / 3])
def test_fp16_gradient_carries_a_loss_scale_as_eager_does(upstream):
    """fp16 with a GradScaler's loss scale (65536 is its initial one; fp16's largest value is 65504):
    the gradient equals eager fp16's (logits in fp16, the scaled dL/dz rounded to fp16, then the two
    matmuls), not an unscaled fp16 gradient that underflowed and was scaled afterwards. Eager's own
    error against fp64 bounds ours (x1.05); unscaled-then-scaled was 20x eager's at 4096 and NaN at
    65536."""
    inputs = make_inputs(n=512, h=32, v=2048, dtype=torch.float16, device="cpu")
    inputs["weight"] = inputs["weight"] * 0.1  # small logits: most of dL/dz is far below 1/tokens
    x, w, y = inputs["hidden"], inputs["weight"], inputs["labels"]
    got = _grads_with_upstream(inputs, upstream)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    ref = torch.autograd.grad(torch.nn.functional.cross_entropy(xr @ wr.t(), y) * upstream, (xr, wr))
    xe, we = x.clone().requires_grad_(), w.clone().requires_grad_()
    eager = torch.autograd.grad(torch.nn.functional.cross_entropy((xe @ we.t()).float(), y) * upstream, (xe, we))
    for name, a, e, r in zip(("dX", "dW"), got, eager, ref):
        err = lambda t: ((t.double() - r).norm() / r.norm()).item()  # noqa: E731
        assert torch.isfinite(a).all() and err(a) <= 1.05 * err(e), (name, err(a), err(e))


@pytest.mark.parametrize("upstream", [1.0, 1.0 / 3])
def test_backward_allocates_nothing_when_the_forward_made_the_gradient(upstream):
    """The backward of the fused path hands back the gradient the forward made (rescaled in place):
    it allocates no dW or dX, nor zeros for the outputs that get no gradient (the statistics and the
    fused dX / dW themselves: 33 MiB at N=2048, H=256, V=65536 in bf16 before)."""
    from t3s_kernels.bench.measure import peak_memory_bytes

    inputs = make_inputs(n=64, h=32, v=4096, dtype=torch.bfloat16, device="cpu")
    x, w = inputs["hidden"].clone().requires_grad_(), inputs["weight"].clone().requires_grad_()
    out = t3s.fused_linear_t3s_loss(x, w, inputs["labels"], backend="torch", return_stats=True)
    loss = out.loss * upstream if upstream != 1.0 else out.loss
    _, peak = peak_memory_bytes(loss.backward, torch.device("cpu"))
    assert w.grad is not None and peak < 1024, peak  # dW is 256 KiB, dX 4 KiB
