"""Tiny HuggingFace models built from configs (no downloads), for the adapter and patch tests."""

import torch

TINY = dict(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=128)


def tiny_model(family: str, seed: int = 0, **overrides):
    """The library's tiny model factory (toy.py) at the tests' smaller shapes; Gemma with a soft cap."""
    from t3s_kernels.toy import tiny_causal_lm

    extra = dict(final_logit_softcapping=5.0) if family.startswith("gemma") else {}
    return tiny_causal_lm(family, seed, **{**TINY, **extra, **overrides})


FAMILIES = ["qwen3", "qwen2", "llama", "mistral", "gemma2", "gemma3"]


def batch(b=3, t=11, vocab=257, seed=1, prompt=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    labels[0, -2:] = -100  # padding-like tail
    mask = torch.rand(b, t, generator=g) > 0.4
    return ids, labels, mask
