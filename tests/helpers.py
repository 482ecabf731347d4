"""Inputs, tolerances, the reference comparison and the two-process launcher the test modules share."""

import os
import socket

import torch

import t3s_kernels as t3s

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Tolerances, as a fraction of the largest magnitude of the expected tensor.
# fp32 inputs: the fused op and the fp64 reference differ only by fp32 rounding of sums over
#   H and V terms (~sqrt(V) * 2^-24 relative): 1e-5 leaves a margin of ~10x.
# half inputs: the reference sees the same rounded inputs, so loss and statistics (fp32 math)
#   stay at fp32 accuracy; gradients pass through dL/dz rounded to the inputs' dtype before the
#   backward matmuls and come back in that dtype (2^-8 = 4e-3 for bf16): 1e-2.
TOLERANCE = {
    torch.float32: dict(value=1e-5, grad=1e-5),
    torch.bfloat16: dict(value=2e-5, grad=1.5e-2),
    torch.float16: dict(value=2e-5, grad=5e-3),
}


def assert_close(actual, expected, rel, name="", floor=1e-3):
    """max |actual - expected| <= rel * max(|expected|, floor), in float64.

    ``floor`` is the magnitude of the terms the result is computed from, where that exceeds
    the result (a loss of 1e-6 made as lse - s_y with lse ~ 5 carries lse's rounding)."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, floor)
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= rel * scale, f"{name}: max error {err:.3e} > {rel:.1e} x scale {scale:.3e}"


def make_inputs(n=37, h=48, v=203, dtype=torch.float32, *, seed=0, bias=False, weights=None, ignored=0,
                lead=None, device=DEVICE, logit_scale=1.0):
    """Fresh random inputs with logits of realistic spread (std ~ logit_scale * 2)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * (2.0 * logit_scale / h**0.5)
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    if ignored:
        y[torch.randperm(n, generator=g)[:ignored]] = -100
    tw = None
    if weights == "random":
        tw = torch.rand(n, generator=g) * 2
    elif weights == "zeros":
        tw = torch.rand(n, generator=g) * 2
        tw[torch.randperm(n, generator=g)[: n // 3]] = 0
    elif weights == "all_zero":
        tw = torch.zeros(n)
    if lead is not None:
        x, y = x.view(*lead, h), y.view(*lead)
        tw = None if tw is None else tw.view(*lead)
    to = lambda t: None if t is None else t.to(device)
    x, w = x.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype)
    b = None if b is None else b.to(device=device, dtype=dtype)
    return dict(hidden=x, weight=w, labels=to(y), bias=b, token_weights=to(tw))


def run_and_compare(inputs, *, backend="torch", reduction="mean", grad_scale=1.7,
                    check_grads=True, chunk_budget_bytes=None, **options):
    """Run the fused op and the fp64 reference on the same inputs; compare loss, dX, dW, db, statistics."""
    hidden = inputs["hidden"].detach().clone().requires_grad_(check_grads)
    weight = inputs["weight"].detach().clone().requires_grad_(check_grads)
    bias = inputs["bias"]
    bias = None if bias is None else bias.detach().clone().requires_grad_(check_grads)
    labels, token_weights = inputs["labels"], inputs["token_weights"]
    dtype = hidden.dtype
    tol = TOLERANCE[dtype]

    out = t3s.fused_linear_t3s_loss(hidden, weight, labels, bias=bias, token_weights=token_weights,
                                    reduction=reduction, return_stats=True, backend=backend,
                                    chunk_budget_bytes=chunk_budget_bytes, **options)
    ref_inputs = [t.detach().double().requires_grad_(check_grads) if t is not None else None
                  for t in (hidden, weight, bias)]
    ref, ref_stats = t3s.reference_t3s_loss(ref_inputs[0], ref_inputs[1], labels, bias=ref_inputs[2],
                                            token_weights=token_weights, reduction=reduction, **options)
    assert out.loss.dtype == torch.float32
    assert_close(out.loss, ref, tol["value"], "loss")
    for key in ("logprob", "entropy", "lse"):
        got = getattr(out, key)
        assert got.dtype == torch.float32 and not got.requires_grad
        assert_close(got, ref_stats[key], tol["value"], key)
    assert torch.equal(out.correct.cpu(), ref_stats["correct"].cpu()), "correct"

    if check_grads:
        g = torch.randn(out.loss.shape, generator=torch.Generator().manual_seed(1)).to(out.loss.device) \
            if reduction == "none" else torch.tensor(grad_scale, device=out.loss.device)
        params = [t for t in (hidden, weight, bias) if t is not None]
        ref_params = [t for t in ref_inputs if t is not None]
        grads = torch.autograd.grad(out.loss, params, g)
        ref_grads = torch.autograd.grad(ref, ref_params, g.double())
        for name, got, want, param in zip(("dX", "dW", "db"), grads, ref_grads, params):
            assert got.dtype == param.dtype and got.shape == param.shape, name
            assert_close(got, want, tol["grad"], name)
    return out


def check_token_stats(backend, dtype, temperature, softcap=6.0, logit_scale=1.0, bias=True, **shape):
    """token_stats on a backend against the reference statistics (bias, softcap, logit scale, ignored labels);
    ``shape``: make_inputs' n, h, v."""
    inputs = make_inputs(dtype=dtype, bias=bias, ignored=4, **shape)
    b = inputs["bias"]
    stats = t3s.token_stats(inputs["hidden"], inputs["weight"], inputs["labels"], bias=b,
                            softcap=softcap, logit_scale=logit_scale, temperature=temperature, backend=backend)
    _, ref = t3s.reference_t3s_loss(inputs["hidden"].double(), inputs["weight"].double(), inputs["labels"],
                                    bias=None if b is None else b.double(), softcap=softcap, logit_scale=logit_scale,
                                    temperature=temperature)
    for key in ("logprob", "entropy", "lse"):
        assert_close(getattr(stats, key), ref[key], TOLERANCE[dtype]["value"], key)
    assert torch.equal(stats.correct.cpu(), ref["correct"].cpu())


def count_head_rows(monkeypatch):
    """Record how many rows reach the head's matmuls in each training call of the fused op: the rows
    the engine is given with a gradient requested (apply_t3s's equivalence check and forward-only
    statistics request none)."""
    from t3s_kernels import function

    seen = []
    real = function.make_engine

    def counting_engine(*args, **kwargs):
        engine = real(*args, **kwargs)
        forward = engine.forward

        def counting(x, *a, grads=None, **k):
            if grads is not None and grads.any:
                seen.append(x.shape[0])
            return forward(x, *a, grads=grads, **k)

        engine.forward = counting
        return engine

    monkeypatch.setattr(function, "make_engine", counting_engine)
    return seen


def _two_rank_entry(rank, worker, port, out_dir, args):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.save(worker(rank, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_on_two_ranks(worker, out_dir, *args) -> list:
    """``worker(rank, *args)`` in two spawned processes joined in a gloo group (with torchrun's
    environment variables); the two ranks' return values, passed back through ``out_dir``.
    ``worker`` must be a module-level function (spawn pickles it by name)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free port, not a random one that another test may hold
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_entry, args=(worker, port, str(out_dir), args), nprocs=2, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{rank}.pt"), weights_only=False) for rank in (0, 1)]
