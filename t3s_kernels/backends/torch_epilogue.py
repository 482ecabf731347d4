"""The chunked driver's epilogue in plain PyTorch (backends/chunked.py drives it): the torch
backend's epilogue on CUDA tensors and wherever the native CPU epilogue is not built, the one with a
vocabulary split across ranks, and the PyTorch twin of the Triton epilogue kernel."""

from __future__ import annotations

import torch

from ..options import HeadOptions
from .base import OnlineState
from .distill import WHOLE_VOCAB, VocabAxis, distill_chunk


class TorchEpilogue:
    """The epilogue in plain PyTorch (module docstring).

    With a teacher, ``distill`` is backends/distill.py's chunk function (autograd on the chunk),
    its vocabulary reductions by ``axis`` (a rank's slice of the vocabulary under tensor parallelism).

    It works in the logits buffer it is given (the driver's, reused chunk after chunk):
    the accumulate step leaves it holding ``s - m`` (one exp temporary instead of two), and
    the gradient step turns it into dL/dz.
    """

    bytes_per_logit = 10  # the fp32 logits buffer, one fp32 temporary, a half-precision gradient copy
    distill_bytes_per_logit = 48  # both heads' fp32 rows and autograd's temporaries
    reads_half_logits = False  # its in-place steps would round every intermediate to the half dtype

    def __init__(self, axis: VocabAxis = WHOLE_VOCAB):
        self.axis = axis

    def distill(self, logits, labels, teacher_logits, teacher, row_scale, opts, out_dtype):
        return distill_chunk(logits, labels, teacher_logits, teacher, row_scale, opts, out_dtype, self.axis)

    @staticmethod
    def _transform_(logits: torch.Tensor, opts: HeadOptions) -> torch.Tensor:
        if opts.has_softcap:
            logits.div_(opts.softcap).tanh_().mul_(opts.softcap)
        if opts.logit_scale != 1.0:
            logits.mul_(opts.logit_scale)
        return logits

    @staticmethod
    def _label_index(labels: torch.Tensor, col0: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        in_chunk = (labels >= col0) & (labels < col0 + width)
        return in_chunk, (labels - col0).clamp(0, width - 1)

    def _accumulate_shift_(self, s, labels, col0, state: OnlineState, opts: HeadOptions) -> torch.Tensor:
        """Fold ``s`` into the state; ``s`` is left holding ``s - m`` and ``m`` is returned."""
        in_chunk, idx = self._label_index(labels, col0, s.shape[1])
        state.label_logit += torch.where(in_chunk, s.gather(1, idx[:, None]).view(-1), 0.0)
        if opts.has_smoothing:
            state.sum_logits += s.sum(1)
        m_b = s.amax(1)
        shifted = s.sub_(m_b[:, None])
        e = torch.exp(shifted)
        d_b = e.sum(1)
        u_b = torch.bmm(e[:, None, :], shifted[:, :, None]).view(-1)  # sum e * (s - m), no temporary
        del e
        state.merge(m_b, d_b, u_b)
        return m_b

    def _gradient_(self, shifted, shift, labels, col0, lse, row_scale, opts: HeadOptions, out_dtype):
        """dL/dz from ``shifted = s - shift``, written over it.
        dl/ds_j = ce_weight * (p_j - (1 - eps) [j = y] - eps / V) + 2 z_loss lse p_j,
        then through the temperature scale and the softcap: dt/dz = 1 - tanh^2."""
        cap_slope = None
        if opts.has_softcap:
            cap_slope = (shifted + shift[:, None]).div_(opts.logit_scale * opts.softcap)
            cap_slope.square_().neg_().add_(1.0)
        ds = shifted.sub_((lse - shift)[:, None]).exp_()
        ds.mul_((opts.ce_weight + 2.0 * opts.z_loss * lse)[:, None])
        if opts.has_smoothing:
            ds.sub_(opts.ce_weight * opts.label_smoothing / opts.vocab_size)
        in_chunk, idx = self._label_index(labels, col0, ds.shape[1])
        hit = -opts.ce_weight * (1.0 - opts.label_smoothing) * in_chunk.float()
        ds.scatter_add_(1, idx[:, None], hit[:, None])
        ds.mul_((row_scale * opts.logit_scale)[:, None])
        if cap_slope is not None:
            ds.mul_(cap_slope)
        return ds.to(out_dtype)

    def accumulate(self, logits, labels, col0, state, opts):
        self._accumulate_shift_(self._transform_(logits, opts), labels, col0, state, opts)

    def gradient(self, logits, labels, col0, lse, row_scale, opts, out_dtype):
        s = self._transform_(logits, opts)
        return self._gradient_(s, torch.zeros_like(lse), labels, col0, lse, row_scale, opts, out_dtype)

    def accumulate_and_gradient(self, logits, labels, state, row_scale, opts, out_dtype):
        s = self._transform_(logits, opts)
        shift = self._accumulate_shift_(s, labels, 0, state, opts)
        return self._gradient_(s, shift, labels, 0, state.lse(), row_scale, opts, out_dtype)
