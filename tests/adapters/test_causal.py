"""The causal-LM adapter: shift, selection, rows reaching the head."""

import pytest
import torch
import torch.nn.functional as F

import t3s_kernels.adapters.causal as causal
from tests.helpers import assert_close, count_head_rows


def data(seed=0, b=3, t=10, h=12, v=41):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.5
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, :2] = -100
    sel = torch.rand(b, t, generator=g) > 0.5
    return hidden, weight, labels, sel


def test_shift_and_selection_match_eager():
    hidden, weight, labels, sel = data()
    x = hidden.clone().requires_grad_()
    out = causal.causal_lm_loss(x, weight, labels, token_weights=sel, backend="torch")
    logits = (x.double() @ weight.double().t())[:, :-1].reshape(-1, weight.shape[0])
    target, keep = labels[:, 1:].reshape(-1), (sel[:, 1:].reshape(-1) & (labels[:, 1:].reshape(-1) != -100))
    ref = F.cross_entropy(logits[keep], target[keep])
    assert_close(out.loss, ref, 1e-5, "loss")


def test_shift_labels_are_used_as_given():
    hidden, weight, labels, _ = data()
    a = causal.causal_lm_loss(hidden, weight, labels, backend="torch").loss
    shifted, _ = causal.shift_for_causal_lm(labels)
    b = causal.causal_lm_loss(hidden, weight, shift_labels=shifted, backend="torch").loss
    assert torch.equal(a, b)


def test_only_labelled_selected_rows_reach_the_head(monkeypatch):
    hidden, weight, labels, sel = data()
    seen = count_head_rows(monkeypatch)
    causal.causal_lm_loss(hidden.requires_grad_(), weight, labels, token_weights=sel, backend="torch")
    expected = int((sel[:, 1:] & (labels[:, 1:] != -100)).sum())
    assert seen == [expected]


def test_float_weights_and_bad_selection():
    hidden, weight, labels, sel = data()
    w = sel.float() * 2.0
    a = causal.causal_lm_loss(hidden, weight, labels, token_weights=w, reduction="sum", backend="torch").loss
    b = causal.causal_lm_loss(hidden, weight, labels, token_weights=sel, reduction="sum", backend="torch").loss
    assert_close(a, 2 * b, 1e-6, "weighted sum")
    with pytest.raises(ValueError, match="token_weights must have the labels' shape"):
        causal.causal_lm_loss(hidden, weight, labels, token_weights=sel[:, 1:])
    with pytest.raises(TypeError, match="token_weights must be bool"):
        causal.causal_lm_loss(hidden, weight, labels, token_weights=sel.long())
    with pytest.raises(ValueError, match="exactly one of labels"):
        causal.causal_lm_loss(hidden, weight)


def test_num_items_zero_gives_a_zero_loss_when_nothing_is_kept():
    """HF Trainer passes num_items_in_batch=0 for a step whose tokens are all dropped: loss 0, zero grads."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    out = causal.causal_lm_loss(hidden, weight, labels, token_weights=torch.zeros(2, 5, dtype=torch.bool),
                                num_items_in_batch=torch.tensor(0), backend="torch")
    out.loss.backward()
    assert out.loss.item() == 0 and hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="normalizer is 0 but"):
        causal.causal_lm_loss(hidden, weight, labels, num_items_in_batch=0, backend="torch")
