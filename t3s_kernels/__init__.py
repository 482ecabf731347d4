"""t3s-kernels: the LM head and its loss in one pass, for T3S distillation.

    import t3s_kernels as t3s
    out = t3s.fused_linear_t3s_loss(hidden, lm_head.weight, labels, token_weights=mask, return_stats=True)
    stats = t3s.token_stats(hidden, lm_head.weight, labels)
"""

from . import adapters
from .adapters import causal_lm_loss, masked_diffusion_loss
from .api import T3SLoss, T3SLossOutput, TokenStats, fused_linear_t3s_loss, token_stats
from .backends.vocab_parallel import VocabShard
from .patching import apply_t3s, is_t3s_patched, revert_t3s
from .reference import reference_t3s_loss
from .version import __version__

__all__ = [
    "fused_linear_t3s_loss",
    "token_stats",
    "T3SLoss",
    "T3SLossOutput",
    "TokenStats",
    "VocabShard",
    "reference_t3s_loss",
    "adapters",
    "causal_lm_loss",
    "masked_diffusion_loss",
    "apply_t3s",
    "revert_t3s",
    "is_t3s_patched",
    "__version__",
]
