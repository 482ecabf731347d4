"""apply_t3s on tiny HF models: same loss and gradients as unpatched, no logits in training,
unchanged in eval, masked loss = eager masked loss, gradient accumulation = one large batch."""

import pytest
import torch
import torch.nn.functional as F

import t3s_kernels as t3s
from tests.helpers import assert_close
from tests.models import FAMILIES, TINY, batch, tiny_model

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
    with pytest.raises(ValueError, match=r"t3s_weights must have the labels' shape"):
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


def test_the_bidirectional_stand_in_attends_fully_under_either_transformers():
    """tiny_bidirectional_lm, eager and SDPA, with and without a padding mask: a change at a later real token
    reaches the first, a change at a padded one reaches no real token. transformers 4.x's mask builder ignores
    config.is_causal, so there the toy gives its decoder a 4-D mask, and refuses a filled cache by name."""
    import transformers

    from t3s_kernels.toy import tiny_bidirectional_lm

    ids = torch.randint(3, 500, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    for attention in ("eager", "sdpa"):
        model = tiny_bidirectional_lm("llama", attn_implementation=attention).eval()
        with torch.no_grad():
            for m in (None, mask):
                base = model(input_ids=ids, attention_mask=m).logits
                for pos in (6, 8):
                    changed = ids.clone()
                    changed[:, pos] = changed[:, pos] % 400 + 3
                    moved = (model(input_ids=changed, attention_mask=m).logits - base).abs().amax(-1) > 1e-4
                    assert bool(moved[0, 0]), (attention, m is None, pos)
                    if m is not None and pos == 8:
                        assert not bool(moved[1, :7].any()), attention
            if int(transformers.__version__.split(".")[0]) < 5:
                cache = model(input_ids=ids, use_cache=True).past_key_values
                with pytest.raises(NotImplementedError, match=rf"transformers {transformers.__version__} .*"
                                   "without past_key_values, or use transformers >= 5"):
                    model(input_ids=ids[:, :1], past_key_values=cache)


def test_masked_diffusion_mode_equals_the_adapter_on_a_bidirectional_student():
    """A bidirectional stand-in (causal mask off), patched in masked-diffusion mode: the loss of
    the patched forward equals the adapter's loss on the same hidden states, and only masked
    positions reach the head."""
    import t3s_kernels.adapters.masked_diffusion as md
    from t3s_kernels.masked_diffusion_trainer import masked_diffusion_compute_loss
    from t3s_kernels.toy import MASK_ID, tiny_bidirectional_lm

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
    t3s.apply_t3s(student, backend="torch", teacher_weight=teacher.lm_head.weight, kd_weight=0.5, kd_temperature=2.0)
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


# --- exact or refused: the model's own head math, the MoE auxiliary loss, the refusals --------------

def _moe(seed=0, **overrides):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.Qwen3MoeConfig(**{**dict(TINY_MOE), **overrides})
    model = tf.Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


TINY_MOE = dict(vocab_size=257, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                max_position_embeddings=64, router_aux_loss_coef=0.37)


@pytest.mark.parametrize("per", ["call", "config"])
def test_moe_auxiliary_loss_equals_huggingface(per):
    """The router auxiliary loss is added with the model's own coefficient, returned in the model's
    own output class (aux_loss, router_logits), and its gradient reaches the router."""
    model = _moe(output_router_logits=(per == "config")).train()
    ids, labels, _ = batch()
    extra = {"output_router_logits": True} if per == "call" else {}
    ref, ref_grads = train_step(model, input_ids=ids, labels=labels, **extra)
    t3s.apply_t3s(model, backend="torch")
    out, grads = train_step(model, input_ids=ids, labels=labels, **extra)
    assert type(out) is type(ref) and out.logits is None
    assert out.router_logits is not None and len(out.router_logits) == len(ref.router_logits)
    assert abs(out.aux_loss.item() - ref.aux_loss.item()) <= 1e-6 * abs(ref.aux_loss.item())
    assert_close(out.loss, ref.loss, 1e-6, "loss")
    router = [n for n in ref_grads if "gate" in n and "mlp.gate" in n]
    assert router
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], 1e-4, name)


def test_patch_without_aux_term_would_differ():
    """The auxiliary term is large enough here that dropping it could not pass the checks above."""
    model = _moe().train()
    ids, labels, _ = batch()
    with_aux = model(input_ids=ids, labels=labels, output_router_logits=True)
    without = model(input_ids=ids, labels=labels)
    assert abs(with_aux.loss.item() - without.loss.item()) > 1e-2


@pytest.mark.parametrize("family,kw", [
    ("cohere", dict(logit_scale=0.0625)), ("granite", dict(logits_scaling=4.0)),
    ("hyperclovax", dict(logits_scaling=3.0)), ("recurrent_gemma", dict(logits_soft_cap=5.0)),
])
def test_models_own_head_math(family, kw):
    from tests import hf_sweep

    hf_sweep.require_family(family)
    model = hf_sweep.build(family, **kw)
    math_ = t3s.patching.head_math(model)
    assert math_.logit_scale != 1.0 or math_.softcap is not None
    status, detail = hf_sweep.compare(model)
    if hf_sweep.own_failure_under_transformers4(family, status, detail):
        pytest.skip(f"{family}: the unpatched model fails under transformers 4.x: {detail}")
    assert (status, detail) == ("exact", "")


def test_scoring_uses_the_models_head_math():
    """t3s scoring of a Granite model (logits divided by logits_scaling) equals its own log-softmax."""
    from t3s_kernels.pipeline.data import Example
    from t3s_kernels.pipeline.scoring import score_batch_causal
    from tests import hf_sweep

    model = hf_sweep.build("granite", logits_scaling=4.0).eval()
    ids, labels = hf_sweep.make_batch(hf_sweep.VOCAB)
    examples = [Example(id=str(i), input_ids=ids[i].tolist(), labels=labels[i].tolist()) for i in range(2)]
    got = score_batch_causal(model, examples)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
    for i, d in enumerate(got):
        want = logp[i, :-1].gather(1, ids[i, 1:, None]).squeeze(1)
        scored = d["scored"][1:]
        assert scored.any()
        assert_close(d["logprob"][1:][scored], want[scored], 1e-5, "logprob")


def test_ignore_index_passed_to_the_forward():
    model = tiny_model("llama").train()
    ids, labels, _ = batch()
    labels = labels.masked_fill(labels == -100, -1)
    ref, ref_grads = train_step(model, input_ids=ids, labels=labels, ignore_index=-1)
    t3s.apply_t3s(model, backend="torch")
    out, grads = train_step(model, input_ids=ids, labels=labels, ignore_index=-1)
    assert_close(out.loss, ref.loss, 1e-5, "loss")
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], 1e-4, name)


def test_refusals_name_the_reason():
    from tests import hf_sweep

    with pytest.raises(ValueError, match="does not shift its labels"):
        t3s.apply_t3s(hf_sweep.build("bart"))

    class ScaledLinear(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = tiny_model("llama")
    model.lm_head = ScaledLinear(32, 257, bias=False)
    with pytest.raises(TypeError, match="ScaledLinear, not exactly torch.nn.Linear"):
        t3s.apply_t3s(model)
    bamba = hf_sweep.build("bamba", z_loss_coefficient=1e-3)
    with pytest.raises(ValueError, match="z_loss_coefficient=0.001"):
        t3s.apply_t3s(bamba)
    model = tiny_model("llama")
    model.loss_function = lambda *a, **k: torch.tensor(0.0)
    with pytest.raises(ValueError, match="loss_function was replaced by the user"):
        t3s.apply_t3s(model)


def test_a_family_whose_head_is_not_exactly_linear_is_refused():
    from tests import hf_sweep

    hf_sweep.require_family("dory")
    with pytest.raises(TypeError, match="not exactly torch.nn.Linear"):
        t3s.apply_t3s(hf_sweep.build("dory"))


@pytest.mark.parametrize("options,match", [
    (dict(kd_loss="bogus"), "kd_loss must be one of"), (dict(jsd_beta=3.0), "jsd_beta must be <= 1"),
    (dict(ignore_index=-1), "ignore_index is set by the patch"), (dict(label_smoothing=1.5), "label_smoothing"),
    (dict(kd_temperature=0.0), "kd_temperature must be > 0"),
    (dict(logit_scale=2.0), "logit_scale is set by the patch"),
    (dict(kd_t2_scaling="yes"), "kd_t2_scaling must be a bool"), (dict(check="no"), "check must be a bool"),
])
def test_invalid_options_fail_at_patch_time(options, match):
    with pytest.raises((TypeError, ValueError), match=match):
        t3s.apply_t3s(tiny_model("llama"), **options)


def test_ignore_index_option_validated_in_the_loss_module():
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        t3s.T3SLoss(ignore_index=-1.5)


def test_logits_to_keep_and_tuple_outputs_refused_in_training():
    model = tiny_model("llama").train()
    ids, labels, _ = batch()
    t3s.apply_t3s(model, backend="torch")
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=ids, labels=labels, logits_to_keep=1)
    with pytest.raises(ValueError, match="return_dict=False"):
        model(input_ids=ids, labels=labels, return_dict=False)
    model.loss_function = lambda *a, **k: torch.tensor(0.0)
    with pytest.raises(ValueError, match="loss_function was replaced after apply_t3s"):
        model(input_ids=ids, labels=labels)



def _doubling_llama():
    import transformers as tf

    class DoublingLlama(tf.LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            out = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            logits = out.logits * 2
            loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size)
            return type(out)(loss=loss, logits=logits)

    torch.manual_seed(0)
    return DoublingLlama(tf.LlamaConfig(**TINY))


def test_unknown_head_math_is_refused_at_patch_time():
    with pytest.raises(ValueError, match="transforms its LM head's output in a way the patch does not model"):
        t3s.apply_t3s(_doubling_llama(), backend="torch")


def test_unknown_extra_loss_term_is_caught_by_the_equivalence_check():
    import transformers as tf

    class ExtraTermLlama(tf.LlamaForCausalLM):
        def forward(self, *args, labels=None, **kwargs):
            out = super().forward(*args, labels=labels, **kwargs)
            if labels is not None:
                out.loss = out.loss + 0.01 * self.model.norm.weight.sum()
            return out

    torch.manual_seed(0)
    model = ExtraTermLlama(tf.LlamaConfig(**TINY))
    with pytest.raises(ValueError, match=r"does not reproduce the unpatched model.*ExtraTermLlama|ExtraTermLlama.*"
                                         r"does not reproduce"):
        t3s.apply_t3s(model, backend="torch")
    assert not t3s.is_t3s_patched(model)  # a refused patch leaves the model as it was
    t3s.apply_t3s(model, backend="torch", check=False)  # the documented escape hatch
    assert t3s.is_t3s_patched(model)


def test_check_is_deferred_to_the_first_training_forward_on_meta_parameters():
    import transformers as tf

    with torch.device("meta"):
        model = _doubling_llama()
    t3s.apply_t3s(model, backend="torch")  # cannot run on meta: deferred
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    ids, labels, _ = batch()
    with pytest.raises(ValueError, match="transforms its LM head's output"):
        model.train()(input_ids=ids, labels=labels)
    assert isinstance(model, tf.LlamaForCausalLM)


def test_wrappers_are_refused_with_the_fix():
    import os

    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(tiny_model("llama"))
        with pytest.raises(TypeError, match=r"DDP wrapper .*patch the inner model before wrapping"):
            t3s.apply_t3s(ddp)
        from torch.distributed.fsdp import FullyShardedDataParallel

        try:
            fsdp = FullyShardedDataParallel(tiny_model("llama"), device_id=torch.device("cpu"))
        except Exception as e:  # FSDP1 cannot be built on this machine
            pytest.skip(f"FSDP1 cannot wrap on CPU here: {e}")
        with pytest.raises(TypeError, match=r"FSDP1 wrapper .*patch the inner model before wrapping"):
            t3s.apply_t3s(fsdp)
    finally:
        dist.destroy_process_group()
    with pytest.raises(TypeError, match=r"torch.compile wrapper"):
        t3s.apply_t3s(torch.compile(tiny_model("llama")))


def test_positional_arguments_and_trainer_signature():
    """Labels given positionally still reach the fused loss; the patched forward keeps the original's
    parameter names (HF Trainer drops dataset columns the forward does not name) plus t3s_weights."""
    import inspect

    model = tiny_model("llama").train()
    ids, labels, _ = batch()
    ref, _ = train_step(model, input_ids=ids, labels=labels)
    t3s.apply_t3s(model, backend="torch")
    names = list(inspect.signature(model.forward).parameters)
    assert names[:2] == ["input_ids", "attention_mask"] and "t3s_weights" in names and names[-1] == "kwargs"
    out = model(ids, None, None, None, None, labels)
    assert out.logits is None
    assert_close(out.loss, ref.loss, 1e-5, "loss")


def test_masked_diffusion_loss_takes_the_prompt_from_the_labels(monkeypatch):
    """Rows shaped like the end-to-end recipe's (input_ids, labels -100 on the prompt, a force set):
    no prompt position is ever masked and each row's answer is its labelled positions. A batch with
    neither prompt_length nor labels is refused."""
    import t3s_kernels.masked_diffusion_trainer as tu
    from t3s_kernels.toy import MASK_ID, tiny_bidirectional_lm

    model = tiny_bidirectional_lm("llama").train()
    t3s.apply_t3s(model, mode="masked_diffusion", backend="torch")
    ids = torch.randint(3, 512, (3, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :11] = -100
    force = torch.zeros_like(ids, dtype=torch.bool)
    force[:, 15] = True
    seen = []
    real = tu.noise
    monkeypatch.setattr(tu, "noise", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    for seed in range(5):
        tu.masked_diffusion_compute_loss(model, dict(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids),
                                                     t3s_force_mask=force), mask_token_id=MASK_ID,
                                         generator=torch.Generator().manual_seed(seed))
    for nb in seen:
        assert not nb.masked[:, :11].any()
        assert torch.equal(nb.answer_mask, labels != -100)
        assert nb.masked[:, 15].all()
    with pytest.raises(ValueError, match="needs the prompt"):
        tu.masked_diffusion_compute_loss(model, dict(input_ids=ids, attention_mask=torch.ones_like(ids)),
                                         mask_token_id=MASK_ID)
