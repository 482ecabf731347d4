"""Bad input raises a ValueError / TypeError that names the argument and what was expected."""

import pytest
import torch

import t3s_kernels as t3s
from tests.helpers import make_inputs


def call(**changes):
    inputs = {"backend": "torch", **make_inputs(n=7, h=8, v=11), **changes}
    options = {k: inputs.pop(k) for k in list(inputs) if k not in ("hidden", "weight", "labels")}
    return t3s.fused_linear_t3s_loss(inputs["hidden"], inputs["weight"], inputs["labels"], **options)


@pytest.mark.parametrize("changes,error,pattern", [
    (dict(hidden=torch.randn(7, 9)), ValueError, r"hidden must have shape \(\.\.\., H\) with H = weight"),
    (dict(weight=torch.randn(11)), ValueError, r"weight must have shape \(V, H\)"),
    (dict(labels=torch.tensor([0, 1, 2, 3, 4, 5, 11])), ValueError,
     r"labels must lie in \[0, V\) = \[0, 11\).*found 11"),
    (dict(labels=torch.tensor([0, 1, 2, 3, 4, 5, -1])), ValueError, r"labels must lie in .*found -1"),
    (dict(labels=torch.zeros(7)), TypeError, r"labels must be an int64 or int32 tensor"),
    (dict(labels=torch.zeros(6, dtype=torch.long)), ValueError, r"labels must have shape hidden.shape\[:-1\]"),
    (dict(hidden=torch.randn(7, 8, dtype=torch.float64)), TypeError, r"hidden must be float32, bfloat16 or float16"),
    (dict(hidden=torch.randn(7, 8).bfloat16()), TypeError, r"hidden and weight must share a dtype"),
    (dict(bias=torch.randn(10)), ValueError, r"bias must have shape \(V,\) = \(11,\)"),
    (dict(bias=torch.randn(11).half()), TypeError, r"bias must have the weight's dtype"),
    (dict(token_weights=torch.ones(6)), ValueError, r"token_weights must have the labels' shape"),
    (dict(token_weights=torch.ones(7, dtype=torch.long)), TypeError, r"token_weights must be a floating-point"),
    (dict(token_weights=-torch.ones(7)), ValueError, r"token_weights must be finite and >= 0"),
    (dict(token_weights=torch.full((7,), float("nan"))), ValueError, r"token_weights must be finite"),
    (dict(reduction="avg"), ValueError, r"reduction must be one of 'mean', 'sum', 'none'; got 'avg'"),
    (dict(backend="cuda"), ValueError, r"backend must be one of"),
    (dict(strategy="chunked"), TypeError, r"strategy was removed: the chunked engine .* is the only way the loss "
                                           r"walks the logits.* Drop the argument"),
    (dict(label_smoothing=1.0), ValueError, r"label_smoothing must be < 1"),
    (dict(label_smoothing=-0.1), ValueError, r"label_smoothing must be >= 0"),
    (dict(z_loss=-1.0), ValueError, r"z_loss must be >= 0"),
    (dict(softcap=0.0), ValueError, r"softcap must be > 0"),
    (dict(softcap=float("inf")), TypeError, r"softcap must be a finite real number"),
    (dict(ce_weight="1"), TypeError, r"ce_weight must be a finite real number"),
    (dict(normalizer=-1), ValueError, r"normalizer must be >= 0"),
    (dict(normalizer=torch.ones(2)), ValueError, r"normalizer must be a number or a 0-d tensor"),
    (dict(normalizer=3, reduction="none"), ValueError, r"normalizer .* cannot be used with reduction='none'"),
    (dict(ignore_index=1.5), TypeError, r"ignore_index must be an int"),
    (dict(chunk_budget_bytes=-5), ValueError, r"chunk_budget_bytes must be a positive int"),
    (dict(grad_accum_dtype="bf16"), ValueError, r"grad_accum_dtype must be one of .float32., .weight.; got .bf16."),
    (dict(strategy="tile"), TypeError, r"strategy was removed.*The tile strategy went first, by measurement: "
                                        r"benchmarks/RESULTS.md"),
    (dict(label_smothing=0.1), TypeError, r"fused_linear_t3s_loss got unknown option\(s\) \['label_smothing'\] "
                                          r"\(did you mean 'label_smoothing'\?\)"),
    (dict(kd_t2_scaling=1), TypeError, r"kd_t2_scaling must be a bool; got 1"),
    (dict(return_stats="yes"), TypeError, r"return_stats must be a bool"),
    (dict(kd_loss="kl"), ValueError, r"kd_loss must be one of 'forward_kl', 'reverse_kl', 'jsd'; got 'kl'"),
    (dict(jsd_beta=1.5), ValueError, r"jsd_beta must be <= 1"),
    (dict(kd_temperature=0.0), ValueError, r"kd_temperature must be > 0"),
    (dict(sparse_tail="drop"), ValueError, r"sparse_tail must be one of"),
    (dict(logit_scale=-1.0), ValueError, r"logit_scale must be > 0"),
    (dict(logits_dtype="bf16"), ValueError, r"logits_dtype must be one of .auto., .float32., .input.; got .bf16."),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input_is_named(changes, error, pattern):
    with pytest.raises(error, match=pattern):
        call(**changes)


def test_token_stats_validates_temperature_and_inputs():
    inputs = make_inputs(n=7, h=8, v=11)
    with pytest.raises(ValueError, match=r"temperature must be > 0"):
        t3s.token_stats(inputs["hidden"], inputs["weight"], inputs["labels"], temperature=0.0)
    with pytest.raises(ValueError, match=r"labels must lie in"):
        t3s.token_stats(inputs["hidden"], inputs["weight"], inputs["labels"] + 11)


def test_module_rejects_unknown_option_names_and_values():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['smoothing'\]"):
        t3s.T3SLoss(smoothing=0.1)
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        t3s.T3SLoss(reduction="avg")


def test_ignored_labels_may_use_any_ignore_index():
    inputs = make_inputs(n=7, h=8, v=11)
    labels = inputs["labels"].clone()
    labels[2] = 11  # out of range, but it is the ignore_index
    out = t3s.fused_linear_t3s_loss(inputs["hidden"], inputs["weight"], labels, ignore_index=11, backend="torch",
                                    return_stats=True)
    assert out.lse[2] == 0 and torch.isfinite(out.loss)


def test_distributed_parameter_kinds_are_refused_by_name():
    """A DTensor reports its global shape but holds local rows; a ZeRO-3 partition is an empty
    placeholder. Both are refused, naming the argument and the fix, before any compute."""
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    hidden, weight = torch.randn(4, 8), torch.randn(16, 8)
    labels = torch.randint(0, 16, (4,))
    partition = torch.nn.Parameter(torch.empty(0))
    partition.ds_id = 7  # what DeepSpeed ZeRO-3 leaves outside a gather
    with pytest.raises(ValueError, match=r"weight is a DeepSpeed ZeRO-3 partitioned parameter \(ds_id 7"):
        t3s.fused_linear_t3s_loss(hidden, partition, labels)
    started = not dist.is_initialized()
    if started:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = "29561"
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        sharded = distribute_tensor(weight, init_device_mesh("cpu", (1,)), [Shard(0)])
        with pytest.raises(TypeError, match=r"weight is a DTensor \(placements \(Shard\(dim=0\),\)\)"):
            t3s.fused_linear_t3s_loss(hidden, sharded, labels)
        with pytest.raises(TypeError, match="weight is a DTensor"):
            t3s.token_stats(hidden, sharded, labels)
    finally:
        if started:
            dist.destroy_process_group()
