"""Distillation against an fp64 eager transcription: every kd_loss, beta, temperature, with CE,
weights, ignored labels; the sparse teacher on its support; refusals; the memory bound."""

import math

import pytest
import torch
import torch.nn.functional as F

import t3s_kernels as t3s
from t3s_kernels.reference import divergence
from tests.helpers import DEVICE, TOLERANCE, assert_close, make_inputs

HT = 40


def teacher(n=37, v=203, seed=7, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, HT, generator=g).to(DEVICE, dtype),
            (torch.randn(v, HT, generator=g) * 0.3).to(DEVICE, dtype))


def eager_loss(x, w, y, tw, t_logits, *, kd_loss, beta, temperature, kd_weight, ce_weight, reduction, t2=False,
               logit_scale=1.0):
    """The fp64 reference (reference.py) of CE + KD; (loss, per-token kd at labelled positions)."""
    loss, stats = t3s.reference_t3s_loss(x, w, y, token_weights=tw, teacher_logits=t_logits, kd_loss=kd_loss,
                                         jsd_beta=beta, kd_temperature=temperature, kd_weight=kd_weight,
                                         ce_weight=ce_weight, reduction=reduction, kd_t2_scaling=t2,
                                         logit_scale=logit_scale)
    return loss, stats["kd"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kd_loss,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0),
                                          pytest.param("jsd", 0.3, marks=pytest.mark.gpu),
                                          ("jsd", 1.0)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dense_teacher_matches_reference(backend, kd_loss, beta, temperature, dtype, reduction):
    inputs = make_inputs(dtype=dtype, weights="zeros", ignored=4)
    th, tw_ = teacher(dtype=dtype)
    x = inputs["hidden"].clone().requires_grad_()
    w = inputs["weight"].clone().requires_grad_()
    out = t3s.fused_linear_t3s_loss(x, w, inputs["labels"], token_weights=inputs["token_weights"], teacher_hidden=th,
                                    teacher_weight=tw_, kd_weight=0.6, ce_weight=0.8, kd_loss=kd_loss, jsd_beta=beta,
                                    kd_temperature=temperature, reduction=reduction, return_stats=True, backend=backend)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref, kd = eager_loss(xd, wd, inputs["labels"], inputs["token_weights"], th.double() @ tw_.double().t(),
                         kd_loss=kd_loss, beta=beta, temperature=temperature, kd_weight=0.6, ce_weight=0.8,
                         reduction=reduction)
    tol = TOLERANCE[dtype]
    assert_close(out.loss, ref, tol["value"], "loss")
    assert_close(out.kd, kd, tol["value"], "kd", floor=1e-2)
    g = torch.linspace(0.5, 1.5, out.loss.numel(), device=out.loss.device).view(out.loss.shape)
    for name, got, want in zip(("dX", "dW"), torch.autograd.grad(out.loss, (x, w), g),
                               torch.autograd.grad(ref, (xd, wd), g.double())):
        assert_close(got, want, tol["grad"], name)


@pytest.mark.gpu
def test_triton_distillation_with_softcap_smoothing_bias_and_several_chunks():
    inputs = make_inputs(bias=True, weights="zeros", ignored=3, logit_scale=2.0)
    th, tw_ = teacher()
    kw = dict(teacher_hidden=th, teacher_weight=tw_, kd_weight=0.7, kd_loss="jsd", jsd_beta=0.3, kd_temperature=1.5,
              softcap=4.0, label_smoothing=0.1, z_loss=1e-3, return_stats=True)
    outs, grads = [], []
    for backend, budget in (("torch", None), ("triton", 10 * 203 * 8)):
        x = inputs["hidden"].clone().requires_grad_()
        out = t3s.fused_linear_t3s_loss(x, inputs["weight"], inputs["labels"], bias=inputs["bias"],
                                        token_weights=inputs["token_weights"], backend=backend,
                                        chunk_budget_bytes=budget, teacher_bias=inputs["bias"] * 0.5, **kw)
        outs.append(out)
        grads.append(torch.autograd.grad(out.loss, x)[0])
    for out, grad in zip(outs[1:], grads[1:]):
        assert_close(out.loss, outs[0].loss, 1e-6, "loss")
        assert_close(out.kd, outs[0].kd, 1e-5, "kd", floor=1e-2)
        assert_close(out.entropy, outs[0].entropy, 1e-6, "entropy")
        assert_close(grad, grads[0], 1e-5, "dX")


def test_t2_scaling_and_no_teacher_grad():
    inputs = make_inputs()
    th, tw_ = teacher()
    th.requires_grad_()
    x = inputs["hidden"].clone().requires_grad_()
    kw = dict(teacher_hidden=th, teacher_weight=tw_, kd_weight=1.0, kd_temperature=3.0, ce_weight=0.0)
    plain = t3s.fused_linear_t3s_loss(x, inputs["weight"], inputs["labels"], **kw).loss
    scaled = t3s.fused_linear_t3s_loss(x, inputs["weight"], inputs["labels"], kd_t2_scaling=True, **kw).loss
    assert_close(scaled, 9 * plain, 1e-6, "T^2")
    gx, gth = torch.autograd.grad(scaled, (x, th), allow_unused=True)
    assert gx is not None and gx.abs().sum() > 0
    assert gth is None  # the teacher gets no gradient, even when its hidden states ask for one


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("kd_loss,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.gpu)])
def test_sparse_teacher_matches_eager_formula_on_its_support(backend, tail, kd_loss, beta, temperature):
    inputs = make_inputs(weights="zeros", ignored=3)
    th, tw_ = teacher()
    k = 8
    t_logp = torch.log_softmax(th.double() @ tw_.double().t(), -1)  # on DEVICE, like the inputs
    top = t_logp.topk(k, -1)
    ids, lps = top.indices, top.values.float()
    x = inputs["hidden"].clone().requires_grad_()
    out = t3s.fused_linear_t3s_loss(x, inputs["weight"], inputs["labels"], token_weights=inputs["token_weights"],
                                    teacher_topk_ids=ids, teacher_topk_logprobs=lps, kd_weight=1.0, kd_loss=kd_loss,
                                    jsd_beta=beta, kd_temperature=temperature, sparse_tail=tail, return_stats=True,
                                    backend=backend)
    xd = x.detach().double().requires_grad_()
    s = (xd @ inputs["weight"].double().t()) / temperature
    if tail == "renormalize":
        lp = torch.log_softmax(s.gather(1, ids), -1)
        lq = torch.log_softmax(lps.double() / temperature, -1)
    else:
        p_support = torch.softmax(s, -1).gather(1, ids)
        lp = torch.cat([p_support, 1 - p_support.sum(-1, keepdim=True)], -1).log()
        q = torch.cat([lps.double().exp(), 1 - lps.double().exp().sum(-1, keepdim=True)], -1)
        lq = torch.log_softmax(q.log() / temperature, -1)
    kd = divergence(lp, lq, kd_loss, beta)  # the reference's divergences, on the support
    y, tw = inputs["labels"], inputs["token_weights"]
    ce = F.cross_entropy(xd @ inputs["weight"].double().t(), y, ignore_index=-100, reduction="none")
    contrib = (y != -100) & (tw != 0)
    ref = torch.where(contrib, tw.double() * (ce + kd), torch.zeros_like(ce)).sum() / contrib.sum()
    assert_close(out.loss, ref, 1e-5, "loss")
    assert_close(torch.autograd.grad(out.loss, x)[0], torch.autograd.grad(ref, xd)[0], 1e-5, "dX")


@pytest.mark.parametrize("backend,n,h,v", [
    ("torch", 2048, 32, 8192),
    ("triton", 128, 16, 2048),
])
def test_distillation_never_holds_full_logits(backend, n, h, v):
    """Peak memory of fwd+bwd with a teacher: within the chunk budget; a full N x V fp32 buffer (of
    either head) would exceed the bound.
    Measured on the CPU (Triton under its interpreter); the GPU check measures the GPU."""
    import os

    from t3s_kernels.bench import peak_memory_bytes

    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors run Triton kernels only under TRITON_INTERPRET=1")

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, h, generator=g).requires_grad_()
    w = (torch.randn(v, h, generator=g) * 0.2).requires_grad_()
    th, tw_ = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.2
    y = torch.randint(0, v, (n,), generator=g)
    budget = (n * v * 4) // 16

    def step():
        loss = t3s.fused_linear_t3s_loss(x, w, y, teacher_hidden=th, teacher_weight=tw_, kd_weight=1.0,
                                         kd_loss="jsd", chunk_budget_bytes=budget, backend=backend).loss
        loss.backward()

    _, peak = peak_memory_bytes(step, torch.device("cpu"))
    outputs = (n * h + 2 * v * h) * 4  # dX, and dW with its fp32 accumulator
    bound = outputs + budget + 64 * (n + v) + (128 << 10)
    assert peak <= bound, f"peak {peak / 2**20:.2f} MiB > bound {bound / 2**20:.2f} MiB"
    assert n * v * 4 > bound  # a full N x V buffer would have shown


@pytest.mark.parametrize("changes,error,pattern", [
    (dict(teacher_weight=torch.randn(202, HT, device=DEVICE)), ValueError,
     r"teacher_weight must have shape \(V, Ht\) with the student's V = 203"),
    (dict(teacher_hidden=torch.randn(36, HT, device=DEVICE)), ValueError,
     r"teacher_hidden must have shape hidden.shape\[:-1\] \+ \(Ht,\)"),
    (dict(kd_loss="kl"), ValueError, r"kd_loss must be one of"),
    (dict(jsd_beta=1.5), ValueError, r"jsd_beta must be <= 1"),
    (dict(kd_temperature=0.0), ValueError, r"kd_temperature must be > 0"),
    (dict(sparse_tail="drop"), ValueError, r"sparse_tail must be one of"),
    (dict(teacher_topk_ids=torch.zeros(37, 4, dtype=torch.long, device=DEVICE),
          teacher_topk_logprobs=torch.zeros(37, 4, device=DEVICE)), ValueError, "not both"),
])
def test_dense_teacher_refusals(changes, error, pattern):
    inputs = make_inputs()
    th, tw_ = teacher()
    kw = {"teacher_hidden": th, "teacher_weight": tw_, "kd_weight": 1.0, **changes}
    with pytest.raises(error, match=pattern):
        t3s.fused_linear_t3s_loss(inputs["hidden"], inputs["weight"], inputs["labels"], **kw)


@pytest.mark.parametrize("ids,lps,pattern", [
    (torch.full((37, 4), 203), torch.zeros(37, 4) - 1, r"teacher_topk_ids must lie in \[0, V\) = \[0, 203\)"),
    (torch.zeros(37, 4, dtype=torch.long), torch.full((37, 4), 0.5), r"must be finite log-probabilities \(<= 0\)"),
    (torch.zeros(36, 4, dtype=torch.long), torch.zeros(36, 4), r"teacher_topk_ids must have shape"),
    (torch.zeros(37, 0, dtype=torch.long), torch.zeros(37, 0), r"K >= 1 tokens per position; got K = 0"),
    (torch.tensor([[1, 2, 1, 3]] * 37), torch.full((37, 4), -2.0), r"repeats a token within a position"),
    (torch.tensor([[1, 2, 3, 4]] * 37), torch.full((37, 4), -0.5), r"sum to more than probability 1"),
])
def test_sparse_teacher_refusals(ids, lps, pattern):
    inputs = make_inputs()
    ids, lps = ids.to(DEVICE), lps.to(DEVICE)
    with pytest.raises(ValueError, match=pattern):
        t3s.fused_linear_t3s_loss(inputs["hidden"], inputs["weight"], inputs["labels"], teacher_topk_ids=ids,
                                  teacher_topk_logprobs=lps, kd_weight=1.0)


def test_kd_weight_needs_a_teacher():
    inputs = make_inputs()
    with pytest.raises(ValueError, match="kd_weight > 0 needs a teacher"):
        t3s.fused_linear_t3s_loss(**inputs, kd_weight=0.5)
    assert math.isfinite(t3s.fused_linear_t3s_loss(**inputs).loss.item())


@pytest.mark.parametrize("kd_loss", ["forward_kl", "jsd"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_student_logit_scale_with_a_teacher(backend, kd_loss):
    """A student with its own logit multiplier (Cohere-style): CE and KD both see the scaled logits;
    the teacher's logits are its own. Compared with the eager transcription on scaled logits."""
    inputs = make_inputs(weights="zeros", ignored=4, logit_scale=4.0)
    th, tw_ = teacher()
    x = inputs["hidden"].clone().requires_grad_()
    w = inputs["weight"].clone().requires_grad_()
    out = t3s.fused_linear_t3s_loss(x, w, inputs["labels"], token_weights=inputs["token_weights"], teacher_hidden=th,
                                    teacher_weight=tw_, kd_weight=0.6, kd_loss=kd_loss, kd_temperature=2.0,
                                    logit_scale=0.25, backend=backend)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref, _ = eager_loss(xd, wd, inputs["labels"], inputs["token_weights"], th @ tw_.t(), kd_loss=kd_loss,
                        beta=0.5, temperature=2.0, kd_weight=0.6, ce_weight=1.0, reduction="mean", logit_scale=0.25)
    assert_close(out.loss, ref, 1e-5, "loss")
    for got, want in zip(torch.autograd.grad(out.loss, (x, w)), torch.autograd.grad(ref, (xd, wd))):
        assert_close(got, want, 1e-5, "grad")


def test_teacher_bias_dtype_is_checked():
    inputs = make_inputs()
    th, tw_ = teacher()
    with pytest.raises(TypeError, match="teacher_bias must have teacher_weight's dtype"):
        t3s.fused_linear_t3s_loss(inputs["hidden"], inputs["weight"], inputs["labels"], teacher_hidden=th,
                                  teacher_weight=tw_, teacher_bias=torch.zeros(203, dtype=torch.float64, device=DEVICE),
                                  kd_weight=1.0)


@pytest.mark.parametrize("kd_loss", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_nan_teacher_gives_a_nan_loss_as_eager_does(backend, kd_loss):
    inputs = make_inputs()
    th, tw_ = teacher()
    th = th.clone()
    th[3] = float("nan")
    out = t3s.fused_linear_t3s_loss(inputs["hidden"], inputs["weight"], inputs["labels"], teacher_hidden=th,
                                    teacher_weight=tw_, kd_weight=0.5, kd_loss=kd_loss, backend=backend,
                                    return_stats=True)
    assert math.isnan(out.loss.item()) and math.isnan(out.kd[3].item())


def test_teacher_head_is_cast_under_autocast_like_the_students():
    """Under torch.autocast the teacher's hidden states come out in the autocast dtype while its head is
    float32: the head runs in the autocast dtype, as F.linear would, for the teacher as for the student."""
    inputs = make_inputs()
    th, tw_ = teacher()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = t3s.fused_linear_t3s_loss(inputs["hidden"], inputs["weight"], inputs["labels"],
                                        teacher_hidden=th.bfloat16(), teacher_weight=tw_, kd_weight=0.5,
                                        backend="torch")
        ref = t3s.fused_linear_t3s_loss(inputs["hidden"].bfloat16(), inputs["weight"].bfloat16(), inputs["labels"],
                                        teacher_hidden=th.bfloat16(), teacher_weight=tw_.bfloat16(), kd_weight=0.5,
                                        backend="torch")
    assert math.isfinite(out.loss.item())
    assert_close(out.loss, ref.loss, 1e-6, "loss")


@pytest.mark.parametrize("kd_loss,beta", [("forward_kl", 0.5), ("jsd", 0.3)])
def test_dense_teacher_with_input_dtype_logits(kd_loss, beta):
    """logits_dtype="input": both heads' logits in bf16, dL/dz written over the student's; the fp64
    reference on the same rounded logits of both heads."""
    inputs = make_inputs(dtype=torch.bfloat16, weights="zeros", ignored=4)
    th, tw_ = teacher(dtype=torch.bfloat16)
    x = inputs["hidden"].clone().requires_grad_()
    w = inputs["weight"].clone().requires_grad_()
    kw = dict(kd_weight=0.6, ce_weight=0.8, kd_loss=kd_loss, jsd_beta=beta, kd_temperature=2.0)
    out = t3s.fused_linear_t3s_loss(x, w, inputs["labels"], token_weights=inputs["token_weights"], teacher_hidden=th,
                                    teacher_weight=tw_, backend="triton", logits_dtype="input",
                                    **kw)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    t_logits = (th.double() @ tw_.double().t()).to(torch.bfloat16).double()
    ref, _ = t3s.reference_t3s_loss(xd, wd, inputs["labels"], token_weights=inputs["token_weights"],
                                    teacher_logits=t_logits, round_logits=torch.bfloat16,
                                    **kw)
    tol = TOLERANCE[torch.bfloat16]
    assert_close(out.loss, ref, tol["value"], "loss")
    for name, got, want in zip(("dX", "dW"), torch.autograd.grad(out.loss, (x, w)), torch.autograd.grad(ref, (xd, wd))):
        assert_close(got, want, tol["grad"], name)


@pytest.mark.parametrize("kd_loss,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_unit_temperature_with_far_apart_heads(kd_loss, beta):
    """T = 1 (the default: one exponential per logit serves CE and the KD in the Triton epilogue) with a
    teacher far from the student: logits tens apart, so many tempered probabilities and mixture
    terms underflow to 0 in float32. Every output equals the fp64 reference at fp32 accuracy, no NaN."""
    inputs = make_inputs(n=13, v=67, bias=True, weights="zeros", ignored=2)
    th, tw_ = teacher(n=13, v=67)
    x = inputs["hidden"].clone().requires_grad_()
    w = inputs["weight"].clone().requires_grad_()
    kw = dict(kd_weight=0.6, ce_weight=0.8, kd_loss=kd_loss, jsd_beta=beta, label_smoothing=0.1, z_loss=1e-3)
    tw_ = tw_ * 40  # teacher logits of std ~ 75
    out = t3s.fused_linear_t3s_loss(x, w, inputs["labels"], bias=inputs["bias"], token_weights=inputs["token_weights"],
                                    teacher_hidden=th, teacher_weight=tw_, return_stats=True, backend="triton",
                                    **kw)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref, stats = t3s.reference_t3s_loss(xd, wd, inputs["labels"], bias=inputs["bias"].double(),
                                        token_weights=inputs["token_weights"],
                                        teacher_logits=th.double() @ tw_.double().t(), **kw)
    assert torch.isfinite(out.kd).all()
    assert_close(out.loss, ref, 1e-5, "loss")
    assert_close(out.kd, stats["kd"], 1e-5, "kd", floor=1e-2)
    for name, got, want in zip(("dX", "dW"), torch.autograd.grad(out.loss, (x, w)), torch.autograd.grad(ref, (xd, wd))):
        assert_close(got, want, 1e-5, name)
