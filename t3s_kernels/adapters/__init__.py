"""Adapters from a model's hidden states to the fused op's rows: causal and masked-diffusion students."""

from . import masked_diffusion
from .causal import causal_lm_loss, causal_lm_rows, shift_for_causal_lm
from .masked_diffusion import NoisedBatch, masked_diffusion_loss, noise

__all__ = ["causal_lm_loss", "causal_lm_rows", "shift_for_causal_lm", "masked_diffusion", "masked_diffusion_loss",
           "noise", "NoisedBatch"]
