"""Property tests of the PyTorch backend: any shape and option mix equals the fp64 reference."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import t3s_kernels as t3s
from tests.helpers import assert_close


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 24), h=st.integers(1, 20), v=st.integers(2, 60),
       reduction=st.sampled_from(["mean", "sum", "none"]), smoothing=st.sampled_from([0.0, 0.1, 0.5]),
       z_loss=st.sampled_from([0.0, 1e-2]), softcap=st.sampled_from([None, 2.0, 30.0]),
       use_bias=st.booleans(), weight_kind=st.sampled_from(["none", "random", "sparse"]),
       ignore_frac=st.floats(0.0, 1.0), budget_rows=st.sampled_from([None, 1, 3]),
       seed=st.integers(0, 2**16))
def test_torch_backend_any_shape(n, h, v, reduction, smoothing, z_loss, softcap, use_bias, weight_kind,
                                 ignore_frac, budget_rows, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g, dtype=torch.float64).float().requires_grad_()
    w = (torch.randn(v, h, generator=g) * 0.7).requires_grad_()
    b = torch.randn(v, generator=g).requires_grad_() if use_bias else None
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignore_frac] = -100
    tw = None
    if weight_kind != "none":
        tw = torch.rand(n, generator=g)
        if weight_kind == "sparse":
            tw[torch.rand(n, generator=g) < 0.5] = 0
    opts = dict(token_weights=tw, label_smoothing=smoothing, z_loss=z_loss, softcap=softcap, reduction=reduction)
    budget = None if budget_rows is None else 12 * v * budget_rows
    out = t3s.fused_linear_t3s_loss(x, w, y, bias=b, return_stats=True, backend="torch",
                                    chunk_budget_bytes=budget, **opts)
    params = [p for p in (x, w, b) if p is not None]
    ref_params = [p.detach().double().requires_grad_() for p in params]
    ref, stats = t3s.reference_t3s_loss(ref_params[0], ref_params[1], y, bias=ref_params[2] if use_bias else None,
                                        **opts)
    # fp32 rounding is relative to the terms each result is made of (see assert_close's floor):
    # logsumexp-sized for loss and statistics; per-token gradient scale g = w / divisor times
    # the other operand for the gradients.
    lse_scale = max(stats["lse"].abs().max().item(), 1e-3)
    w_max = 1.0 if tw is None else max(tw.max().item(), 1e-3)
    contributing = int(((y != -100) & (tw != 0 if tw is not None else True)).sum())
    g = w_max / max(contributing, 1) if reduction == "mean" else w_max
    loss_floor = lse_scale * w_max * (max(contributing, 1) if reduction == "sum" else 1)
    assert_close(out.loss, ref, 1e-5, "loss", floor=loss_floor)
    assert_close(out.logprob, stats["logprob"], 1e-5, "logprob", floor=lse_scale)
    assert_close(out.entropy, stats["entropy"], 1e-5, "entropy", floor=lse_scale)
    assert torch.equal(out.correct, stats["correct"])
    upstream = torch.ones_like(out.loss)
    floors = [g * w.abs().max().item(), g * x.abs().max().item(), g]
    for name, got, want, floor in zip(("dX", "dW", "db"), torch.autograd.grad(out.loss, params, upstream),
                                      torch.autograd.grad(ref, ref_params, upstream.double()), floors):
        assert_close(got, want, 1e-5, name, floor=floor)
