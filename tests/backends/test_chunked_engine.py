"""The chunk driver with several token and vocabulary chunks (the 4-matmul path), with both
epilogues: PyTorch and the Triton kernel."""

import pytest
import torch

import t3s_kernels as t3s
from t3s_kernels.backends.chunked import plan_chunks
from t3s_kernels.function import LossConfig, fused_head_loss
from t3s_kernels.options import HeadOptions
from tests.helpers import TOLERANCE, assert_close, make_inputs


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk_rows,vocab_chunk", [(8, 50), (37, 64), (5, 203)])
@pytest.mark.parametrize("epilogue", ["torch", "triton"])
def test_vocab_and_token_chunks(epilogue, chunk_rows, vocab_chunk, dtype, reduction):
    inputs = make_inputs(dtype=dtype, bias=True, weights="zeros", ignored=3, logit_scale=2.0)
    opts = dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    cfg = LossConfig(opts=HeadOptions(vocab_size=203, **opts), reduction=reduction, backend=epilogue,
                     chunk_rows=chunk_rows, vocab_chunk=vocab_chunk)
    x, w, b = (inputs[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    loss, logprob, entropy, correct, lse, _ = fused_head_loss(x, w, b, inputs["labels"], inputs["token_weights"], cfg)
    rx, rw, rb = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref, stats = t3s.reference_t3s_loss(rx, rw, inputs["labels"], bias=rb, token_weights=inputs["token_weights"],
                                        reduction=reduction, **opts)
    tol = TOLERANCE[dtype]
    assert_close(loss, ref, tol["value"], "loss")
    assert_close(entropy, stats["entropy"], tol["value"], "entropy")
    assert_close(logprob, stats["logprob"], tol["value"], "logprob")
    g = torch.linspace(-1, 2, loss.numel(), device=loss.device).view(loss.shape)
    for name, got, want in zip(("dX", "dW", "db"), torch.autograd.grad(loss, (x, w, b), g),
                               torch.autograd.grad(ref, (rx, rw, rb), g.double())):
        assert_close(got, want, tol["grad"], name)


def test_plan_prefers_whole_vocabulary_rows():
    rows, vchunk = plan_chunks(4096, 65536, 12, 256 << 20)
    assert vchunk == 65536 and rows * 65536 * 12 <= 256 << 20 and rows % 64 == 0
    rows, vchunk = plan_chunks(16384, 151936, 12, 64 << 20)  # too small for 128 whole rows
    assert vchunk < 151936 and rows * vchunk * 12 <= 64 << 20


# One rounding to the accumulator's dtype per token chunk: |error| <= chunks * u * max|dW| (u: unit roundoff).
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("chunk_rows,vocab_chunk", [(8, 203), (8, 50)], ids=["whole-rows", "vocab-chunks"])
@pytest.mark.parametrize("epilogue", ["torch", pytest.param("triton", marks=pytest.mark.gpu)])
def test_grad_accum_in_the_weights_dtype(epilogue, chunk_rows, vocab_chunk, dtype):
    """grad_accum_dtype="weight" changes dW and db only, by at most one rounding per token chunk;
    the loss, the statistics and dX are bitwise those of float32 accumulation."""
    inputs = make_inputs(dtype=dtype, bias=True, weights="zeros", ignored=3)
    opts = dict(label_smoothing=0.1, softcap=4.0)
    outs = {}
    for accum in ("float32", "weight"):
        cfg = LossConfig(opts=HeadOptions(vocab_size=203, **opts), backend=epilogue,
                         chunk_rows=chunk_rows, vocab_chunk=vocab_chunk, grad_accum_dtype=accum)
        x, w, b = (inputs[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
        loss, logprob, *_ = fused_head_loss(x, w, b, inputs["labels"], inputs["token_weights"], cfg)
        outs[accum] = (loss, logprob, *torch.autograd.grad(loss, (x, w, b)))
    (loss32, lp32, dx32, dw32, db32), (loss_w, lp_w, dx_w, dw_w, db_w) = outs["float32"], outs["weight"]
    assert torch.equal(loss32, loss_w) and torch.equal(lp32, lp_w) and torch.equal(dx32, dx_w)
    assert dw_w.dtype == dtype and db_w.dtype == dtype
    chunks = -(-37 // chunk_rows)
    for name, got, want in (("dW", dw_w, dw32), ("db", db_w, db32)):
        bound = (chunks + 1) * UNIT_ROUNDOFF[dtype] * want.float().abs().max().item()
        err = (got.float() - want.float()).abs().max().item()
        assert err <= bound, f"{name}: {err:.3g} > {bound:.3g}"
    if dtype != torch.float32:  # the half accumulator really rounds per chunk (the test can tell the two apart)
        assert not torch.equal(dw_w, dw32)


@pytest.mark.parametrize("accum", ["float32", "weight"])
def test_chunk_memory_is_released_before_the_next_chunk(accum):
    """Peak memory of a fused forward + backward over several token chunks (bf16, CPU): the dW
    accumulator, dX and one chunk's buffers. A gradient chunk kept alive into the next chunk, or a
    float32 dW under grad_accum_dtype="weight", exceeds the bound (measured: each adds exactly its
    size to the peak); the bound leaves less than one bf16 chunk of slack."""
    from t3s_kernels.bench import peak_memory_bytes

    n, h, v, rows = 256, 64, 4096, 64
    inputs = make_inputs(n=n, h=h, v=v, dtype=torch.bfloat16)
    x, w = (inputs[k].clone().requires_grad_() for k in ("hidden", "weight"))
    cfg = LossConfig(opts=HeadOptions(vocab_size=v), backend="torch", chunk_rows=rows,
                     grad_accum_dtype=accum)

    def step():
        loss, *_ = fused_head_loss(x, w, None, inputs["labels"], None, cfg)
        loss.backward()

    _, peak = peak_memory_bytes(step, torch.device("cpu"))
    dw = v * h * (4 if accum == "float32" else 2)  # (the bf16 copy of a float32 dW comes after the chunks)
    chunk = rows * v * (4 + 2 + 2)  # the fp32 logits, the bf16 gradient, one bf16 temporary of the epilogue
    bound = dw + n * h * 2 + chunk + 64 * (n + v) + (32 << 10)
    assert peak <= bound, f"peak {peak / 2**20:.2f} MiB > bound {bound / 2**20:.2f} MiB"
    assert peak + rows * v * 2 > bound, "the bound is loose: a leaked bf16 chunk would pass it"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("chunk_rows,vocab_chunk", [(8, 203), (8, 50)], ids=["whole-rows", "vocab-chunks"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_input_dtype_logits(chunk_rows, vocab_chunk, dtype, reduction):
    """logits_dtype="input" on the Triton epilogue: the loss and statistics of the logits rounded once to
    the inputs' dtype (the fp64 reference with ``round_logits``), at the float32 tolerance, and gradients
    at the half tolerance (dL/dz is written over the half logits, as with a separate half buffer). The
    bf16 accumulation of a logit at H = 48 is exact in float32, so no logit rounds differently."""
    inputs = make_inputs(dtype=dtype, bias=True, weights="zeros", ignored=3, logit_scale=2.0)
    opts = dict(label_smoothing=0.1, z_loss=1e-3, softcap=8.0)
    cfg = LossConfig(opts=HeadOptions(vocab_size=203, **opts), reduction=reduction, backend="triton",
                     chunk_rows=chunk_rows, vocab_chunk=vocab_chunk, logits_dtype="input")
    x, w, b = (inputs[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    loss, logprob, entropy, *_ = fused_head_loss(x, w, b, inputs["labels"], inputs["token_weights"], cfg)
    rx, rw, rb = (t.detach().double().requires_grad_() for t in (x, w, b))
    tol = TOLERANCE[dtype]
    for round_logits in (dtype, None):
        ref, stats = t3s.reference_t3s_loss(rx, rw, inputs["labels"], bias=rb, token_weights=inputs["token_weights"],
                                            reduction=reduction, round_logits=round_logits, **opts)
        if round_logits is None:  # the test tells the two apart: unrounded logits are not what ran
            with pytest.raises(AssertionError):
                assert_close(logprob, stats["logprob"], tol["value"], "logprob")
            break
        assert_close(loss, ref, tol["value"], "loss")
        assert_close(entropy, stats["entropy"], tol["value"], "entropy")
        assert_close(logprob, stats["logprob"], tol["value"], "logprob")
        g = torch.linspace(-1, 2, loss.numel(), device=loss.device).view(loss.shape)
        for name, got, want in zip(("dX", "dW", "db"), torch.autograd.grad(loss, (x, w, b), g, retain_graph=True),
                                   torch.autograd.grad(ref, (rx, rw, rb), g.double())):
            assert_close(got, want, tol["grad"], name)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_logits_dtype_auto(backend, monkeypatch):
    """"auto" makes the logits in the inputs' dtype without statistics and in float32 with them (the
    Triton epilogue); the PyTorch epilogue keeps float32 logits whatever is asked."""
    from t3s_kernels.backends.chunked import ChunkedEngine

    made = []
    logits = ChunkedEngine._logits
    monkeypatch.setattr(ChunkedEngine, "_logits", staticmethod(lambda *a, **k: made.append(a[5]) or logits(*a, **k)))
    inputs = make_inputs(dtype=torch.bfloat16)
    for return_stats in (False, True):
        made.clear()
        x = inputs["hidden"].clone().requires_grad_()
        out = t3s.fused_linear_t3s_loss(x, inputs["weight"], inputs["labels"], backend=backend,
                                        return_stats=return_stats)
        out.loss.backward()
        half = backend == "triton" and not return_stats
        assert made and set(made) == {torch.bfloat16 if half else torch.float32}, (return_stats, set(made))


def test_half_logits_give_larger_chunks():
    """Logits in the inputs' half dtype cost 2 bytes each (dL/dz is written over them), not the float32
    buffer's 6 with its half gradient: three times the rows in the same budget."""
    from t3s_kernels.backends.chunked import ChunkedEngine
    from t3s_kernels.backends.triton_engines import TritonEpilogue

    x = torch.empty(16384, 64, dtype=torch.bfloat16)
    engines = {dtype: ChunkedEngine(TritonEpilogue(), 1 << 30, logits_dtype=dtype) for dtype in ("float32", "input")}
    rows = {dtype: engine._plan(x, 151936, engine._logits_dtype(x))[0] for dtype, engine in engines.items()}
    assert rows["float32"] * 151936 * 6 <= 1 << 30 and rows["input"] * 151936 * 2 <= 1 << 30
    assert rows["input"] >= 2.8 * rows["float32"], rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_triton_epilogue_writes_the_gradient_over_the_logits(dtype):
    """dL/dz goes into the logits' own memory whenever they are of the gradient's dtype: no second
    [rows x vocabulary] buffer in the chunk (what the 2-bytes-a-logit plan counts on)."""
    from t3s_kernels.backends.base import OnlineState
    from t3s_kernels.backends.triton_engines import TritonEpilogue

    inputs = make_inputs(dtype=dtype)
    logits = inputs["hidden"] @ inputs["weight"].t()
    row_scale = torch.full((logits.shape[0],), 0.5, device=logits.device)
    opts = HeadOptions(vocab_size=logits.shape[1])
    epilogue = TritonEpilogue()
    dz = epilogue.accumulate_and_gradient(logits, inputs["labels"], OnlineState(logits.shape[0], logits.device),
                                          row_scale, opts, dtype)
    assert dz.data_ptr() == logits.data_ptr() and dz.dtype == dtype
    lse = torch.logsumexp(logits.float(), 1)
    fresh = (inputs["hidden"] @ inputs["weight"].t())
    dz = epilogue.gradient(fresh, inputs["labels"], 0, lse, row_scale, opts, dtype)
    assert dz.data_ptr() == fresh.data_ptr()
