"""Forward tile kernel: logits tile by tile, merged into per-row softmax state, never stored.

Grid: token blocks x vocabulary splits, in groups of token blocks (``forward_tile_coords``:
the resident programs share X rows in L2). Each program walks its split's vocabulary
blocks, computing a [BLOCK_M x BLOCK_N] logits tile with ``tl.dot`` (fp32 accumulate)
and folding it into the rows' online state (``FLAT``: the vocabulary blocks and their K
slices as one loop, so loads stay in flight across a block's fold; with ``TMA`` its tiles come
through tensor descriptors, the copy engine's, where the tensors allow). The splits exist only
to fill the GPU when there are few token blocks; their partial states (5 floats a row a
split, a handful of splits) are merged by ``merge_splits``. Cost: one matmul's FLOPs, O(N)
memory.
"""

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton before 3.4: pointer loads only
    TensorDescriptor = None

from .configs import check_int32_offsets, dot_flags, kernel_config, vocab_splits
from .head_tile import (
    add_bias,
    forward_tile_coords,
    head_logits_k_step,
    head_logits_k_step_tma,
    head_logits_tile,
    head_tile_offsets,
    split_vocab_block,
)
from .merge_splits import N_STUDENT_PARTIAL, merge_splits
from .online_softmax import empty_student_state, fold_student_block, store_student_state, transform_logits


@triton.jit
def tile_forward_kernel(X, W, B, Y, PART, N, V, H, stride_xn, stride_xh, stride_wv, stride_wh,
                        softcap, logit_scale, n_splits, blocks_per_split,
                        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, FLAT: tl.constexpr, TMA: tl.constexpr,
                        GROUP_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    split, row0, rows, row_valid = forward_tile_coords(N, n_splits, GROUP_ROWS, BLOCK_M)
    y = tl.load(Y + rows, mask=row_valid, other=-1)
    m, d, u, label_logit, sum_logits = empty_student_state(BLOCK_M)
    if FLAT:
        # One loop over (vocabulary block, K slice): the software pipeline runs on across block
        # boundaries, so the next tile's first loads are in flight while a tile is folded.
        k_tiles = tl.cdiv(H, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t in range(0, blocks_per_split * k_tiles):
            i = t // k_tiles
            k0 = (t - i * k_tiles) * BLOCK_K
            in_range, col0, cols, col_valid = split_vocab_block(split, i, blocks_per_split, V, BLOCK_N)
            if TMA:  # X and W are tensor descriptors
                acc = head_logits_k_step_tma(X, W, row0, col0, k0, acc, DOT_PRECISION, UPCAST)
            else:
                x_offs, w_offs = head_tile_offsets(row0, col0, N, V, stride_xn, stride_xh, stride_wv, stride_wh,
                                                   BLOCK_M, BLOCK_N, BLOCK_K)
                acc = head_logits_k_step(X, W, x_offs, w_offs, k0, acc, H, stride_xh, stride_wh, DOT_PRECISION,
                                         UPCAST, BLOCK_K)
            if k0 + BLOCK_K >= H:
                if in_range:
                    s = transform_logits(add_bias(acc, B, col0, V, HAS_BIAS, BLOCK_N), softcap, logit_scale,
                                         HAS_SOFTCAP)
                    m, d, u, label_logit, sum_logits = fold_student_block(s, cols, col_valid, y, m, d, u,
                                                                          label_logit, sum_logits, HAS_SMOOTHING)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        for i in range(0, blocks_per_split):
            in_range, col0, cols, col_valid = split_vocab_block(split, i, blocks_per_split, V, BLOCK_N)
            if in_range:
                z = head_logits_tile(X, W, B, row0, col0, N, V, H, stride_xn, stride_xh, stride_wv, stride_wh,
                                     HAS_BIAS, DOT_PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
                s = transform_logits(z, softcap, logit_scale, HAS_SOFTCAP)
                m, d, u, label_logit, sum_logits = fold_student_block(s, cols, col_valid, y, m, d, u, label_logit,
                                                                      sum_logits, HAS_SMOOTHING)
    store_student_state(PART + split * N + rows, n_splits * N, row_valid, m, d, u, label_logit, sum_logits)


def rows_aligned(t: torch.Tensor) -> bool:
    """Contiguous rows at a 16-byte aligned base and row stride: vectorized loads, and what a tensor
    descriptor needs."""
    return t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0


def tile_forward(x, weight, bias, labels, scalars: dict, has_softcap: bool, has_smoothing: bool) -> torch.Tensor:
    """The [5, n] float32 final state (``merge_splits.STATE_PLANES``) of rows ``x`` through the head;
    ``scalars``: softcap, logit_scale."""
    # Rows 16-byte aligned and contiguous (a copy of a strided view, small beside the matmul): the loads
    # vectorize, tensor descriptors apply, and the compile check's launches are the ones that run.
    x, weight = (t if rows_aligned(t) else t.contiguous() for t in (x, weight))
    check_int32_offsets(x, weight)
    n, h = x.shape
    vocab = weight.shape[0]
    plain = bias is None and not has_softcap and not has_smoothing
    cfg = kernel_config("tile_forward", x.dtype, x.device, "plain" if plain else "")
    if cfg["TMA"] and not (cfg["FLAT"] and TensorDescriptor is not None and rows_aligned(x) and rows_aligned(weight)):
        cfg = dict(kernel_config("tile_forward", x.dtype, x.device), TMA=False)  # the card's for any variant
    n_row_blocks, splits, blocks_per_split = vocab_splits(n, vocab, cfg, x.device)
    part = torch.empty(N_STUDENT_PARTIAL, splits, n, device=x.device, dtype=torch.float32)
    xs, ws = x, weight
    if cfg["TMA"]:
        xs = TensorDescriptor.from_tensor(x, [cfg["BLOCK_M"], cfg["BLOCK_K"]])
        ws = TensorDescriptor.from_tensor(weight, [cfg["BLOCK_N"], cfg["BLOCK_K"]])
    tile_forward_kernel[(n_row_blocks * splits,)](
        xs, ws, bias if bias is not None else x, labels, part, n, vocab, h,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        n_splits=splits, blocks_per_split=blocks_per_split, HAS_BIAS=bias is not None, HAS_SOFTCAP=has_softcap,
        HAS_SMOOTHING=has_smoothing, **dot_flags(x.dtype), **scalars, **cfg)
    return merge_splits(part)
