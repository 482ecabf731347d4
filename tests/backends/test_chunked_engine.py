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
                     strategy="chunked", chunk_rows=chunk_rows, vocab_chunk=vocab_chunk)
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
