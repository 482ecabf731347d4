"""Backward tile kernel: recompute a logits tile, turn it into dL/dz, push it into dX and dW.

Grid: one program per [token block x vocabulary block] tile of the (compacted,
contributing-only) rows. With the forward's logsumexp known, dL/dz of a tile needs
nothing outside it; its products with W and X are added into float32 dX and dW with
atomics, one BLOCK_K slice of H at a time. Two matmuls of FLOPs plus the recompute:
the tile strategy's 4 matmuls in all, and no buffer larger than dX and dW themselves.

Programs with consecutive ids share a vocabulary block (pid_m varies fastest), so a
W tile is read from DRAM once and from L2 by the rest of its column.
"""

import triton
import triton.language as tl

from .head_tile import head_logits_tile, tile_dot
from .online_softmax import loss_grad_wrt_logits, transform_logits


@triton.jit
def tile_backward_kernel(X, W, B, Y, LSE, G, DX, DW, DB, N, V, H,
                         stride_xn, stride_xh, stride_wv, stride_wh,
                         softcap, logit_scale, ce_weight, smoothing, inv_vocab, z_loss,
                         HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, COMPUTE_DX: tl.constexpr,
                         COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         UPCAST: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(N, BLOCK_M)
    pid_m = pid % n_row_blocks
    pid_n = pid // n_row_blocks
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_valid = rows < N
    col_valid = cols < V

    z = head_logits_tile(X, W, B, pid_m * BLOCK_M, pid_n * BLOCK_N, N, V, H, stride_xn, stride_xh,
                         stride_wv, stride_wh, HAS_BIAS, DOT_PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    s = transform_logits(z, softcap, logit_scale, HAS_SOFTCAP)
    y = tl.load(Y + rows, mask=row_valid, other=-1)
    lse = tl.load(LSE + rows, mask=row_valid, other=0.0)
    g = tl.load(G + rows, mask=row_valid, other=0.0)
    dz = loss_grad_wrt_logits(s, col_valid[None, :], cols[None, :] == y[:, None], lse, g, ce_weight, smoothing,
                              inv_vocab, z_loss, softcap, logit_scale, HAS_SOFTCAP)
    dz = tl.where(row_valid[:, None], dz, 0.0)
    if COMPUTE_DB:
        tl.atomic_add(DB + cols, tl.sum(dz, axis=0), mask=col_valid)
    # The products run on the tensor cores in the inputs' dtype, as cuBLAS would.
    dz_in = dz.to(X.dtype.element_ty)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_valid = ks < H
        if COMPUTE_DX:
            w = tl.load(W + cols[:, None] * stride_wv + ks[None, :] * stride_wh,
                        mask=col_valid[:, None] & k_valid[None, :], other=0.0)
            dx = tile_dot(dz_in, w, None, DOT_PRECISION, UPCAST)
            tl.atomic_add(DX + rows[:, None] * H + ks[None, :], dx, mask=row_valid[:, None] & k_valid[None, :])
        if COMPUTE_DW:
            x = tl.load(X + rows[:, None] * stride_xn + ks[None, :] * stride_xh,
                        mask=row_valid[:, None] & k_valid[None, :], other=0.0)
            dw = tile_dot(tl.trans(dz_in), x, None, DOT_PRECISION, UPCAST)
            tl.atomic_add(DW + cols[:, None] * H + ks[None, :], dw, mask=col_valid[:, None] & k_valid[None, :])
