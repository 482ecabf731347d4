"""The chunked engine's epilogue: one kernel over a chunk's logits buffer.

The logits of [rows x vocabulary chunk] come from cuBLAS, in float32 or the inputs' half dtype.
Each program owns BLOCK_R rows and walks their columns:
  ACCUMULATE: fold the columns into the rows' online state (read/written in STATE, five planes, so
      vocabulary chunks can follow one another);
  GRAD: with the logsumexp (finished in-kernel after ACCUMULATE, or given in LSE), write
      dL/dz into DZ, which may be the logits buffer itself (of the gradient's dtype) or a half buffer.
With both flags one kernel does logsumexp, statistics and gradient in two sweeps over
the row (one read for the state, one read + one write for the gradient).
"""

import torch
import triton
import triton.language as tl

from .configs import gradient_buffer, kernel_config
from .online_softmax import (
    finish_softmax_state,
    fold_student_block,
    load_student_state,
    loss_grad_wrt_logits,
    store_student_state,
    transform_logits,
)


@triton.jit
def column_block(v0, width, row_valid, BLOCK_V: tl.constexpr):
    """Columns v0 .. v0 + BLOCK_V of a block of rows: their indices, which are < width ([1, BLOCK_V]),
    and the [rows, BLOCK_V] mask of the elements to load."""
    cols = v0 + tl.arange(0, BLOCK_V)
    col_valid = (cols < width)[None, :]
    return cols, col_valid, row_valid[:, None] & col_valid


@triton.jit
def chunk_epilogue_kernel(LOGITS, stride_l, DZ, stride_dz, Y, STATE, LSE, ROW_SCALE, n_rows, width, col0,
                          softcap, logit_scale, ce_weight, smoothing, inv_vocab, z_loss,
                          ACCUMULATE: tl.constexpr, GRAD: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                          HAS_SMOOTHING: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_valid = rows < n_rows
    y = tl.load(Y + rows, mask=row_valid, other=-1) - col0  # label's column within this chunk
    l_row = LOGITS + rows[:, None] * stride_l

    if ACCUMULATE:
        m, d, u, label_logit, sum_logits = load_student_state(STATE + rows, n_rows, row_valid)
        for v0 in range(0, width, BLOCK_V):
            cols, col_valid, mask = column_block(v0, width, row_valid, BLOCK_V)
            z = tl.load(l_row + cols[None, :], mask=mask, other=0.0)
            s = transform_logits(z, softcap, logit_scale, HAS_SOFTCAP)
            m, d, u, label_logit, sum_logits = fold_student_block(s, cols, col_valid, y, m, d, u, label_logit,
                                                                  sum_logits, HAS_SMOOTHING)
        store_student_state(STATE + rows, n_rows, row_valid, m, d, u, label_logit, sum_logits)
        lse, _ = finish_softmax_state(m, d, u)
    else:
        lse = tl.load(LSE + rows, mask=row_valid, other=0.0)

    if GRAD:
        g = tl.load(ROW_SCALE + rows, mask=row_valid, other=0.0)
        dz_row = DZ + rows[:, None] * stride_dz
        for v0 in range(0, width, BLOCK_V):
            cols, col_valid, mask = column_block(v0, width, row_valid, BLOCK_V)
            z = tl.load(l_row + cols[None, :], mask=mask, other=0.0)
            s = transform_logits(z, softcap, logit_scale, HAS_SOFTCAP)
            dz = loss_grad_wrt_logits(s, col_valid, cols[None, :] == y[:, None], lse, g, ce_weight,
                                      smoothing, inv_vocab, z_loss, softcap, logit_scale, HAS_SOFTCAP)
            tl.store(dz_row + cols[None, :], dz.to(DZ.dtype.element_ty), mask=mask)


def chunk_epilogue(logits, labels, col0: int, scalars: dict, has_softcap: bool, has_smoothing: bool, *,
                   state=None, lse=None, row_scale=None, out_dtype=None):
    """Run the epilogue over a chunk's float32 or half ``logits`` (columns from ``col0``): with ``state``
    (the rows' [5, rows] float32 m, d, u, label_logit, sum_logits, updated in place) fold them in;
    with ``row_scale`` return dL/dz (over ``logits`` itself where ``out_dtype`` is theirs), from ``lse``
    or the finished state."""
    rows, width = logits.shape
    grad = row_scale is not None
    dz = gradient_buffer(logits, out_dtype) if grad else None
    cfg = kernel_config("chunk_epilogue", out_dtype or torch.float32)
    if state is not None and not (state.shape == (5, rows) and state.is_contiguous()):
        raise ValueError(f"chunk_epilogue: state must be a contiguous [5, {rows}] tensor, got {tuple(state.shape)}")
    dummy = logits
    chunk_epilogue_kernel[(triton.cdiv(rows, cfg["BLOCK_R"]),)](
        logits, logits.stride(0), dz if dz is not None else dummy, dz.stride(0) if dz is not None else 0,
        labels, state if state is not None else dummy, lse if lse is not None else dummy,
        row_scale.float().contiguous() if grad else dummy,
        rows, width, col0, ACCUMULATE=state is not None, GRAD=grad, HAS_SOFTCAP=has_softcap,
        HAS_SMOOTHING=has_smoothing, **scalars, **cfg)
    return dz
