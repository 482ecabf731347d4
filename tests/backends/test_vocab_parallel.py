"""A head split over the vocabulary across two processes (gloo): the loss, every statistic and
every gradient equal the fp64 reference of the whole head, under every loss option and token
weights; token_stats and distillation (dense teacher split the same way, sparse top-k) too.
dX is summed across ranks, dW stays each rank's rows. Tolerances are
the single-process fp32 ones (helpers.TOLERANCE): the merge adds one exp/log per row."""

import pytest
import torch

import t3s_kernels as t3s
from tests.helpers import TOLERANCE, assert_close, make_inputs, run_on_two_ranks

dist = pytest.importorskip("torch.distributed")

RICH = dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0, logit_scale=0.5)
# (options, backend): every option family on the torch backend; the Triton one (compiled on a GPU,
# interpreted here) under the richest options.
OPTION_SETS = [
    (dict(), "torch"),
    (RICH, "torch"),
    (dict(reduction="sum", ce_weight=0.7), "torch"),
    (dict(reduction="none"), "torch"),
    (RICH, "triton"),
]
SPLIT = 120  # rank 0 holds entries [0, 120) of 203, rank 1 [120, 203): uneven on purpose
# Distillation: a dense teacher split the same way, or a sparse top-k teacher; every divergence.
DISTILL_SETS = [
    dict(kd_loss="forward_kl", kd_weight=0.6, ce_weight=0.8),
    dict(kd_loss="jsd", jsd_beta=0.3, kd_temperature=2.0, kd_t2_scaling=True, kd_weight=0.5, **RICH),
    dict(kd_loss="reverse_kl", kd_temperature=1.5, kd_weight=1.0, reduction="none"),
    dict(kd_loss="forward_kl", kd_weight=0.7, sparse=True, sparse_tail="renormalize", kd_temperature=2.0),
    dict(kd_loss="jsd", jsd_beta=0.4, kd_weight=0.7, sparse=True, sparse_tail="bucket", **RICH),
]


def _inputs():
    return make_inputs(n=37, h=48, v=203, bias=True, weights="zeros", ignored=4, device="cpu")


def _teacher(inputs, options, rows=slice(None)):
    """The teacher's arguments for one distillation set: its head's ``rows``, or a top-k cache."""
    g = torch.Generator().manual_seed(11)
    t_hidden, t_weight = torch.randn(37, 40, generator=g), torch.randn(203, 40, generator=g) * 0.3
    if not options.get("sparse"):
        return dict(teacher_hidden=t_hidden, teacher_weight=t_weight[rows], teacher_bias=inputs["bias"][rows] * 0.5)
    top = torch.log_softmax(t_hidden @ t_weight.t(), -1).topk(9, -1)
    return dict(teacher_topk_ids=top.indices, teacher_topk_logprobs=top.values)


def _distill_run(inputs, options, rows=slice(None), **kw):
    """Loss, kd, statistics and gradients of one distillation set (the head's ``rows``)."""
    teacher = _teacher(inputs, options, rows)
    options = {k: v for k, v in options.items() if k != "sparse"}
    hidden = inputs["hidden"].clone().requires_grad_(True)
    weight = inputs["weight"][rows].clone().requires_grad_(True)
    out = t3s.fused_linear_t3s_loss(hidden, weight, inputs["labels"], bias=inputs["bias"][rows],
                                    token_weights=inputs["token_weights"], return_stats=True,
                                    **teacher, **options, **kw)
    g = torch.linspace(0.5, 1.5, out.loss.numel()).view(out.loss.shape)
    dx, dw = torch.autograd.grad(out.loss, (hidden, weight), g)
    return {"loss": out.loss.detach(), "kd": out.kd, "logprob": out.logprob, "entropy": out.entropy,
            "correct": out.correct, "dx": dx, "dw": dw}


def _worker(rank):
    inputs = _inputs()
    rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, 203)
    shard = t3s.VocabShard(start=rows.start, vocab_size=203)
    results = []
    for options, backend in OPTION_SETS:
        hidden = inputs["hidden"].clone().requires_grad_(True)
        weight = inputs["weight"][rows].clone().requires_grad_(True)
        bias = inputs["bias"][rows].clone().requires_grad_(True)
        out = t3s.fused_linear_t3s_loss(hidden, weight, inputs["labels"], bias=bias,
                                        token_weights=inputs["token_weights"], return_stats=True,
                                        backend=backend, vocab_parallel=shard, **options)
        g = torch.linspace(0.5, 1.5, out.loss.numel()).view(out.loss.shape)
        dx, dw, db = torch.autograd.grad(out.loss, (hidden, weight, bias), g)
        results.append({"loss": out.loss.detach(), "logprob": out.logprob, "entropy": out.entropy,
                        "correct": out.correct, "lse": out.lse, "dx": dx, "dw": dw, "db": db})
    distilled = [_distill_run(inputs, options, rows, backend=backend, vocab_parallel=shard)
                 for options in DISTILL_SETS for backend in ("torch", "triton")]
    stats = t3s.token_stats(inputs["hidden"], inputs["weight"][rows], inputs["labels"], bias=inputs["bias"][rows],
                            softcap=4.0, temperature=2.0, backend="torch", vocab_parallel=shard)
    refused = ""
    try:  # both ranks claim entries from 0: the shards overlap
        t3s.fused_linear_t3s_loss(inputs["hidden"], inputs["weight"][rows], inputs["labels"], backend="torch",
                                  vocab_parallel=t3s.VocabShard(start=0, vocab_size=203))
    except ValueError as e:
        refused = str(e)
    return {"results": results, "distilled": distilled, "stats": stats, "refused": refused}


def test_vocab_parallel_head_equals_the_whole_head(tmp_path):
    ranks = run_on_two_ranks(_worker, tmp_path)
    inputs = _inputs()
    tol = TOLERANCE[torch.float32]
    for k, (options, backend) in enumerate(OPTION_SETS):
        options_name = f"{backend} {options}"
        ref_in = [inputs[n].double().requires_grad_(True) for n in ("hidden", "weight", "bias")]
        ref, ref_stats = t3s.reference_t3s_loss(ref_in[0], ref_in[1], inputs["labels"], bias=ref_in[2],
                                                token_weights=inputs["token_weights"], **options)
        g = torch.linspace(0.5, 1.5, ref.numel(), dtype=torch.float64).view(ref.shape)
        ref_dx, ref_dw, ref_db = torch.autograd.grad(ref, ref_in, g)
        for rank, rows in ((0, slice(0, SPLIT)), (1, slice(SPLIT, 203))):
            got = ranks[rank]["results"][k]
            assert_close(got["loss"], ref, tol["value"], f"{options_name} loss")
            for key in ("logprob", "entropy", "lse"):
                assert_close(got[key], ref_stats[key], tol["value"], f"{options_name} {key}")
            assert torch.equal(got["correct"], ref_stats["correct"]), f"{options_name} correct"
            assert_close(got["dx"], ref_dx, tol["grad"], f"{options_name} dX")
            assert_close(got["dw"], ref_dw[rows], tol["grad"], f"{options_name} dW rows {rows}")
            assert_close(got["db"], ref_db[rows], tol["grad"], f"{options_name} db rows {rows}")
    whole = t3s.token_stats(inputs["hidden"], inputs["weight"], inputs["labels"], bias=inputs["bias"], softcap=4.0,
                            temperature=2.0, backend="torch")
    for rank in (0, 1):
        part = ranks[rank]["stats"]
        for key in ("logprob", "entropy", "lse"):
            assert_close(getattr(part, key), getattr(whole, key), 1e-6, f"token_stats {key}")
        assert torch.equal(part.correct, whole.correct)
        assert "do not tile" in ranks[rank]["refused"]


    # Distillation: each rank's result equals the whole head's on the torch backend (itself checked
    # against the fp64 eager divergences in tests/test_distill.py), within the fp32 tolerances.
    for k, options in enumerate(DISTILL_SETS):
        whole = _distill_run(inputs, options, backend="torch")
        for rank, rows in ((0, slice(0, SPLIT)), (1, slice(SPLIT, 203))):
            for backend_k, backend in enumerate(("torch", "triton")):
                got, name = ranks[rank]["distilled"][2 * k + backend_k], f"distill {backend} {options}"
                for key in ("loss", "kd", "logprob", "entropy", "dx"):
                    assert_close(got[key], whole[key], tol["grad" if key == "dx" else "value"], f"{name} {key}",
                                 floor=1e-2)
                assert torch.equal(got["correct"], whole["correct"]), f"{name} correct"
                assert_close(got["dw"], whole["dw"][rows], tol["grad"], f"{name} dW rows {rows}")


def test_vocab_parallel_needs_a_process_group():
    inputs = _inputs()
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(ValueError, match="needs an initialized torch.distributed process group"):
        t3s.fused_linear_t3s_loss(inputs["hidden"], inputs["weight"], inputs["labels"],
                                  vocab_parallel=t3s.VocabShard(start=0, vocab_size=203))
