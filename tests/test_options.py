"""Options declared once (t3s_kernels/options.py): the public signatures and docs, the operator's
schema and packing, the module's checks and the patch's reserved names all come from the
declarations, so none of them can drift from it; and every value the declarations allow runs."""

import dataclasses
import inspect
import typing

import pytest
import torch

import t3s_kernels as t3s
from t3s_kernels import function, options
from t3s_kernels.options import OPTIONS, HeadOptions, options_of
from tests.helpers import make_inputs


@pytest.mark.parametrize("fn,api", [(t3s.fused_linear_t3s_loss, "loss"), (t3s.token_stats, "stats")])
def test_signature_and_docs_list_every_declared_option(fn, api):
    params = inspect.signature(fn).parameters
    for name, o in options_of(api).items():
        assert name in params, name
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default == o.default, name
        assert f"{name} ({o.default!r}): {o.doc}" in fn.__doc__, name
    assert "{options}" not in fn.__doc__


def test_operator_schema_is_the_declarations():
    """Every HeadOptions field reaches the operator as a scalar argument of its declared type, and a
    config survives the trip through the operator's arguments unchanged."""
    schema = torch.ops.t3s.head_loss.default._schema
    spelled = (lambda t: t[len("Optional["):-1] + "?" if t.startswith("Optional[") else t)
    arguments = {a.name: spelled(str(a.type)) for a in schema.arguments}
    hints = typing.get_type_hints(HeadOptions)
    for f in dataclasses.fields(HeadOptions):
        inner = [t for t in typing.get_args(hints[f.name]) if t is not type(None)] or [hints[f.name]]
        want = {float: "float", int: "int", bool: "bool", str: "str"}[inner[0]]
        assert arguments[f.name].rstrip("?") == want, (f.name, arguments[f.name])
        assert arguments[f.name].endswith("?") == (len(typing.get_args(hints[f.name])) > 0), f.name
    cfg = function.LossConfig(opts=HeadOptions(vocab_size=7, softcap=3.0, label_smoothing=0.1, kd_loss="jsd",
                                               kd_t2_scaling=True), reduction="sum", normalizer_number=2.0,
                              chunk_rows=3, vocab_shard_start=1, vocab_shard_size=9, vocab_shard_group="g")
    assert function.LossConfig.from_args(*cfg.args()) == cfg
    assert len(cfg.args()) == len(schema.arguments) - len(function.HeadLossInputs._fields) - 1  # - tensors, grads


def test_loss_module_takes_the_declared_defaults():
    """T3SLoss restates no default: built with nothing, it is the function with nothing."""
    inputs = make_inputs(n=9, h=8, v=13, weights="zeros")
    args = (inputs["hidden"], inputs["weight"], inputs["labels"])
    got = t3s.T3SLoss()(*args, token_weights=inputs["token_weights"])
    want = t3s.fused_linear_t3s_loss(*args, token_weights=inputs["token_weights"])
    assert torch.equal(got.loss, want.loss)


def test_every_declared_value_is_checked_at_construction():
    """A bad value for any declared option of the loss is refused by T3SLoss and apply_t3s' options, naming it."""
    bad = {float: "x", int: 1.5, bool: "yes", str: "no-such-choice"}
    for name, o in options_of("loss").items():
        kind = [t for t in (o.type, *typing.get_args(o.type)) if t in bad][0]
        with pytest.raises((TypeError, ValueError), match=name):
            t3s.T3SLoss(**{name: bad[kind]})


def test_unknown_and_removed_options_are_named():
    with pytest.raises(TypeError, match=r"token_stats got unknown option\(s\) \['temprature'\] \(did you mean "
                                        r"'temperature'\?\)"):
        options.check_options({"temprature": 2.0}, "stats", "token_stats")
    with pytest.raises(TypeError, match=r"token_stats got unknown option\(s\) \['reduction'\]"):
        inputs = make_inputs(n=3, h=4, v=5)
        t3s.token_stats(inputs["hidden"], inputs["weight"], inputs["labels"], reduction="sum")
    with pytest.raises(TypeError, match="strategy was removed"):
        t3s.T3SLoss(strategy="chunked")


def test_patch_reserves_the_logit_transform():
    """The options the patch sets from the model's head math are the declared logit transform's."""
    from t3s_kernels.patching import SET_BY_PATCH

    transform = [f.name for f in dataclasses.fields(options.LogitTransform)]
    assert transform == ["softcap", "logit_scale"] and set(transform) <= set(SET_BY_PATCH)
    assert not set(SET_BY_PATCH) & (set(OPTIONS) - set(transform) - {"ignore_index"})
