"""Bottleneck: offline argmin; the online rule on scripted accuracy curves; the callback."""

import types

import pytest

from t3s_kernels.pipeline.bottleneck import BottleneckCallback, TroughDetector, find_bottleneck, read_accuracy_table


def test_offline_argmin(tmp_path):
    table = [("base", 0.7), ("step-10", 0.4), ("step-20", 0.3), ("step-30", 0.3), ("step-40", 0.5)]
    assert find_bottleneck(table) == ("step-20", 0.3)
    path = tmp_path / "acc.csv"
    path.write_text("checkpoint,accuracy\n" + "\n".join(f"{n},{a}" for n, a in table))
    assert read_accuracy_table(str(path)) == table
    with pytest.raises(ValueError, match="empty"):
        find_bottleneck([])
    with pytest.raises(ValueError, match="no valid accuracy"):
        find_bottleneck([("a", float("nan"))])


def test_detector_confirms_after_patience_rises():
    d = TroughDetector(patience=2, min_rise=0.05)
    curve = [(0, 0.8), (10, 0.5), (20, 0.3), (30, 0.33), (40, 0.36), (50, 0.4)]
    confirmed_at = [s for s, a in curve if d.update(s, a)]
    # 30 is only 0.03 above the trough, 40 and 50 are >= 0.35: confirmed at 50
    assert confirmed_at == [50] and d.bottleneck == (20, 0.3)


def test_detector_never_confirms_a_falling_curve():
    d = TroughDetector(patience=2)
    for s, a in enumerate([0.9, 0.8, 0.7, 0.6, 0.5]):
        assert not d.update(s, a)
    assert d.bottleneck is None and d.candidate == (4, 0.5)


def test_callback_on_a_scripted_run(tmp_path):
    accs = {0: 0.7, 5: 0.6, 10: 0.2, 15: 0.25, 20: 0.4, 25: 0.5}
    cb = BottleneckCallback(lambda model, step: accs[step], every_steps=5, patience=2, min_rise=0.1,
                            stop_on_trough=True, history_path=str(tmp_path / "h.json"))
    model = types.SimpleNamespace(training=True, train=lambda flag=True: None)
    control = types.SimpleNamespace(should_save=False, should_training_stop=False)
    cb.on_train_begin(None, types.SimpleNamespace(global_step=0), control, model=model)
    assert cb.detector.base == 0.7  # the base itself, evaluated before the first step
    for step in range(1, 26):
        cb.on_step_end(None, types.SimpleNamespace(global_step=step), control, model=model)
        if control.should_training_stop:
            break
    assert cb.bottleneck == (10, 0.2) and step == 25 and control.should_save
    assert (tmp_path / "h.json").exists()
    with pytest.raises(ValueError, match="every_steps"):
        BottleneckCallback(lambda m, s: 0, every_steps=0)


def test_callback_without_the_base_evaluates_it_or_refuses_a_resumed_run():
    model = types.SimpleNamespace(training=True, train=lambda flag=True: None)
    control = types.SimpleNamespace(should_save=False, should_training_stop=False)
    # Without step 0, the first evaluation (0.6) would be taken for the base and 0.5 would be no dip.
    cb = BottleneckCallback(lambda model, step: {0: 0.9, 5: 0.6, 10: 0.5, 15: 0.7, 20: 0.8}[step], every_steps=5,
                            patience=2, min_rise=0.1)
    cb.on_train_begin(None, types.SimpleNamespace(global_step=0), control, model=model)
    for step in range(1, 21):
        cb.on_step_end(None, types.SimpleNamespace(global_step=step), control, model=model)
    assert cb.bottleneck == (10, 0.5)
    resumed = BottleneckCallback(lambda model, step: 0.5, every_steps=5)
    with pytest.raises(ValueError, match="resumes at step 40.*base_accuracy"):
        resumed.on_train_begin(None, types.SimpleNamespace(global_step=40), control, model=model)
    given = BottleneckCallback(lambda model, step: 1 / 0, every_steps=5, base_accuracy=0.8)
    given.on_train_begin(None, types.SimpleNamespace(global_step=40), control, model=model)  # nothing to evaluate


@pytest.mark.parametrize("curve", [
    [0.2, 0.3, 0.4, 0.5, 0.6, 0.7],  # a monotonic rise: the base is the minimum
    [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],  # a plateau
    [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # a decline: never recovers
    [0.5, 0.49, 0.6, 0.7, 0.8, 0.9],  # a dip smaller than the margin
], ids=["rise", "plateau", "decline", "shallow"])
def test_no_trough_without_a_dip_below_the_base_and_a_recovery(curve):
    d = TroughDetector(patience=2, min_rise=0.05)
    assert not any(d.update(10 * i, a) for i, a in enumerate(curve))
    assert d.bottleneck is None and d.verdict().startswith("no trough found")


def test_detector_margins_are_stated_and_positive():
    with pytest.raises(ValueError, match="min_rise must be > 0"):
        TroughDetector(min_rise=0.0)
    d = TroughDetector(patience=1, min_rise=0.05, base_accuracy=0.9)  # the base evaluated elsewhere
    assert [d.update(s, a) for s, a in [(10, 0.5), (20, 0.6)]] == [False, True] and d.bottleneck == (10, 0.5)


def test_json_accuracy_tables_and_their_refusals(tmp_path):
    import json

    path = tmp_path / "acc.json"
    path.write_text(json.dumps({"base": 0.7, "step-10": 0.4, "step-20": 1}))
    assert read_accuracy_table(str(path)) == [("base", 0.7), ("step-10", 0.4), ("step-20", 1.0)]
    path.write_text(json.dumps([{"checkpoint": "base", "accuracy": 0.7}, {"checkpoint": "step-10", "accuracy": 0.4}]))
    assert read_accuracy_table(str(path)) == [("base", 0.7), ("step-10", 0.4)]
    for data, message in [({"base": None}, r"acc.json: checkpoint 'base': the accuracy must be a number; "
                                           "got null"),
                          ({"base": [0.5]}, r"checkpoint 'base': the accuracy must be .*got \[0.5\]"),
                          ({"base": "0.5"}, r"checkpoint 'base': the accuracy must be .*got \"0.5\""),
                          ([0.5, 0.4], r"acc.json: expected a JSON object \{checkpoint: accuracy\} or an array"),
                          ([{"checkpoint": "a", "accuracy": None}], r"acc.json\[0\] \(a\): the accuracy must be"),
                          (None, "expected a JSON object")]:
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=message):
            read_accuracy_table(str(path))
    path.write_text("{broken")
    with pytest.raises(ValueError, match="acc.json: not valid JSON"):
        read_accuracy_table(str(path))
