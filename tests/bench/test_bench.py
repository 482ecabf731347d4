"""The benchmark harness itself (t3s_kernels/bench/): that its error column catches a wrong provider,
its memory column sees an allocation, its ratios are against the floor it measured, a missing peer
is reported rather than fatal, and the sweep writes JSON and plots that read back. Tiny CPU shapes:
these check the harness, not speed."""

import json
import warnings

import pytest
import torch

from t3s_kernels.bench import PROVIDERS, Inputs, Report, format_report, peak_memory_bytes, report_json, run_bench
from t3s_kernels.bench.measure import max_rel_error, reference_grads
from t3s_kernels.bench.providers import IGNORE
from t3s_kernels.bench.sweep import run_sweep, series
from t3s_kernels.reference import reference_t3s_loss

SHAPE = dict(tokens=48, hidden=16, vocab=300, dtype="fp32")
CPU = torch.device("cpu")


def test_table_rows_are_exact_and_the_ratios_use_the_measured_floor():
    report = run_bench(**SHAPE, select=0.6, providers=["eager", "t3s-torch", "t3s-token-stats"], device="cpu",
                       repeat=1, progress=False)
    rows = {r.provider: r for r in report.rows}
    for name in ("eager", "t3s-torch"):  # fp32 inputs against the float64 reference: fp32 rounding only
        assert rows[name].max_rel_err < 1e-5, rows[name]
        assert rows[name].fwd_ms > 0 and rows[name].fwd_bwd_ms > 0 and rows[name].peak_mib > 0
    assert rows["t3s-token-stats"].fwd_bwd_ms is None and rows["t3s-token-stats"].note == "forward only"
    assert rows["eager"].backend == "PyTorch eager"
    assert rows["t3s-torch"].backend.startswith("t3s torch/chunked, dW accumulated in float32, logits_dtype=auto, ")
    table = format_report(report)
    line = next(line for line in table.splitlines() if line.startswith("t3s-torch"))
    assert f"{rows['t3s-torch'].fwd_ms / report.floor_1mm_ms:.2f}" in line.split()
    assert f"{rows['t3s-torch'].fwd_bwd_ms / report.floor_3mm_ms:.2f}" in line.split()
    assert Report.from_dict(json.loads(report_json(report))) == report


def test_the_error_column_catches_a_wrong_provider(monkeypatch):
    def off_by_one_label(inputs, grad):  # a plausible bug: every label shifted by one column
        shifted = Inputs(inputs.hidden, inputs.weight, inputs.labels, (inputs.masked_labels + 1) % 300,
                         inputs.token_weights)
        return PROVIDERS["eager"](shifted, grad)

    monkeypatch.setitem(PROVIDERS, "wrong", off_by_one_label)
    report = run_bench(**SHAPE, providers=["wrong"], device="cpu", repeat=1, progress=False)
    assert report.rows[0].max_rel_err > 1e-2


def test_reference_grads_equal_autograd_in_float64():
    inputs = Inputs.make(37, 8, 50, torch.float64, CPU, select=0.5, seed=3)
    x, w = inputs.hidden.clone().requires_grad_(), inputs.weight.clone().requires_grad_()
    loss, _ = reference_t3s_loss(x, w, inputs.masked_labels, ignore_index=IGNORE)  # mean over the selected
    loss.backward()
    chunked = reference_grads(inputs, chunk_rows=10)  # row chunks: the mean's divisor known up front
    assert max_rel_error(chunked, (loss, x.grad, w.grad)) < 1e-12


def test_peak_memory_sees_an_allocation():
    def allocate():
        block = torch.ones(1 << 18)  # 1 MiB
        return block.sum()

    _, peak = peak_memory_bytes(allocate, CPU)
    assert (1 << 20) <= peak < (1 << 20) + (64 << 10)


def test_pytorch_linear_cross_entropy_rows_are_exact_and_name_their_policy():
    names = ["torch-lce", "torch-lce-chunked", "torch-lce-chunked-256"]
    report = run_bench(**SHAPE, select=0.6, providers=names, device="cpu", repeat=1, progress=False)
    rows = {r.provider: r for r in report.rows}
    for name in names:
        assert rows[name].max_rel_err < 1e-5 and rows[name].fwd_bwd_ms > 0, rows[name]
    assert rows["torch-lce"].backend.endswith("linear_cross_entropy, options=None (reference path)")
    # the policy as PyTorch resolves it at this shape: "auto" is not what ran
    assert "acc_policy=compact, batch_chunk_size=" in rows["torch-lce-chunked"].backend
    assert "acc_policy=compact, batch_chunk_size=48," in rows["torch-lce-chunked-256"].backend  # 256, at most N
    assert "implementations: " in format_report(report)


def test_pytorch_falling_back_to_its_reference_path_is_refused(monkeypatch):
    def falls_back(*args, **kwargs):
        warnings.warn("linear_cross_entropy: ``options`` ignored; chunked path needs ...")
        return torch.zeros((), requires_grad=True)

    monkeypatch.setattr(torch.nn.functional, "linear_cross_entropy", falls_back)
    report = run_bench(**SHAPE, providers=["torch-lce-chunked"], device="cpu", repeat=1, check_error=False,
                       progress=False)
    assert report.rows[0].fwd_bwd_ms is None and "options`` ignored" in report.rows[0].note, report.rows[0]


def test_statistics_rows():
    report = run_bench(**SHAPE, select=0.6, providers=["t3s-torch-stats", "liger-stats"], device="cpu", repeat=1,
                       progress=False)
    ours, liger = report.rows
    assert ours.max_rel_err < 1e-5 and ours.backend.endswith("return_stats=True, native epilogue") or \
        ours.backend.endswith("return_stats=True, PyTorch epilogue"), ours
    assert liger.fwd_ms is None and (liger.note.startswith("not installed") or "needs CUDA" in liger.note), liger


def test_missing_peer_and_unknown_provider():
    report = run_bench(**SHAPE, providers=["liger", "liger-cute", "liger-stats", "cce", "quack"], device="cpu",
                       repeat=1, check_error=False, progress=False)
    for row in report.rows:  # not installed in the test environment, or no CUDA: said, not raised
        assert row.fwd_ms is None and (row.note.startswith("not installed") or "needs CUDA" in row.note), row
    with pytest.raises(ValueError, match=r"unknown provider\(s\) \['nope'\]"):
        run_bench(**SHAPE, providers=["nope"], device="cpu", progress=False)


def test_sweep_writes_json_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    reports, written = run_sweep(tokens=[32, 64], vocab=[200, 300], hidden=16, dtype="fp32", out=str(tmp_path),
                                 providers=["eager", "t3s-torch"], device="cpu", repeat=1, progress=False)
    assert [p.rsplit("/", 1)[1] for p in written] == ["sweep.json", "sweep-V200.png", "sweep-V300.png"]
    saved = [Report.from_dict(d) for d in json.loads(open(written[0]).read())]
    assert saved == reports and [(r.shape["vocab"], r.shape["tokens"]) for r in saved] == [
        (200, 32), (200, 64), (300, 32), (300, 64)]
    n, ms = series(saved, 300, "t3s-torch", "fwd_bwd_ms")
    assert n == [32, 64] and all(v > 0 for v in ms)
    for png in written[1:]:
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
