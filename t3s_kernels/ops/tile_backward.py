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

from .configs import dot_flags, grad_buffers, kernel_config
from .head_tile import backward_tile_coords, head_logits_tile, push_tile_grads
from .online_softmax import loss_grad_wrt_logits, transform_logits


@triton.jit
def tile_backward_kernel(X, W, B, Y, LSE, ROW_SCALE, DX, DW, DB, N, V, H,
                         stride_xn, stride_xh, stride_wv, stride_wh,
                         softcap, logit_scale, ce_weight, smoothing, inv_vocab, z_loss,
                         HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, COMPUTE_DX: tl.constexpr,
                         COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         UPCAST: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row0, col0, rows, cols, row_valid, col_valid = backward_tile_coords(N, V, BLOCK_M, BLOCK_N)

    z = head_logits_tile(X, W, B, row0, col0, N, V, H, stride_xn, stride_xh,
                         stride_wv, stride_wh, HAS_BIAS, DOT_PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    s = transform_logits(z, softcap, logit_scale, HAS_SOFTCAP)
    y = tl.load(Y + rows, mask=row_valid, other=-1)
    lse = tl.load(LSE + rows, mask=row_valid, other=0.0)
    g = tl.load(ROW_SCALE + rows, mask=row_valid, other=0.0)
    dz = loss_grad_wrt_logits(s, col_valid[None, :], cols[None, :] == y[:, None], lse, g, ce_weight, smoothing,
                              inv_vocab, z_loss, softcap, logit_scale, HAS_SOFTCAP)
    push_tile_grads(dz, X, W, DX, DW, DB, rows, cols, row_valid, col_valid, H, stride_xn, stride_xh, stride_wv,
                    stride_wh, COMPUTE_DX, COMPUTE_DW, COMPUTE_DB, DOT_PRECISION, UPCAST, BLOCK_K)


def tile_backward(x, weight, bias, labels, lse, row_scale, scalars: dict, has_softcap: bool, compute_dx: bool,
                  compute_dw: bool, compute_db: bool):
    """float32 (dX, dW, db) of ``sum_i row_scale_i * l_i`` (None where not computed); ``scalars``: softcap,
    logit_scale, ce_weight, smoothing, inv_vocab, z_loss."""
    n, h = x.shape
    vocab = weight.shape[0]
    dx, dw, db = grad_buffers(n, h, vocab, x.device, compute_dx, compute_dw, compute_db and bias is not None)
    if n:
        cfg = kernel_config("tile_backward", x.dtype)
        grid = (triton.cdiv(n, cfg["BLOCK_M"]) * triton.cdiv(vocab, cfg["BLOCK_N"]),)
        tile_backward_kernel[grid](
            x, weight, bias if bias is not None else x, labels, lse, row_scale.float().contiguous(),
            lse if dx is None else dx, lse if dw is None else dw, lse if db is None else db,
            n, vocab, h, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            HAS_BIAS=bias is not None, HAS_SOFTCAP=has_softcap, COMPUTE_DX=dx is not None,
            COMPUTE_DW=dw is not None, COMPUTE_DB=db is not None, **dot_flags(x.dtype), **scalars, **cfg)
    return dx, dw, db
