"""Forward tile kernel: logits tile by tile, merged into per-row softmax state, never stored.

Grid: (token blocks, vocabulary splits). Each program walks its split's vocabulary
blocks, computing a [BLOCK_M x BLOCK_N] logits tile with ``tl.dot`` (fp32 accumulate)
and folding it into the rows' online state. The splits exist only to fill the GPU when
there are few token blocks; their partial states (5 floats a row a split, a handful of
splits) are merged by ``merge_splits_kernel``. Cost: one matmul's FLOPs, O(N) memory.
"""

import torch
import triton
import triton.language as tl

from .configs import check_int32_offsets, dot_flags, kernel_config, vocab_splits
from .head_tile import head_logits_tile
from .online_softmax import (
    block_softmax_state,
    finish_softmax_state,
    merge_softmax_state,
    store_row_stats,
    transform_logits,
)

# The final state's planes, in the order the kernels store them (online_softmax.store_row_stats);
# a partial state's planes are m, d, u, label_logit, sum_logits.
STATE_PLANES = ("lse", "label_logit", "sum_logits", "entropy", "max_logit")
N_STATE = len(STATE_PLANES)


@triton.jit
def tile_forward_kernel(X, W, B, Y, PART, N, V, H, stride_xn, stride_xh, stride_wv, stride_wh,
                        softcap, logit_scale, blocks_per_split,
                        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < N
    y = tl.load(Y + rows, mask=row_valid, other=-1)

    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    d = tl.zeros((BLOCK_M,), tl.float32)
    u = tl.zeros((BLOCK_M,), tl.float32)
    label_logit = tl.zeros((BLOCK_M,), tl.float32)
    sum_logits = tl.zeros((BLOCK_M,), tl.float32)

    # The last split may hold fewer blocks; a scalar guard (not a tensor loop bound) keeps
    # the loop valid in every Triton version's interpreter.
    n_blocks = tl.cdiv(V, BLOCK_N)
    for i in range(0, blocks_per_split):
        vb = pid_s * blocks_per_split + i
        if vb < n_blocks:
            cols = vb * BLOCK_N + tl.arange(0, BLOCK_N)
            col_valid = cols < V
            z = head_logits_tile(X, W, B, pid_m * BLOCK_M, vb * BLOCK_N, N, V, H, stride_xn, stride_xh,
                                 stride_wv, stride_wh, HAS_BIAS, DOT_PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
            s = transform_logits(z, softcap, logit_scale, HAS_SOFTCAP)
            m_b, d_b, u_b = block_softmax_state(s, col_valid[None, :])
            m, d, u = merge_softmax_state(m, d, u, m_b, d_b, u_b)
            label_logit += tl.sum(tl.where(cols[None, :] == y[:, None], s, 0.0), axis=1)
            if HAS_SMOOTHING:
                sum_logits += tl.sum(tl.where(col_valid[None, :], s, 0.0), axis=1)

    out = PART + pid_s * N + rows
    plane = n_splits * N
    tl.store(out, m, mask=row_valid)
    tl.store(out + plane, d, mask=row_valid)
    tl.store(out + 2 * plane, u, mask=row_valid)
    tl.store(out + 3 * plane, label_logit, mask=row_valid)
    tl.store(out + 4 * plane, sum_logits, mask=row_valid)


@triton.jit
def merge_splits_kernel(PART, OUT, N, n_splits, BLOCK: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    valid = rows < N
    plane = n_splits * N
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    d = tl.zeros((BLOCK,), tl.float32)
    u = tl.zeros((BLOCK,), tl.float32)
    label_logit = tl.zeros((BLOCK,), tl.float32)
    sum_logits = tl.zeros((BLOCK,), tl.float32)
    for sp in range(0, n_splits):
        part = PART + sp * N + rows
        m_s = tl.load(part, mask=valid, other=0.0)
        d_s = tl.load(part + plane, mask=valid, other=1.0)
        u_s = tl.load(part + 2 * plane, mask=valid, other=0.0)
        m, d, u = merge_softmax_state(m, d, u, m_s, d_s, u_s)
        label_logit += tl.load(part + 3 * plane, mask=valid, other=0.0)
        sum_logits += tl.load(part + 4 * plane, mask=valid, other=0.0)
    lse, entropy = finish_softmax_state(m, d, u)
    store_row_stats(OUT, N, rows, valid, lse, label_logit, sum_logits, entropy, m)


def tile_forward(x, weight, bias, labels, scalars: dict, has_softcap: bool, has_smoothing: bool) -> torch.Tensor:
    """The [N_STATE, n] float32 final state (``STATE_PLANES``) of rows ``x`` through the head;
    ``scalars``: softcap, logit_scale."""
    check_int32_offsets(x, weight)
    n, h = x.shape
    vocab = weight.shape[0]
    cfg = kernel_config("tile_forward", x.dtype)
    n_row_blocks, splits, blocks_per_split = vocab_splits(n, vocab, cfg, x.device)
    part = torch.empty(N_STATE, splits, n, device=x.device, dtype=torch.float32)
    tile_forward_kernel[(n_row_blocks, splits)](
        x, weight, bias if bias is not None else x, labels, part, n, vocab, h,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        blocks_per_split=blocks_per_split, HAS_BIAS=bias is not None, HAS_SOFTCAP=has_softcap,
        HAS_SMOOTHING=has_smoothing, **dot_flags(x.dtype), **scalars, **cfg)
    out = torch.empty(N_STATE, n, device=x.device, dtype=torch.float32)
    mcfg = kernel_config("merge_splits", x.dtype)
    merge_splits_kernel[(triton.cdiv(n, mcfg["BLOCK"]),)](part, out, n, splits, **mcfg)
    return out
