"""The tile strategy with a teacher: both heads' logits tile by tile, never stored.

Forward (grid: token blocks x vocabulary splits): each vocabulary block computes a student
tile (X W^T) and a teacher tile (Xt Wt^T, its own hidden size) and folds them into the
student's state at T = 1 and the tempered states of both heads (``fold_kd_block``); 11
partial floats a row a split, merged by ``merge_splits`` into the statistics,
both tempered logsumexps and both KLs. The generalized JSD needs normalized distributions:
a second pass of the same kernel (JSD_PASS) recomputes both tiles for its two sums. Backward: one program a
tile, recompute both tiles, CE + KD gradient (``kd_grad_wrt_student``), atomics into dX/dW/db
as in the plain tile backward. The teacher gets no gradient.
"""

import torch
import triton
import triton.language as tl

from .configs import check_int32_offsets, dot_flags, grad_buffers, kernel_config, vocab_splits
from .head_tile import backward_tile_coords, forward_tile_rows, head_logits_tile, push_tile_grads, split_vocab_block
from .merge_splits import KD_PLANES, KD_STATE_OFFSET, N_DISTILL_PARTIAL, N_STATE, merge_splits
from .online_softmax import (
    empty_state,
    empty_student_state,
    fold_kd_block,
    fold_student_block,
    jsd_terms,
    kd_grad_wrt_student,
    loss_grad_wrt_logits,
    store_kd_state,
    store_student_state,
    transform_logits,
)


@triton.jit
def _both_tiles(X, W, B, Xt, Wt, Bt, row0, col0, N, V, H, Ht, stride_xn, stride_xh, stride_wv, stride_wh,
                stride_tn, stride_th, stride_tv, stride_twh, softcap, logit_scale, HAS_BIAS: tl.constexpr,
                HAS_TEACHER_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    z = head_logits_tile(X, W, B, row0, col0, N, V, H, stride_xn, stride_xh, stride_wv, stride_wh, HAS_BIAS,
                         DOT_PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    zt = head_logits_tile(Xt, Wt, Bt, row0, col0, N, V, Ht, stride_tn, stride_th, stride_tv, stride_twh,
                          HAS_TEACHER_BIAS, DOT_PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    return transform_logits(z, softcap, logit_scale, HAS_SOFTCAP), transform_logits(zt, softcap, 1.0, HAS_SOFTCAP)


@triton.jit
def tile_distill_forward_kernel(X, W, B, Xt, Wt, Bt, Y, LSE_S, LSE_T, PART, N, V, H, Ht, stride_xn, stride_xh,
                                stride_wv, stride_wh, stride_tn, stride_th, stride_tv, stride_twh, softcap,
                                logit_scale, inv_temp, log_beta, log_1m_beta, blocks_per_split,
                                JSD_PASS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr,
                                HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr):
    """First pass: the split's partial states (11 planes). With JSD_PASS: from the tempered
    logsumexps of the first pass (LSE_S, LSE_T), the split's sums of KL(p || m) and KL(q || m)
    (2 planes, added on the host)."""
    row0, rows, row_valid = forward_tile_rows(N, BLOCK_M)
    if JSD_PASS:
        lse_s = tl.load(LSE_S + rows, mask=row_valid, other=0.0)
        lse_t = tl.load(LSE_T + rows, mask=row_valid, other=0.0)
        kl_pm = tl.zeros((BLOCK_M,), tl.float32)
        kl_qm = tl.zeros((BLOCK_M,), tl.float32)
    else:
        y = tl.load(Y + rows, mask=row_valid, other=-1)
        m, d, u, label_logit, sum_logits = empty_student_state(BLOCK_M)
        m_s, d_s, a_r = empty_state(BLOCK_M)
        m_t, d_t, a_f = empty_state(BLOCK_M)
    for i in range(0, blocks_per_split):
        in_range, col0, cols, col_valid = split_vocab_block(i, blocks_per_split, V, BLOCK_N)
        if in_range:
            s, t = _both_tiles(X, W, B, Xt, Wt, Bt, row0, col0, N, V, H, Ht, stride_xn, stride_xh, stride_wv,
                               stride_wh, stride_tn, stride_th, stride_tv, stride_twh, softcap, logit_scale,
                               HAS_BIAS, HAS_TEACHER_BIAS, HAS_SOFTCAP, DOT_PRECISION, UPCAST, BLOCK_M, BLOCK_N,
                               BLOCK_K)
            if JSD_PASS:
                pm, qm = jsd_terms(s, t, col_valid, lse_s, lse_t, inv_temp, log_beta, log_1m_beta)
                kl_pm += pm
                kl_qm += qm
            else:
                m, d, u, label_logit, sum_logits = fold_student_block(s, cols, col_valid, y, m, d, u, label_logit,
                                                                      sum_logits, HAS_SMOOTHING)
                m_s, d_s, a_r, m_t, d_t, a_f = fold_kd_block(s, t, col_valid, inv_temp, m_s, d_s, a_r, m_t, d_t,
                                                             a_f)
    plane = tl.num_programs(1) * N
    out = PART + tl.program_id(1) * N + rows
    if JSD_PASS:
        tl.store(out, kl_pm, mask=row_valid)
        tl.store(out + plane, kl_qm, mask=row_valid)
    else:
        store_student_state(out, plane, row_valid, m, d, u, label_logit, sum_logits)
        store_kd_state(out + KD_STATE_OFFSET * plane, plane, row_valid, m_s, d_s, a_r, m_t, d_t, a_f)


@triton.jit
def tile_distill_backward_kernel(X, W, B, Xt, Wt, Bt, Y, STATS, ROW_SCALE, DX, DW, DB, N, V, H, Ht, stride_xn,
                                 stride_xh, stride_wv, stride_wh, stride_tn, stride_th, stride_tv, stride_twh, softcap,
                                 logit_scale, ce_weight, smoothing, inv_vocab, z_loss, kd_coef, inv_temp, beta,
                                 log_beta, log_1m_beta, KD_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                                 HAS_TEACHER_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, COMPUTE_DX: tl.constexpr,
                                 COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                 UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_K: tl.constexpr):
    """STATS planes: ``BACKWARD_STATS`` (lse, lse_s, lse_t, KL(p || q), KL(p || m)), N apart."""
    row0, col0, rows, cols, row_valid, col_valid = backward_tile_coords(N, V, BLOCK_M, BLOCK_N)
    s, t = _both_tiles(X, W, B, Xt, Wt, Bt, row0, col0, N, V, H, Ht, stride_xn, stride_xh,
                       stride_wv, stride_wh, stride_tn, stride_th, stride_tv, stride_twh, softcap, logit_scale,
                       HAS_BIAS, HAS_TEACHER_BIAS, HAS_SOFTCAP, DOT_PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    y = tl.load(Y + rows, mask=row_valid, other=-1)
    lse = tl.load(STATS + rows, mask=row_valid, other=0.0)
    lse_s = tl.load(STATS + N + rows, mask=row_valid, other=0.0)
    lse_t = tl.load(STATS + 2 * N + rows, mask=row_valid, other=0.0)
    kl_reverse = tl.load(STATS + 3 * N + rows, mask=row_valid, other=0.0)
    kl_pm = tl.load(STATS + 4 * N + rows, mask=row_valid, other=0.0)
    g = tl.load(ROW_SCALE + rows, mask=row_valid, other=0.0)
    dkd = kd_grad_wrt_student(s, t, lse_s, lse_t, kl_reverse, kl_pm, inv_temp, beta, log_beta, log_1m_beta, KD_MODE)
    dz = loss_grad_wrt_logits(s, col_valid[None, :], cols[None, :] == y[:, None], lse, g, ce_weight, smoothing,
                              inv_vocab, z_loss, softcap, logit_scale, HAS_SOFTCAP, extra_ds=kd_coef * dkd)
    push_tile_grads(dz, X, W, DX, DW, DB, rows, cols, row_valid, col_valid, H, stride_xn, stride_xh, stride_wv,
                    stride_wh, COMPUTE_DX, COMPUTE_DW, COMPUTE_DB, DOT_PRECISION, UPCAST, BLOCK_K)


def _teacher_layout(hidden, weight, bias):
    """The teacher's pointers (a missing bias replaced by any pointer) and (Ht, strides)."""
    check_int32_offsets(hidden, weight)
    return (hidden, weight, bias if bias is not None else hidden), \
        (hidden.shape[1], hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1))


def tile_distill_forward(x, weight, bias, labels, teacher: tuple, scalars: dict, kd_scalars: dict,
                         has_softcap: bool, has_smoothing: bool, jsd: bool):
    """(the final planes [STATE_PLANES + KD_PLANES, n], [2, n] sums of KL(p || m) and KL(q || m) when ``jsd`` else None)
    of rows ``x`` and the teacher's ``(hidden, weight, bias)``; ``scalars``: softcap, logit_scale;
    ``kd_scalars``: inv_temp, log_beta, log_1m_beta."""
    check_int32_offsets(x, weight)
    n, h = x.shape
    vocab = weight.shape[0]
    t_ptrs, t_dims = _teacher_layout(*teacher)
    cfg = kernel_config("tile_distill_forward", x.dtype)
    n_row_blocks, splits, blocks_per_split = vocab_splits(n, vocab, cfg, x.device)
    common = (x, weight, bias if bias is not None else x, *t_ptrs)
    shapes = (n, vocab, h, t_dims[0], x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), *t_dims[1:])
    flags = dict(HAS_BIAS=bias is not None, HAS_TEACHER_BIAS=teacher[2] is not None, HAS_SOFTCAP=has_softcap,
                 **dot_flags(x.dtype))
    part = torch.empty(N_DISTILL_PARTIAL, splits, n, device=x.device, dtype=torch.float32)
    tile_distill_forward_kernel[(n_row_blocks, splits)](
        *common, labels, x, x, part, *shapes, blocks_per_split=blocks_per_split, JSD_PASS=False,
        HAS_SMOOTHING=has_smoothing, **scalars, **kd_scalars, **flags, **cfg)
    final = merge_splits(part, distill=True)
    if not jsd:
        return final, None
    jcfg = kernel_config("tile_jsd", x.dtype)
    j_row_blocks, j_splits, j_per_split = vocab_splits(n, vocab, jcfg, x.device)
    jpart = torch.empty(2, j_splits, n, device=x.device, dtype=torch.float32)
    lse_s, lse_t = (final[N_STATE + KD_PLANES.index(name)] for name in ("lse_s", "lse_t"))
    tile_distill_forward_kernel[(j_row_blocks, j_splits)](
        *common, labels, lse_s, lse_t, jpart, *shapes, blocks_per_split=j_per_split, JSD_PASS=True,
        HAS_SMOOTHING=has_smoothing, **scalars, **kd_scalars, **flags, **jcfg)
    return final, jpart.sum(1)


# The per-row terms the backward reads, in the order of its STATS planes.
BACKWARD_STATS = ("lse", "lse_s", "lse_t", "kl_reverse", "kl_pm")


def tile_distill_backward(x, weight, bias, labels, aux: dict, teacher: tuple, row_scale, scalars: dict, kd_mode: int,
                          has_softcap: bool, compute_dx: bool, compute_dw: bool, compute_db: bool):
    """float32 (dX, dW, db) of CE + KD from ``aux``, the per-row ``BACKWARD_STATS`` by name;
    ``scalars``: the head's, the gradient's and the KD's (kd_coef, inv_temp, beta, log_beta, log_1m_beta)."""
    n, h = x.shape
    vocab = weight.shape[0]
    t_ptrs, t_dims = _teacher_layout(*teacher)
    stats = torch.stack([aux[name].float() for name in BACKWARD_STATS])
    dx, dw, db = grad_buffers(n, h, vocab, x.device, compute_dx, compute_dw, compute_db and bias is not None)
    if n:
        cfg = kernel_config("tile_distill_backward", x.dtype)
        grid = (triton.cdiv(n, cfg["BLOCK_M"]) * triton.cdiv(vocab, cfg["BLOCK_N"]),)
        tile_distill_backward_kernel[grid](
            x, weight, bias if bias is not None else x, *t_ptrs, labels, stats,
            row_scale.float().contiguous(), stats if dx is None else dx, stats if dw is None else dw,
            stats if db is None else db, n, vocab, h, t_dims[0], x.stride(0), x.stride(1), weight.stride(0),
            weight.stride(1), *t_dims[1:], KD_MODE=kd_mode, HAS_BIAS=bias is not None,
            HAS_TEACHER_BIAS=teacher[2] is not None, HAS_SOFTCAP=has_softcap, COMPUTE_DX=dx is not None,
            COMPUTE_DW=dw is not None, COMPUTE_DB=db is not None, **dot_flags(x.dtype), **scalars, **cfg)
    return dx, dw, db
