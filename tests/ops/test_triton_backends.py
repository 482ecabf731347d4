"""The Triton chunked engine and the forward tile kernel (token_stats) against the fp64 reference.

On a CPU-only machine they run under TRITON_INTERPRET=1 (set in conftest.py) at small odd
shapes (N=37, H=48, V=203: no dimension a multiple of any block size)."""

import pytest
import torch

import t3s_kernels as t3s
from tests.cases import CASE_PARAMS
from tests.helpers import DEVICE, assert_close, check_token_stats, make_inputs, run_and_compare


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("input_opts,loss_opts", CASE_PARAMS)
def test_triton_matches_reference(input_opts, loss_opts, dtype, reduction):
    run_and_compare(make_inputs(dtype=dtype, **input_opts), backend="triton",
                    reduction=reduction, **loss_opts)


def test_fp16_inputs():
    run_and_compare(make_inputs(dtype=torch.float16, bias=True, weights="zeros"), backend="triton",
                    label_smoothing=0.05, softcap=4.0)


@pytest.mark.gpu
def test_normalizer_and_leading_dims():
    inputs = make_inputs(n=36, lead=(3, 12), weights="zeros", ignored=2)
    run_and_compare(inputs, backend="triton", normalizer=7)


@pytest.mark.gpu
def test_non_contiguous_inputs():
    base = make_inputs(n=37, h=96, v=203, bias=True)
    inputs = dict(base)
    inputs["hidden"] = base["hidden"][:, ::2]
    inputs["weight"] = base["weight"].t().contiguous().t()[:, ::2]  # column-major, strided
    inputs["labels"] = torch.stack([base["labels"], base["labels"]], 1)[:, 1]
    run_and_compare(inputs, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 16, 5), (64, 32, 128), (5, 200, 65)], ids=str)
def test_shapes_at_and_around_block_edges(shape):
    n, h, v = shape
    run_and_compare(make_inputs(n=n, h=h, v=v, weights="zeros"), backend="triton",
                    label_smoothing=0.1)


def test_chunked_multiple_token_chunks():
    run_and_compare(make_inputs(bias=True, weights="zeros"), backend="triton",
                    chunk_budget_bytes=6 * 203 * 8, softcap=3.0, z_loss=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("flat,tma", [(False, False), (True, False), (True, True)], ids=["loop", "flat", "flat-tma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature,logit_scale,softcap,bias,v", [(1.0, 1.0, None, False, 150),
                                                                    (2.0, 0.25, 6.0, True, 203)], ids=["plain", "rich"])
def test_token_stats_tile_kernel(temperature, logit_scale, softcap, bias, v, dtype, flat, tma, monkeypatch):
    """The forward tile kernel, both loop structures (a K loop per vocabulary block, or ``FLAT``: one
    loop over blocks and K slices, its tiles loaded by pointers or through tensor descriptors), its
    plain variant and the one with bias and softcap. Under the interpreter (64-column blocks, two
    vocabulary splits) V = 150 leaves the last split a block past V, which must add nothing; H = 48
    crosses three K slices of 16."""
    from t3s_kernels.ops import configs

    entries = [configs.INTERPRETER_CONFIGS["tile_forward"], *configs.KERNEL_CONFIGS["tile_forward"].values(),
               *(cfg for arch in configs.ARCH_CONFIGS.values() for cfg in arch.get("tile_forward", {}).values())]
    for entry in entries:
        monkeypatch.setitem(entry, "FLAT", flat)
        monkeypatch.setitem(entry, "TMA", tma)
    check_token_stats("triton", dtype, temperature, softcap=softcap, logit_scale=logit_scale, bias=bias, v=v)
    if tma:  # rows that are not 16-byte aligned cannot be read through descriptors: the pointer loads serve
        check_token_stats("triton", dtype, temperature, softcap=softcap, logit_scale=logit_scale, bias=bias, v=v,
                          h=45)


@pytest.mark.gpu
def test_backends_agree_with_each_other():
    """Triton chunked and PyTorch on the same inputs: the same numbers to fp32 rounding."""
    inputs = make_inputs(bias=True, weights="random", ignored=3)
    outs = [t3s.fused_linear_t3s_loss(**inputs, backend=b, return_stats=True, label_smoothing=0.1)
            for b in ("torch", "triton")]
    for other in outs[1:]:
        assert_close(other.loss, outs[0].loss, 1e-6, "loss")
        assert_close(other.logprob, outs[0].logprob, 1e-6, "logprob")


def test_triton_backend_refuses_cpu_tensors_without_interpreter(monkeypatch):
    if DEVICE.type == "cuda":
        pytest.skip("CPU tensors only")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
        t3s.fused_linear_t3s_loss(**make_inputs(), backend="triton")


def test_softcap_tanh_is_as_accurate_as_eager():
    """A large cap puts z / cap near 0, where tanh as 2 sigmoid(2x) - 1 cancels (about 10x eager's
    error in the loss, 6x in the gradient). The kernels' tanh must stay within 2x of the PyTorch
    backend's error against fp64, in the per-token losses and in dX."""
    inputs = make_inputs(n=64, h=48, v=203, seed=3)
    errors = {}
    for backend in ("torch", "triton"):
        hidden = inputs["hidden"].clone().requires_grad_(True)
        out = t3s.fused_linear_t3s_loss(hidden, inputs["weight"], inputs["labels"], reduction="none",
                                        softcap=30.0, backend=backend)
        (dx,) = torch.autograd.grad(out.loss.sum(), hidden)
        ref_hidden = inputs["hidden"].double().requires_grad_(True)
        ref, _ = t3s.reference_t3s_loss(ref_hidden, inputs["weight"].double(), inputs["labels"], reduction="none",
                                        softcap=30.0)
        (ref_dx,) = torch.autograd.grad(ref.sum(), ref_hidden)
        errors[backend] = [((out.loss.double().cpu() - ref.cpu()).abs().max() / ref.abs().max()).item(),
                           ((dx.double().cpu() - ref_dx.cpu()).abs().max() / ref_dx.abs().max()).item()]
    for name, got, eager in zip(("loss", "dX"), errors["triton"], errors["torch"]):
        assert got <= 2 * eager + 1e-8, f"{name}: triton error {got:.2e} vs torch backend {eager:.2e}"


@pytest.mark.parametrize("n_row_blocks,n_vocab_blocks,sms", [(128, 1187, 132), (16, 1187, 132), (256, 2374, 132),
                                                              (128, 1187, 108), (64, 393, 132), (1, 5, 132)])
def test_vocab_splits_fill_whole_waves(n_row_blocks, n_vocab_blocks, sms):
    """The forward grid's splitting: at most MAX_SPLITS splits, every block in one, and within 2% of
    the ideal block-times (all blocks spread evenly over the SMs) wherever the grid can fill the card."""
    from t3s_kernels.ops.configs import MAX_SPLITS, wave_aligned_blocks_per_split

    per_split = wave_aligned_blocks_per_split(n_row_blocks, n_vocab_blocks, sms)
    splits = -(-n_vocab_blocks // per_split)
    assert splits <= MAX_SPLITS and (splits - 1) * per_split < n_vocab_blocks <= splits * per_split
    block_times = -(-n_row_blocks * splits // sms) * per_split
    ideal = n_row_blocks * n_vocab_blocks / sms
    if n_row_blocks * MAX_SPLITS >= 4 * sms:
        assert block_times <= 1.02 * ideal, (splits, per_split, block_times, ideal)
    if (n_row_blocks, n_vocab_blocks, sms) == (128, 1187, 132):  # Qwen3-8B's head, 128 x 128 tiles, an H200
        assert (splits, per_split) == (33, 36)


def test_launch_configuration_lookup(monkeypatch):
    """kernel_config: the card's entry for the variant, then the card's for the kind, then the table."""
    from unittest import mock

    from t3s_kernels.ops import configs

    monkeypatch.setattr(configs, "interpreting", lambda: False)
    card = {90: mock.Mock(major=9), 80: mock.Mock(major=8), 75: mock.Mock(major=7)}
    cfg, meta = {}, torch.device("meta")
    for arch, props in card.items():
        with mock.patch.object(torch.cuda, "get_device_properties", return_value=props):
            for variant in ("plain", ""):
                cfg[arch, variant] = configs.kernel_config("tile_forward", torch.bfloat16, meta, variant)
    base, sm90 = configs.KERNEL_CONFIGS["tile_forward"]["half"], configs.ARCH_CONFIGS[9]["tile_forward"]
    assert cfg[90, "plain"] == sm90["half:plain"] and cfg[90, ""] == sm90["half"] != cfg[90, "plain"]
    assert cfg[80, "plain"] == configs.ARCH_CONFIGS[8]["tile_forward"]["half:plain"] and cfg[80, ""] == base
    assert cfg[75, "plain"] == cfg[75, ""] == base
    assert configs.kernel_config("tile_forward", torch.float32) == configs.KERNEL_CONFIGS["tile_forward"]["fp32"]


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="many tiles of the compiled kernel: a GPU")
@pytest.mark.parametrize("variant", ["plain", "rich"])
def test_token_stats_tile_kernel_as_launched_on_the_card(variant):
    """token_stats with the card's own launch configuration (on sm_90 the plain variant's tensor-descriptor
    FLAT loop) over many row blocks, splits and K slices, against the torch backend."""
    rich = variant == "rich"
    inputs = make_inputs(n=1000, h=264, v=5003, dtype=torch.bfloat16, bias=rich, ignored=7)
    kw = dict(bias=inputs["bias"], softcap=20.0 if rich else None)
    got = t3s.token_stats(inputs["hidden"], inputs["weight"], inputs["labels"], backend="triton", **kw)
    want = t3s.token_stats(inputs["hidden"], inputs["weight"], inputs["labels"], backend="torch", **kw)
    for key in ("logprob", "entropy", "lse"):
        assert_close(getattr(got, key), getattr(want, key), 2e-5, key)
    assert torch.equal(got.correct, want.correct)


def test_token_stats_without_tensor_descriptors(monkeypatch):
    """A Triton without host tensor descriptors (before 3.4): a configuration asking for them falls back
    to the card's general one with pointer loads, and the statistics are the same."""
    from t3s_kernels.ops import configs, tile_forward

    monkeypatch.setitem(configs.INTERPRETER_CONFIGS["tile_forward"], "FLAT", True)
    monkeypatch.setitem(configs.INTERPRETER_CONFIGS["tile_forward"], "TMA", True)
    monkeypatch.setattr(tile_forward, "TensorDescriptor", None)
    check_token_stats("triton", torch.bfloat16, 1.0, softcap=None, bias=False, v=150)


@pytest.mark.parametrize("kd_mode", [1, 2, 3])
def test_distill_epilogue_shares_exponentials_at_unit_temperature(kd_mode, monkeypatch):
    """At T = 1 the student's CE state and tempered state share one exponential per logit
    (``SAME_TEMP``), as do CE's and the KD's p in the gradient sweep: statistics, KD and dL/dz equal
    bit for bit what separate exponentials give."""
    import math

    from t3s_kernels.ops import distill_epilogue as module

    g = torch.Generator().manual_seed(3)
    rows, v = 5, 83
    student, teacher = ((torch.randn(rows, v, generator=g) * 3).to(DEVICE) for _ in range(2))
    labels = torch.randint(0, v, (rows,), generator=g).to(DEVICE)
    row_scale = torch.rand(rows, generator=g).to(DEVICE)
    scalars = dict(softcap=1.0, logit_scale=1.0, ce_weight=0.8, smoothing=0.1, inv_vocab=1.0 / v, z_loss=1e-3,
                   kd_coef=0.6, beta=0.3, inv_temp=1.0, log_beta=math.log(0.3), log_1m_beta=math.log(0.7))

    def run():  # dL/dz is written over the student's logits: a copy each time
        return module.distill_epilogue(student.clone(), teacher, labels, row_scale, scalars, kd_mode, False, True,
                                       torch.float32)

    shared = run()
    kernel = module.distill_epilogue_kernel

    class Separate:
        def __getitem__(self, grid):
            launch = kernel[grid]
            return lambda *args, **kwargs: launch(*args, **{**kwargs, "SAME_TEMP": False})

    monkeypatch.setattr(module, "distill_epilogue_kernel", Separate())
    separate = run()
    assert torch.equal(shared[0], separate[0]) and torch.equal(shared[1], separate[1])
