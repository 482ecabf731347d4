"""The patch among other wrappers of a model's forward: a wrapper installed before the patch (an
accelerate hook) survives revert_t3s; patch_class=True refuses an instance whose forward the class
cannot reach; TRL's fused LM head over the patch is refused instead of ignoring t3s_weights; a PEFT
model whose base model is patched is patched (collator, loss = eager masked loss); PEFT refusals
name the fix."""

import functools

import pytest
import torch
import torch.nn.functional as F

import t3s_kernels as t3s
from t3s_kernels.trainer_utils import T3SDataCollator
from tests.helpers import assert_close
from tests.models import batch, tiny_model

pytest.importorskip("transformers")

FEATURES = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7], "t3s_weights": [True, False, True]}]


def _hooked(model):
    """An accelerate-style instance forward: functools.partial of a function calling the old forward."""
    old = model.forward

    def new_forward(module, *args, **kwargs):
        module.hook_calls = getattr(module, "hook_calls", 0) + 1
        return old(*args, **kwargs)

    model.forward = functools.partial(new_forward, model)
    return model


def eager_masked_loss(model, ids, labels, mask):
    logits = model(input_ids=ids).logits.float()
    shift_logits, shift_labels = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    keep = mask[:, 1:].reshape(-1) & (shift_labels != -100)
    return F.cross_entropy(shift_logits[keep], shift_labels[keep])


def test_revert_puts_back_a_forward_wrapper_installed_before_the_patch():
    model = _hooked(tiny_model("llama")).train()
    hook = model.forward
    ids, labels, mask = batch()
    t3s.apply_t3s(model, backend="torch")
    out = model(input_ids=ids, labels=labels, t3s_weights=mask)
    assert model.hook_calls >= 1 and out.logits is None
    t3s.revert_t3s(model)
    assert model.forward is hook and not t3s.is_t3s_patched(model)
    calls = model.hook_calls
    with torch.no_grad():
        ref = eager_masked_loss(model, ids, labels, mask)
    assert model.hook_calls == calls + 1  # the wrapper still runs
    assert_close(out.loss, ref, 1e-5, "loss")


@pytest.mark.parametrize("check", [True, False])
def test_patch_class_refuses_an_instance_forward_the_class_cannot_reach(check):
    model = _hooked(tiny_model("llama"))
    cls_forward = type(model).forward
    with pytest.raises(ValueError, match=r"patch_class=True\): this LlamaForCausalLM has a forward of its own on the "
                                         r"instance .*new_forward.*; patch the instance: apply_t3s\(model\)"):
        t3s.apply_t3s(model, patch_class=True, check=check)
    assert type(model).forward is cls_forward and not t3s.is_t3s_patched(model)
    t3s.apply_t3s(model, check=check)  # the fix named works, exactly
    ids, labels, mask = batch()
    out = model.train()(input_ids=ids, labels=labels, t3s_weights=mask)
    t3s.revert_t3s(model)
    with torch.no_grad():
        assert_close(out.loss, eager_masked_loss(model, ids, labels, mask), 1e-5, "loss")


def test_revert_refuses_to_drop_a_forward_installed_over_the_patch():
    model = t3s.apply_t3s(tiny_model("llama"))
    _hooked(model)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM.forward was replaced after apply_t3s \(by .*new_forward\); "
                                         "revert_t3s would drop that wrapper"):
        t3s.revert_t3s(model)


def test_trl_fused_head_over_the_patch_is_refused():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    model = t3s.apply_t3s(tiny_model("llama")).train()
    trl_utils.add_fused_lm_head(model)  # what SFTTrainer does to model.forward
    assert t3s.is_t3s_patched(model)
    ids, labels, mask = batch()
    with pytest.raises(ValueError, match=r"TRL's fused LM head \(fused_lm_head=True\) runs LlamaModel and TRL's own "
                                         r"loss around the T3S patch.*override SFTTrainer.compute_loss"):
        model(input_ids=ids, labels=labels, t3s_weights=mask, fused_lm_head=True)
    out = model(input_ids=ids, labels=labels, t3s_weights=mask)  # through TRL's wrapper, not fused: the patch
    with torch.no_grad():
        ref = eager_masked_loss(model.eval(), ids, labels, mask)
    assert_close(out.loss, ref, 1e-5, "loss")


def test_trl_fused_head_under_the_patch_is_refused():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    model = tiny_model("llama")
    trl_utils.add_fused_lm_head(model)
    t3s.apply_t3s(model).train()
    ids, labels, mask = batch()
    with pytest.raises(ValueError, match=r"fused_lm_head=True asks TRL's fused LM head .* override SFTTrainer"):
        model(input_ids=ids, labels=labels, t3s_weights=mask, fused_lm_head=True)


def test_a_plain_sft_trainer_on_a_patched_model_is_refused_at_its_first_step(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from t3s_kernels.toy import synthetic_traces, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = t3s.apply_t3s(tiny_model("llama", vocab_size=512))
    data = Dataset.from_list([{**ex, "t3s_weights": [float(w) for w in ex["t3s_weights"]]}
                              for ex in synthetic_traces(8)]).remove_columns(["id", "prompt_length"])
    config = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to=[],
                       save_strategy="no", use_cpu=True, disable_tqdm=True,
                       dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                         data_collator=T3SDataCollator(pad_token_id=tokenizer.pad_token_id, model=model))
    with pytest.raises(ValueError, match="t3s_weights and apply_t3s's loss options would be silently ignored"):
        trainer.train()


def _lora(model, **config):
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, **config))


def test_a_peft_model_whose_base_is_patched_is_patched():
    base = t3s.apply_t3s(tiny_model("llama"), backend="torch")
    peft_model = _lora(base, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    assert t3s.is_t3s_patched(peft_model) and t3s.patching.patch_mode(peft_model) == "causal"
    out = T3SDataCollator(0, model=peft_model)(FEATURES)
    assert out["labels"].tolist() == [[5, -100, 7]]
    with pytest.raises(ValueError, match=r"PeftModel\w* wraps LlamaForCausalLM, which apply_t3s already "
                                         "patched: nothing more to do"):
        t3s.apply_t3s(peft_model)
    with pytest.raises(ValueError, match=r"revert_t3s\(model.get_base_model\(\)\)"):
        t3s.revert_t3s(peft_model)
    ids, labels, mask = batch()
    got = peft_model.train()(input_ids=ids, labels=labels, t3s_weights=mask)
    t3s.revert_t3s(base)
    with torch.no_grad():
        ref = eager_masked_loss(peft_model.eval(), ids, labels, mask)
    assert_close(got.loss, ref, 1e-5, "loss")


def test_a_lora_adapter_on_the_lm_head_is_refused_naming_the_fix():
    peft_model = _lora(tiny_model("llama"), target_modules=["q_proj", "lm_head"])
    with pytest.raises(TypeError, match=r"its LM head carries a PEFT adapter \(peft\.tuners\.lora\..*Linear\).*"
                                        "target_modules without lm_head.*merge_and_unload"):
        t3s.apply_t3s(peft_model.get_base_model())


def test_prompt_tuning_with_t3s_weights_names_the_padding_to_add():
    peft = pytest.importorskip("peft")
    base = t3s.apply_t3s(tiny_model("llama"))
    model = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).train()
    ids, labels, mask = batch()
    with pytest.raises(ValueError, match=r"got \(3, 11\): the labels have 3 more positions, as when a PEFT "
                                         r"prompt-learning model .* prepend 3 zeros to t3s_weights"):
        model(input_ids=ids, labels=labels, t3s_weights=mask)
    padded = F.pad(mask, (3, 0))  # the fix named: anchors at the virtual tokens, which have label -100 anyway
    assert torch.isfinite(model(input_ids=ids, labels=labels, t3s_weights=padded).loss)


def test_collator_refuses_a_missing_pad_id_and_packing_without_the_model():
    with pytest.raises(ValueError, match="pad_token_id is None .*pad_token_id=tokenizer.eos_token_id"):
        T3SDataCollator(pad_token_id=None)
    with pytest.raises(TypeError, match="pad_token_id must be a token id"):
        T3SDataCollator(pad_token_id="<pad>")
    with pytest.raises(ValueError, match=r"packed=True needs the model \(model=...\)"):
        T3SDataCollator(0, packed=True)


def test_a_compiled_patched_model_is_patched_and_not_patched_twice():
    model = t3s.apply_t3s(tiny_model("llama"), mode="causal")
    compiled = torch.compile(model)  # lazy: nothing is compiled here
    assert t3s.is_t3s_patched(compiled) and t3s.patching.patch_mode(compiled) == "causal"
    assert T3SDataCollator(0, model=compiled)(FEATURES)["labels"].tolist() == [[5, -100, 7]]
    with pytest.raises(ValueError, match="OptimizedModule wraps LlamaForCausalLM, which apply_t3s already patched"):
        t3s.apply_t3s(compiled)
    with pytest.raises(ValueError, match=r"revert_t3s\(model._orig_mod\)"):
        t3s.revert_t3s(compiled)
