"""Tiny HuggingFace models built from configs (no downloads), for the adapter and patch tests."""

import torch

TINY = dict(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=128)


def tiny_model(family: str, seed: int = 0, **overrides):
    import transformers as tf

    torch.manual_seed(seed)
    kw = {**TINY, **overrides}
    if family == "qwen3":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**kw))
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**kw))
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**kw))
    if family == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**kw))
    if family == "gemma2":
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(**kw, final_logit_softcapping=5.0))
    if family == "gemma3":
        return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**kw, final_logit_softcapping=5.0))
    raise ValueError(family)


FAMILIES = ["qwen3", "qwen2", "llama", "mistral", "gemma2", "gemma3"]


def batch(b=3, t=11, vocab=257, seed=1, prompt=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    labels[0, -2:] = -100  # padding-like tail
    mask = torch.rand(b, t, generator=g) > 0.4
    return ids, labels, mask
