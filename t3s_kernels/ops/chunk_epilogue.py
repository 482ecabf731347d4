"""The chunked strategy's epilogue: one kernel over a chunk's float32 logits buffer.

The logits of [rows x vocabulary chunk] come from cuBLAS. Each program owns BLOCK_R
rows and walks their columns:
  ACCUMULATE: fold the columns into the rows' online state (read/written in STATE, so
      vocabulary chunks can follow one another);
  GRAD: with the logsumexp (finished in-kernel after ACCUMULATE, or given in LSE), write
      dL/dz into DZ, which may be the logits buffer itself (fp32) or a half buffer.
With both flags one kernel does logsumexp, statistics and gradient in two sweeps over
the row (one read for the state, one read + one write for the gradient).
"""

import torch
import triton
import triton.language as tl

from .configs import gradient_buffer, kernel_config
from .online_softmax import (
    block_softmax_state,
    finish_softmax_state,
    loss_grad_wrt_logits,
    merge_softmax_state,
    transform_logits,
)


@triton.jit
def chunk_epilogue_kernel(LOGITS, stride_l, DZ, stride_dz, Y, STATE_M, STATE_D, STATE_U, STATE_LABEL, STATE_SUM,
                          LSE, ROW_SCALE, n_rows, width, col0,
                          softcap, logit_scale, ce_weight, smoothing, inv_vocab, z_loss,
                          ACCUMULATE: tl.constexpr, GRAD: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                          HAS_SMOOTHING: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_valid = rows < n_rows
    y = tl.load(Y + rows, mask=row_valid, other=-1) - col0  # label's column within this chunk
    l_row = LOGITS + rows[:, None] * stride_l

    if ACCUMULATE:
        m = tl.load(STATE_M + rows, mask=row_valid, other=float("-inf"))
        d = tl.load(STATE_D + rows, mask=row_valid, other=0.0)
        u = tl.load(STATE_U + rows, mask=row_valid, other=0.0)
        label_logit = tl.load(STATE_LABEL + rows, mask=row_valid, other=0.0)
        sum_logits = tl.load(STATE_SUM + rows, mask=row_valid, other=0.0)
        for v0 in range(0, width, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_valid = cols < width
            z = tl.load(l_row + cols[None, :], mask=row_valid[:, None] & col_valid[None, :], other=0.0)
            s = transform_logits(z.to(tl.float32), softcap, logit_scale, HAS_SOFTCAP)
            m_b, d_b, u_b = block_softmax_state(s, col_valid[None, :])
            m, d, u = merge_softmax_state(m, d, u, m_b, d_b, u_b)
            label_logit += tl.sum(tl.where(cols[None, :] == y[:, None], s, 0.0), axis=1)
            if HAS_SMOOTHING:
                sum_logits += tl.sum(tl.where(col_valid[None, :], s, 0.0), axis=1)
        tl.store(STATE_M + rows, m, mask=row_valid)
        tl.store(STATE_D + rows, d, mask=row_valid)
        tl.store(STATE_U + rows, u, mask=row_valid)
        tl.store(STATE_LABEL + rows, label_logit, mask=row_valid)
        tl.store(STATE_SUM + rows, sum_logits, mask=row_valid)
        lse, _ = finish_softmax_state(m, d, u)
    else:
        lse = tl.load(LSE + rows, mask=row_valid, other=0.0)

    if GRAD:
        g = tl.load(ROW_SCALE + rows, mask=row_valid, other=0.0)
        dz_row = DZ + rows[:, None] * stride_dz
        for v0 in range(0, width, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_valid = cols < width
            mask = row_valid[:, None] & col_valid[None, :]
            z = tl.load(l_row + cols[None, :], mask=mask, other=0.0)
            s = transform_logits(z.to(tl.float32), softcap, logit_scale, HAS_SOFTCAP)
            dz = loss_grad_wrt_logits(s, col_valid[None, :], cols[None, :] == y[:, None], lse, g, ce_weight,
                                      smoothing, inv_vocab, z_loss, softcap, logit_scale, HAS_SOFTCAP)
            tl.store(dz_row + cols[None, :], dz.to(DZ.dtype.element_ty), mask=mask)


def chunk_epilogue(logits, labels, col0: int, scalars: dict, has_softcap: bool, has_smoothing: bool, *,
                   state=None, lse=None, row_scale=None, out_dtype=None):
    """Run the epilogue over a chunk's float32 ``logits`` (columns from ``col0``): with ``state``
    (the rows' m, d, u, label_logit, sum_logits, updated in place) fold them in; with ``row_scale``
    return dL/dz (over ``logits`` itself for float32 ``out_dtype``), from ``lse`` or the finished state."""
    rows, width = logits.shape
    grad = row_scale is not None
    dz = gradient_buffer(logits, out_dtype) if grad else None
    cfg = kernel_config("chunk_epilogue", out_dtype or torch.float32)
    dummy = logits
    m, d, u, label_logit, sum_logits = state if state is not None else (dummy,) * 5
    chunk_epilogue_kernel[(triton.cdiv(rows, cfg["BLOCK_R"]),)](
        logits, logits.stride(0), dz if dz is not None else dummy, dz.stride(0) if dz is not None else 0,
        labels, m, d, u, label_logit, sum_logits, lse if lse is not None else dummy,
        row_scale.float().contiguous() if grad else dummy,
        rows, width, col0, ACCUMULATE=state is not None, GRAD=grad, HAS_SOFTCAP=has_softcap,
        HAS_SMOOTHING=has_smoothing, **scalars, **cfg)
    return dz
