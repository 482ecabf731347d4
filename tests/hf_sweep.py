"""Every causal-LM class transformers can build small: patched against unpatched.

For each architecture in transformers' causal-LM auto mapping: build a tiny fp32 model from its
config (no downloads), perturb every parameter (so that a norm weight of 1 or a bias of 0 cannot
hide a dropped term), then compare one training step of the unpatched model with the patched
one: the loss (1e-5 relative) and every parameter's gradient (1e-4 of its largest magnitude, that
magnitude floored at 1e-3 of the largest gradient in the model: fp32 cannot resolve an entry made
small by cancellation below that; an entry that still differs is judged against the unpatched
model run in float64, and must be within 10x of the unpatched fp32 model's own error).
MoE models run with their router logits on (the auxiliary loss), and tied / untied heads both.

Each architecture ends as one of:
  exact      patched == unpatched
  refused    apply_t3s raised a clear error (the reason is listed)
  WRONG      patched != unpatched, silently            (must never happen)
  CRASH      apply_t3s accepted, then a forward failed  (must never happen)
  unbuilt    no tiny model could be built offline (the reason is listed)

The quick subset runs in the test suite (tests/test_patching_sweep.py); the full sweep is

    .venv/bin/python tests/hf_sweep.py            # every architecture (a few minutes on 2 cores)
    .venv/bin/python tests/hf_sweep.py llama qwen3_moe --verbose
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import warnings
from dataclasses import dataclass

import torch

VOCAB = 211
SEQ = 12
MAX_PARAMS = 40_000_000
BATCH = 2

# Attribute names that size a model, and the tiny value each gets where the config has it.
TINY = {
    "vocab_size": VOCAB, "hidden_size": 32, "d_model": 32, "n_embd": 32, "dim": 32, "embed_dim": 32,
    "word_embed_proj_dim": 32, "embedding_size": 32, "input_embedding_size": 32, "output_embedding_size": 32,
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2, "decoder_layers": 2,
    "encoder_layers": 2, "num_decoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "decoder_attention_heads": 4,
    "encoder_attention_heads": 4, "num_heads": 4,
    "num_key_value_heads": 2, "head_dim": 8, "kv_channels": 8,
    "intermediate_size": 64, "ffn_dim": 64, "decoder_ffn_dim": 64, "encoder_ffn_dim": 64, "n_inner": 64,
    "d_ff": 64, "ffn_hidden_size": 64, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 32,
    "expert_intermediate_size": 16,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "top_k": 2, "moe_k": 2, "n_group": 1, "topk_group": 1,
    "max_position_embeddings": 64, "n_positions": 64, "max_seq_len": 64, "n_ctx": 64, "rotary_dim": 8,
    # multi-head latent attention (DeepSeek-style)
    "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "qk_head_dim": 8, "v_head_dim": 8, "kv_lora_rank": 16,
    "q_lora_rank": 16,
    # state-space layers: heads x head size = expand x hidden = 64
    "mamba_n_heads": 8, "mamba_d_head": 8, "n_mamba_heads": 8, "mamba_headdim": 8, "mamba_d_state": 16,
    "mamba_chunk_size": 8, "num_blocks": 2, "embedding_dim": 32, "chunk_size": 4, "mamba_d_ssm": 64,
}
# Head math away from its neutral value wherever a config has it, so that a dropped factor shows.
HEAD_MATH = {"logits_scaling": 4.0, "logit_scale": 0.3, "lm_head_multiplier": 0.7, "final_logit_softcapping": 5.0,
             "logits_soft_cap": 5.0, "output_logit_soft_cap": 5.0, "unpadded_vocab_size": VOCAB - 11,
             "z_loss_coefficient": 1e-3}
# Sizes that some configs leave at None (derived later, or required): set them too.
TINY_IF_NONE = {"head_dim", "num_key_value_heads", "n_group", "topk_group"}
# Per-family corrections where the generic sizes do not fit together.
TINY_BY_TYPE = {"mamba2": {"num_heads": 8}}


# Under transformers 4.x (the declared floor; scripts/test_transformers4.sh) these families' own code fails
# the unpatched training step on the tiny batch, so there is nothing to compare: transformers' failure, the
# same with or without the patch. Each with what it raises.
UNBUILT_UNDER_TRANSFORMERS4 = {
    "jetmoe": "'JetMoeForCausalLM' object has no attribute 'num_experts'",  # with router logits on
    "recurrent_gemma": "Trying to backward through the graph a second time",  # its second training step
    "xlstm": "is invalid for input of size",  # its 4.x config derives sizes the tiny ones do not fit
}


def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def require_family(model_type: str) -> None:
    """Skip the calling test where the installed transformers has no ``model_type`` (a family added later)."""
    import pytest
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type!r} models")


def own_failure_under_transformers4(model_type: str, status: str, detail: str) -> bool:
    """Whether an outcome is the known failure of the family's own 4.x code (UNBUILT_UNDER_TRANSFORMERS4)."""
    reason = UNBUILT_UNDER_TRANSFORMERS4.get(model_type)
    return (transformers_major() < 5 and reason is not None and status == "unbuilt"
            and detail.startswith("unpatched forward failed") and reason in detail)


@dataclass
class Outcome:
    arch: str
    status: str  # exact | refused | WRONG | CRASH | unbuilt
    detail: str = ""


def _shrink(config, seen=None):
    seen = set() if seen is None else seen
    if id(config) in seen:
        return
    seen.add(id(config))
    for key, value in TINY.items():
        current = getattr(config, key, "absent")
        if (isinstance(current, int) and not isinstance(current, bool)) or (current is None and key in TINY_IF_NONE):
            with contextlib.suppress(Exception):
                setattr(config, key, value)
    for key, value in HEAD_MATH.items():
        if hasattr(config, key) and not isinstance(getattr(config, key), bool):
            with contextlib.suppress(Exception):
                setattr(config, key, value)
    for key, value in TINY_BY_TYPE.get(getattr(config, "model_type", None), {}).items():
        setattr(config, key, value)
    if isinstance(getattr(config, "qk_rope_head_dim", None), int) and hasattr(config, "head_dim"):
        config.head_dim = config.qk_rope_head_dim  # multi-head latent attention ropes this part only
    for key in list(vars(config)):
        if key.endswith("_token_id") and isinstance(getattr(config, key), int) and getattr(config, key) >= VOCAB:
            setattr(config, key, VOCAB - 1)
    for key in ("layer_types", "mlp_layer_types"):
        types = getattr(config, key, None)
        if isinstance(types, list) and types:
            with contextlib.suppress(Exception):
                setattr(config, key, types[:2] if len(types) >= 2 else types * 2)
    for sub in ("text_config", "decoder", "language_config"):
        inner = getattr(config, sub, None)
        if inner is not None and hasattr(inner, "to_dict") and inner is not config:
            _shrink(inner, seen)


def build(model_type: str, *, tie: bool | None = None, seed: int = 0, **overrides):
    """A tiny fp32 instance of the model_type's causal-LM class (or raise); ``overrides`` set config values.
    Dropout is on (0.1) where the model allows it, so that the RNG streams of both runs must agree."""
    try:
        return _build(model_type, tie=tie, seed=seed, dropout=0.1, **overrides)
    except Exception:  # some models refuse dropout (DiffLlama): build them without
        return _build(model_type, tie=tie, seed=seed, dropout=0.0, **overrides)


def _build(model_type: str, *, tie, seed, dropout, **overrides):
    import transformers as tf
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = tf.AutoConfig.for_model(model_type)
    _shrink(config)
    for key, value in overrides.items():
        setattr(config, key, value)
    if tie is not None and hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = tie
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, dropout)
    cls = getattr(tf, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    if not isinstance(config, cls.config_class) and isinstance(getattr(config, "text_config", None),
                                                               cls.config_class):
        config = config.text_config  # a composite model_type mapped to its text-only causal LM
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            size = sum(p.numel() for p in cls(config).parameters())
        if size > MAX_PARAMS:
            raise ValueError(f"the config does not shrink: {size / 1e6:.0f}M parameters at the tiny sizes")
        torch.manual_seed(seed)
        model = cls(config).float()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(0.02 * torch.randn(p.shape, generator=g).to(p.dtype) + 0.01)
    return model


def make_batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(vocab, VOCAB) - 1, (BATCH, SEQ), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    labels[0, -2:] = -100
    return ids, labels


def _step(model, ids, labels, extra):
    model.zero_grad(set_to_none=True)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, use_cache=False, **extra)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def compare(model, *, router_logits: bool = False, **patch_options) -> tuple[str, str]:
    """(status, detail) of one patched-vs-unpatched training step."""
    import t3s_kernels as t3s

    model.train()
    vocab = getattr(model.config.get_text_config(), "vocab_size", VOCAB) or VOCAB
    ids, labels = make_batch(vocab)
    extra = {"output_router_logits": True} if router_logits else {}
    try:
        _step(model, ids, labels, extra)  # some models reconfigure themselves on their first call (BigBird)
        ref, ref_grads = _step(model, ids, labels, extra)
    except Exception as e:  # the unpatched model itself cannot train on this batch
        return "unbuilt", f"unpatched forward failed: {type(e).__name__}: {str(e).splitlines()[0][:150]}"
    try:
        t3s.apply_t3s(model, backend="torch", **patch_options)
    except (ValueError, TypeError, NotImplementedError) as e:
        return "refused", str(e).splitlines()[0][:220]
    try:
        out, grads = _step(model, ids, labels, extra)
    except Exception as e:
        return "CRASH", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    finally:
        t3s.revert_t3s(model)
    problems = [] if out.get("logits") is None else ["the patched training forward returned logits"]
    loss_err = abs(out.loss.item() - ref.loss.item()) / max(abs(ref.loss.item()), 1e-6)
    if loss_err > 1e-5:
        problems.append(f"loss {out.loss.item():.6f} vs {ref.loss.item():.6f}")
    if getattr(ref, "aux_loss", None) is not None:
        aux = getattr(out, "aux_loss", None)
        if aux is None or abs(aux.item() - ref.aux_loss.item()) > 1e-6 * max(1.0, abs(ref.aux_loss.item())):
            problems.append("aux_loss missing or different")
    if set(grads) != set(ref_grads):
        problems.append(f"gradient set differs: {sorted(set(grads) ^ set(ref_grads))[:3]}")
    # A gradient entry is resolved to fp32 rounding of the largest gradient of the same backward
    # at best: its scale is floored at 1e-3 of that (so the tolerance floor is 1e-7 of it).
    floor = 1e-3 * max((g.abs().max().item() for g in ref_grads.values()), default=0.0)
    off = [n for n in set(grads) & set(ref_grads)
           if (grads[n] - ref_grads[n]).abs().max() > 1e-4 * max(ref_grads[n].abs().max().item(), floor, 1e-9)]
    if off:
        # A gradient that is zero in exact arithmetic (a key bias under softmax) or made by
        # cancellation carries fp32 noise of its own: judge both against the unpatched model in fp64.
        exact = _fp64_grads(model, ids, labels, extra)
        for n in off:
            ours, theirs = (grads[n] - exact[n]).abs().max().item(), (ref_grads[n] - exact[n]).abs().max().item()
            if ours > max(10 * theirs, 1e-4 * max(exact[n].abs().max().item(), 1e-6)):
                problems.append(f"grad {n} off by {ours:.1e} (the unpatched fp32 model: {theirs:.1e})")
                break
    return ("WRONG", "; ".join(problems)) if problems else ("exact", "")


def _fp64_grads(model, ids, labels, extra):
    import copy

    twin = copy.deepcopy(model).double()
    _step(twin, ids, labels, extra)
    _, grads = _step(twin, ids, labels, extra)
    return grads


def sweep_one(model_type: str) -> list[Outcome]:
    outcomes = []
    variants = [("untied", dict(tie=False)), ("tied", dict(tie=True))]
    for tag, build_kw in variants:
        arch = f"{model_type}[{tag}]"
        try:
            model = build(model_type, **build_kw)
        except Exception as e:
            outcomes.append(Outcome(arch, "unbuilt", f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"))
            break
        text = model.config.get_text_config()
        is_moe = hasattr(text, "output_router_logits")
        for router in ([False, True] if is_moe else [False]):
            status, detail = compare(model, router_logits=router)
            outcomes.append(Outcome(arch + ("[router]" if router else ""), status, detail))
        if is_moe:  # router logits on by the config rather than per call
            text.output_router_logits = True
            status, detail = compare(model)
            outcomes.append(Outcome(arch + "[router-config]", status, detail))
    return outcomes


def all_model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_types", nargs="*", help="model_type keys (default: every causal LM)")
    parser.add_argument("--verbose", action="store_true", help="print every outcome, not only the summary")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    torch.set_num_threads(2)
    kinds = args.model_types or all_model_types()
    results = []
    for model_type in tqdm(kinds, desc="architectures", file=sys.stderr):
        results += sweep_one(model_type)
    import datetime
    import platform

    import transformers

    print(f"# HF causal-LM sweep: transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{platform.machine()}, {datetime.date.today()}")
    by_status: dict[str, list[Outcome]] = {}
    for r in results:
        by_status.setdefault(r.status, []).append(r)
    for status in ("WRONG", "CRASH", "refused", "unbuilt", "exact"):
        rows = by_status.get(status, [])
        print(f"\n## {status}: {len(rows)}")
        if status != "exact" or args.verbose:
            for r in rows:
                print(f"- {r.arch}: {r.detail}" if r.detail else f"- {r.arch}")
    if by_status.get("exact") and not args.verbose:
        print(", ".join(r.arch for r in by_status["exact"]))
    bad = len(by_status.get("WRONG", [])) + len(by_status.get("CRASH", []))
    print(f"\n{bad} silently wrong or crashing of {len(results)} runs")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
