"""apply_t3s on tiny HF models: same loss and gradients as unpatched, no logits in training,
unchanged in eval, masked loss = eager masked loss, gradient accumulation = one large batch."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from models import FAMILIES, batch, tiny_model

import t3s_kernels as t3s

pytest.importorskip("transformers")


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def train_step(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out, grads_of(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_equals_unpatched(family):
    model = tiny_model(family).train()
    ids, labels, _ = batch()
    ref, ref_grads = train_step(model, input_ids=ids, labels=labels)
    t3s.apply_t3s(model, backend="torch")
    out, got_grads = train_step(model, input_ids=ids, labels=labels)
    assert out.logits is None
    assert_close(out.loss, ref.loss, 1e-5, "loss")
    assert got_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_close(got_grads[name], ref_grads[name], 1e-4, name)
    model.eval()
    with torch.no_grad():
        ev = model(input_ids=ids, labels=labels)
        t3s.revert_t3s(model)
        ev_ref = model(input_ids=ids, labels=labels)
    assert torch.equal(ev.logits, ev_ref.logits) and torch.equal(ev.loss, ev_ref.loss)


def test_eval_keeps_logits_to_keep():
    model = tiny_model("qwen3")
    ids, _, _ = batch()
    t3s.apply_t3s(model)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, logits_to_keep=1)
    assert out.logits.shape == (3, 1, 257)


def test_t3s_weights_equal_eager_masked_loss():
    model = tiny_model("llama").train()
    ids, labels, mask = batch()
    t3s.apply_t3s(model, backend="torch")
    out, grads = train_step(model, input_ids=ids, labels=labels, t3s_weights=mask)
    t3s.revert_t3s(model)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits.float()
    shift_logits, shift_labels = logits[:, :-1].reshape(-1, 257), labels[:, 1:].reshape(-1)
    keep = mask[:, 1:].reshape(-1) & (shift_labels != -100)
    ref = F.cross_entropy(shift_logits[keep], shift_labels[keep])
    ref.backward()
    assert_close(out.loss, ref, 1e-5, "loss")
    for name, g in grads_of(model).items():
        assert_close(grads[name], g, 1e-4, name)


def test_gradient_accumulation_equals_one_large_batch():
    """Two micro-batches, each normalized by the step's label count (HF's num_items_in_batch),
    accumulate to the gradient of the two as one batch."""
    model = tiny_model("qwen3").train()
    ids, labels, _ = batch(b=4)
    t3s.apply_t3s(model, backend="torch")
    _, full = train_step(model, input_ids=ids, labels=labels)
    n_items = int((labels[:, 1:] != -100).sum())
    model.zero_grad(set_to_none=True)
    for part in (slice(0, 1), slice(1, 4)):
        model(input_ids=ids[part], labels=labels[part], num_items_in_batch=n_items).loss.backward()
    for name, g in grads_of(model).items():
        assert_close(g, full[name], 1e-5, name)


def test_class_patch_and_revert():
    a, b = tiny_model("mistral"), tiny_model("mistral", seed=1)
    t3s.apply_t3s(a, patch_class=True, backend="torch")
    try:
        assert t3s.is_t3s_patched(b)
        ids, labels, _ = batch()
        assert b.train()(input_ids=ids, labels=labels).logits is None
    finally:
        t3s.revert_t3s(a)
    assert not t3s.is_t3s_patched(b)
    assert b(input_ids=ids, labels=labels).logits is not None


def test_options_pass_through_and_gemma_softcap():
    model = tiny_model("gemma2").train()
    ids, labels, _ = batch()
    t3s.apply_t3s(model, backend="torch", label_smoothing=0.1)
    out = model(input_ids=ids, labels=labels)
    t3s.revert_t3s(model)
    logits = model(input_ids=ids).logits.float()  # gemma2 applies its softcap to these
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 257), labels[:, 1:].reshape(-1), label_smoothing=0.1)
    assert_close(out.loss, ref, 1e-5, "loss")


def test_bad_inputs():
    model = tiny_model("qwen3").train()
    ids, labels, mask = batch()
    t3s.apply_t3s(model)
    with pytest.raises(ValueError, match=r"selection must have the labels' shape"):
        model(input_ids=ids, labels=labels, t3s_weights=mask[:, :-1])
    with pytest.raises(ValueError, match=r"t3s_weights were given without labels"):
        model(input_ids=ids, t3s_weights=mask)
    with pytest.raises(ValueError, match=r"already patched"):
        t3s.apply_t3s(model)
    with pytest.raises(TypeError, match=r"unknown option"):
        t3s.apply_t3s(tiny_model("llama"), smoothing=0.1)
    with pytest.raises(TypeError, match=r"cannot patch Linear"):
        t3s.apply_t3s(torch.nn.Linear(3, 4))
    with pytest.raises(ValueError, match=r"not patched"):
        t3s.revert_t3s(tiny_model("llama"))
    with pytest.raises(ValueError, match=r"mode must be one of"):
        t3s.apply_t3s(tiny_model("llama"), mode="diffusion")


def test_masked_diffusion_mode_equals_the_adapter_on_a_bidirectional_student():
    """A bidirectional stand-in (causal mask off), patched in masked-diffusion mode: the loss of
    the patched forward equals the adapter's loss on the same hidden states, and only masked
    positions reach the head."""
    import t3s_kernels.adapters.masked_diffusion as md
    from t3s_kernels.toy import MASK_ID, tiny_bidirectional_lm
    from t3s_kernels.trainer_utils import masked_diffusion_compute_loss

    model = tiny_bidirectional_lm("llama").train()
    ids = torch.randint(3, 512, (3, 14), generator=torch.Generator().manual_seed(0))
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), prompt_length=torch.tensor([2, 4, 3]))
    t3s.apply_t3s(model, mode="masked_diffusion", backend="torch")
    loss = masked_diffusion_compute_loss(model, inputs, mask_token_id=MASK_ID,
                                         generator=torch.Generator().manual_seed(5))
    nb = md.noise(ids, mask_token_id=MASK_ID, prompt_lengths=inputs["prompt_length"],
                  attention_mask=inputs["attention_mask"], generator=torch.Generator().manual_seed(5))
    hidden = model.model(input_ids=nb.noisy_ids, attention_mask=inputs["attention_mask"]).last_hidden_state
    ref = md.masked_diffusion_loss(hidden, model.lm_head.weight, ids, nb, mask_token_id=MASK_ID, backend="torch")
    assert_close(loss, ref.loss, 1e-6, "loss")
    with pytest.raises(ValueError, match="needs a model patched"):
        masked_diffusion_compute_loss(tiny_model("llama"), inputs, mask_token_id=MASK_ID)


def test_deep_copy_of_a_patched_model_is_independent():
    import copy

    model = tiny_model("qwen3")
    t3s.apply_t3s(model, backend="torch")
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(0.1)
    ids, labels, _ = batch()
    model.eval(), clone.eval()
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, clone(input_ids=ids).logits)
    clone.train()
    assert clone(input_ids=ids, labels=labels).logits is None


def test_patched_student_distills_from_teacher_hidden_states():
    """The patched student with a teacher head: equals the eager CE + forward KL on shifted rows."""
    student, teacher = tiny_model("qwen3", seed=0).train(), tiny_model("llama", seed=3, hidden_size=48, head_dim=12)
    ids, labels, mask = batch()
    t3s.apply_t3s(student, backend="torch", teacher_weight=teacher.lm_head.weight, kd_weight=0.5, temperature=2.0)
    with torch.no_grad():
        t_hidden = teacher.model(input_ids=ids).last_hidden_state
    out = student(input_ids=ids, labels=labels, t3s_weights=mask, teacher_hidden=t_hidden)
    student.eval()
    with torch.no_grad():
        s_logits = student(input_ids=ids).logits.double()[:, :-1].reshape(-1, 257)
        t_logits = (t_hidden.double() @ teacher.lm_head.weight.double().t())[:, :-1].reshape(-1, 257)
    target, keep = labels[:, 1:].reshape(-1), (mask[:, 1:].reshape(-1) & (labels[:, 1:].reshape(-1) != -100))
    lp, lq = torch.log_softmax(s_logits / 2, -1), torch.log_softmax(t_logits / 2, -1)
    kd = (lq.exp() * (lq - lp)).sum(-1)
    ref = (F.cross_entropy(s_logits, target, ignore_index=-100, reduction="none") + 0.5 * kd)[keep].mean()
    assert_close(out.loss, ref, 1e-5, "loss")
    with pytest.raises(ValueError, match="teacher inputs are for the training loss"):
        student(input_ids=ids, teacher_hidden=t_hidden)
    with pytest.raises(ValueError, match="teacher_hidden is set by the patch"):
        t3s.apply_t3s(tiny_model("qwen3"), teacher_hidden=t_hidden)
