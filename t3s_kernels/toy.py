"""Tiny models, a tiny tokenizer and synthetic traces, built locally (no downloads), for the
recipes in integrations/, the tests and the demo."""

from __future__ import annotations

import torch

from .extras import require

TINY_CONFIG = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
PAD_ID, EOS_ID, MASK_ID = 0, 1, 2  # ids the tiny tokenizer reserves


def tiny_causal_lm(family: str = "qwen3", seed: int = 0, **overrides):
    """A randomly initialised *ForCausalLM of the given family (qwen3, qwen2, llama, mistral, gemma2,
    gemma3), ``TINY_CONFIG`` with ``overrides`` (the tests' smaller shapes, a soft cap, ...)."""
    tf = require("transformers", "the toy models")
    classes = {"qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
               "llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
               "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
               "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM)}
    if family not in classes:
        raise ValueError(f"family must be one of {sorted(classes)}; got {family!r}")
    config_cls, model_cls = classes[family]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY_CONFIG, "pad_token_id": PAD_ID, "eos_token_id": EOS_ID, **overrides})
    return model_cls(config)


def tiny_bidirectional_lm(family: str = "llama", seed: int = 0, **overrides):
    """A masked-diffusion student stand-in: a tiny *ForCausalLM with the causal mask off
    (``config.is_causal = False``, honoured by transformers' mask builder and the attention
    modules), so every position sees the whole sequence, as in LLaDA.

    transformers 4.x's mask builder has no such flag: it builds a causal mask from a 2-D (or no)
    attention mask, and takes a 4-D one as given. There the decoder is given a 4-D full-attention
    mask over the 2-D one's real tokens instead (``_full_attention_under_transformers4``), so the
    stand-in attends the same under either major version."""
    model = tiny_causal_lm(family, seed=seed, is_causal=False, **overrides)
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    if int(require("transformers", "the toy models").__version__.split(".")[0]) < 5:
        model.base_model.register_forward_pre_hook(_full_attention_under_transformers4, with_kwargs=True)
    return model


def _full_attention_under_transformers4(decoder, args, kwargs):
    """The decoder's forward arguments with a 2-D (or no) attention mask replaced by the 4-D (or flex)
    full-attention mask over the same real tokens (adapters/block_diffusion.py builds it)."""
    from .adapters.block_diffusion import bidirectional_padding_mask

    mask = kwargs.get("attention_mask")
    if mask is not None and not (torch.is_tensor(mask) and mask.dim() == 2):
        return None  # already in the form the attention takes (4-D, or a flex BlockMask)
    cache = kwargs.get("past_key_values")
    if args or (cache is not None and cache.get_seq_length() > 0):
        version = require("transformers", "the toy models").__version__
        raise NotImplementedError(f"tiny_bidirectional_lm under transformers {version} takes keyword arguments and "
                                  "no filled cache (its full-attention mask covers one forward's tokens): call it "
                                  "without past_key_values, or use transformers >= 5 to decode with a cache")
    ids = kwargs.get("input_ids")
    shape = (ids if ids is not None else kwargs["inputs_embeds"]).shape[:2]
    key_valid = torch.ones(shape, dtype=torch.bool, device=decoder.device) if mask is None else mask.bool()
    kwargs["attention_mask"] = bidirectional_padding_mask(key_valid, attention=decoder.config._attn_implementation,
                                                          dtype=decoder.dtype, model_name=type(decoder).__name__)
    return args, kwargs


def tiny_tokenizer(vocab_size: int = TINY_CONFIG["vocab_size"]):
    """A word-level tokenizer over tokens "<pad>", "<eos>", "<mask>", "t3" ... (space-separated)."""
    tokenizers = require("tokenizers", "the toy tokenizer")
    Tokenizer, models, pre_tokenizers = tokenizers.Tokenizer, tokenizers.models, tokenizers.pre_tokenizers
    PreTrainedTokenizerFast = require("transformers", "the toy tokenizer").PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_ID, "<eos>": EOS_ID, "<mask>": MASK_ID}
    vocab.update({f"t{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   mask_token="<mask>")


def synthetic_traces(n: int, *, vocab_size: int = TINY_CONFIG["vocab_size"], prompt_len: int = 6,
                     min_len: int = 20, max_len: int = 40, select_fraction: float = 0.7, seed: int = 0,
                     use: str = "keep"):
    """Pre-tokenized examples {input_ids, labels, <mask column>, prompt_length}: a prompt, then an
    answer that follows a learnable rule (each token is the previous plus a per-example step,
    modulo the vocabulary), ending in <eos>. The mask selects a random ``select_fraction`` of the
    answer tokens (what ``t3s select`` would give), in the column of its ``use``: ``t3s_weights``
    (keep) or ``t3s_force_mask`` (force_mask); prompt tokens are never labels."""
    from .pipeline.selection import COLUMNS

    column = COLUMNS[use]
    g = torch.Generator().manual_seed(seed)
    low = MASK_ID + 1
    span = vocab_size - low
    examples = []
    for i in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        prompt = torch.randint(low, vocab_size, (prompt_len,), generator=g)
        step = int(prompt[0]) % 7 + 1
        answer = [(int(prompt[-1]) - low + step * (k + 1)) % span + low for k in range(length - prompt_len - 1)]
        ids = prompt.tolist() + answer + [EOS_ID]
        labels = [-100] * prompt_len + ids[prompt_len:]
        keep = (torch.rand(len(ids), generator=g) < select_fraction).tolist()
        weights = [bool(k) and pos >= prompt_len for pos, k in enumerate(keep)]
        examples.append({"id": f"ex{i}", "input_ids": ids, "labels": labels, column: weights,
                         "prompt_length": prompt_len})
    return examples
