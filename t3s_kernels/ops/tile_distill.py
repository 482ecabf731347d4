"""The tile strategy with a teacher: both heads' logits tile by tile, never stored.

Forward (grid: token blocks x vocabulary splits): each vocabulary block computes a student
tile (X W^T) and a teacher tile (Xt Wt^T, its own hidden size) and folds them into the
student's state at T = 1 and the tempered states of both heads (``fold_kd_block``); 11
partial floats a row a split, merged by ``merge_distill_splits_kernel`` into the statistics,
both tempered logsumexps and both KLs. The generalized JSD needs normalized distributions:
``tile_jsd_kernel`` recomputes both tiles once more for its two sums. Backward: one program a
tile, recompute both tiles, CE + KD gradient (``kd_grad_wrt_student``), atomics into dX/dW/db
as in the plain tile backward. The teacher gets no gradient.
"""

import torch
import triton
import triton.language as tl

from .configs import check_int32_offsets, dot_flags, grad_buffers, kernel_config, vocab_splits
from .head_tile import backward_tile_coords, head_logits_tile, push_tile_grads
from .online_softmax import (
    finish_softmax_state,
    fold_kd_block,
    fold_student_block,
    jsd_terms,
    kd_grad_wrt_student,
    loss_grad_wrt_logits,
    merge_softmax_state,
    merge_weighted_sum,
    store_row_stats,
    transform_logits,
)

N_PARTIAL = 11  # m, d, u, label, sum | m_s, d_s, A_r | m_t, d_t, A_f
# The final planes: the student's state (tile_forward.STATE_PLANES), then these.
KD_PLANES = ("lse_s", "lse_t", "kl_forward", "kl_reverse")
N_FINAL = 5 + len(KD_PLANES)


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
def tile_distill_forward_kernel(X, W, B, Xt, Wt, Bt, Y, PART, N, V, H, Ht, stride_xn, stride_xh, stride_wv,
                                stride_wh, stride_tn, stride_th, stride_tv, stride_twh, softcap, logit_scale, inv_temp,
                                blocks_per_split, HAS_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr,
                                HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < N
    y = tl.load(Y + rows, mask=row_valid, other=-1)
    zero = tl.zeros((BLOCK_M,), tl.float32)
    neg_inf = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    m, d, u, label_logit, sum_logits = neg_inf, zero, zero, zero, zero
    m_s, d_s, a_r, m_t, d_t, a_f = neg_inf, zero, zero, neg_inf, zero, zero
    n_blocks = tl.cdiv(V, BLOCK_N)
    for i in range(0, blocks_per_split):
        vb = pid_s * blocks_per_split + i
        if vb < n_blocks:
            cols = vb * BLOCK_N + tl.arange(0, BLOCK_N)
            col_valid = (cols < V)[None, :]
            s, t = _both_tiles(X, W, B, Xt, Wt, Bt, pid_m * BLOCK_M, vb * BLOCK_N, N, V, H, Ht, stride_xn, stride_xh,
                               stride_wv, stride_wh, stride_tn, stride_th, stride_tv, stride_twh, softcap, logit_scale,
                               HAS_BIAS, HAS_TEACHER_BIAS, HAS_SOFTCAP, DOT_PRECISION, UPCAST, BLOCK_M, BLOCK_N,
                               BLOCK_K)
            m, d, u, label_logit, sum_logits = fold_student_block(s, cols, col_valid, y, m, d, u, label_logit,
                                                                  sum_logits, HAS_SMOOTHING)
            m_s, d_s, a_r, m_t, d_t, a_f = fold_kd_block(s, t, col_valid, inv_temp, m_s, d_s, a_r, m_t, d_t, a_f)
    plane = tl.num_programs(1) * N
    out = PART + pid_s * N + rows
    tl.store(out, m, mask=row_valid)
    tl.store(out + plane, d, mask=row_valid)
    tl.store(out + 2 * plane, u, mask=row_valid)
    tl.store(out + 3 * plane, label_logit, mask=row_valid)
    tl.store(out + 4 * plane, sum_logits, mask=row_valid)
    tl.store(out + 5 * plane, m_s, mask=row_valid)
    tl.store(out + 6 * plane, d_s, mask=row_valid)
    tl.store(out + 7 * plane, a_r, mask=row_valid)
    tl.store(out + 8 * plane, m_t, mask=row_valid)
    tl.store(out + 9 * plane, d_t, mask=row_valid)
    tl.store(out + 10 * plane, a_f, mask=row_valid)


@triton.jit
def merge_distill_splits_kernel(PART, OUT, N, n_splits, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = rows < N
    plane = n_splits * N
    zero = tl.zeros((BLOCK,), tl.float32)
    neg_inf = tl.full((BLOCK,), float("-inf"), tl.float32)
    m, d, u, label_logit, sum_logits = neg_inf, zero, zero, zero, zero
    m_s, d_s, a_r, m_t, d_t, a_f = neg_inf, zero, zero, neg_inf, zero, zero
    for sp in range(0, n_splits):
        part = PART + sp * N + rows
        m, d, u = merge_softmax_state(m, d, u, tl.load(part, mask=valid, other=0.0),
                                      tl.load(part + plane, mask=valid, other=1.0),
                                      tl.load(part + 2 * plane, mask=valid, other=0.0))
        label_logit += tl.load(part + 3 * plane, mask=valid, other=0.0)
        sum_logits += tl.load(part + 4 * plane, mask=valid, other=0.0)
        m_s, d_s, a_r = merge_weighted_sum(m_s, d_s, a_r, tl.load(part + 5 * plane, mask=valid, other=0.0),
                                           tl.load(part + 6 * plane, mask=valid, other=1.0),
                                           tl.load(part + 7 * plane, mask=valid, other=0.0))
        m_t, d_t, a_f = merge_weighted_sum(m_t, d_t, a_f, tl.load(part + 8 * plane, mask=valid, other=0.0),
                                           tl.load(part + 9 * plane, mask=valid, other=1.0),
                                           tl.load(part + 10 * plane, mask=valid, other=0.0))
    lse, entropy = finish_softmax_state(m, d, u)
    lse_s = m_s + tl.log(d_s)
    lse_t = m_t + tl.log(d_t)
    store_row_stats(OUT, N, rows, valid, lse, label_logit, sum_logits, entropy, m)
    out = OUT + rows
    tl.store(out + 5 * N, lse_s, mask=valid)
    tl.store(out + 6 * N, lse_t, mask=valid)
    tl.store(out + 7 * N, a_f / d_t - lse_t + lse_s, mask=valid)  # KL(q || p)
    tl.store(out + 8 * N, a_r / d_s - lse_s + lse_t, mask=valid)  # KL(p || q)


@triton.jit
def tile_jsd_kernel(X, W, B, Xt, Wt, Bt, LSE_S, LSE_T, PART, N, V, H, Ht, stride_xn, stride_xh, stride_wv,
                    stride_wh, stride_tn, stride_th, stride_tv, stride_twh, softcap, logit_scale, inv_temp, log_beta,
                    log_1m_beta, blocks_per_split, HAS_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per split, the sums of KL(p || m) and KL(q || m) over its vocabulary blocks (added on the host)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < N
    lse_s = tl.load(LSE_S + rows, mask=row_valid, other=0.0)
    lse_t = tl.load(LSE_T + rows, mask=row_valid, other=0.0)
    kl_pm = tl.zeros((BLOCK_M,), tl.float32)
    kl_qm = tl.zeros((BLOCK_M,), tl.float32)
    n_blocks = tl.cdiv(V, BLOCK_N)
    for i in range(0, blocks_per_split):
        vb = pid_s * blocks_per_split + i
        if vb < n_blocks:
            col_valid = (vb * BLOCK_N + tl.arange(0, BLOCK_N) < V)[None, :]
            s, t = _both_tiles(X, W, B, Xt, Wt, Bt, pid_m * BLOCK_M, vb * BLOCK_N, N, V, H, Ht, stride_xn, stride_xh,
                               stride_wv, stride_wh, stride_tn, stride_th, stride_tv, stride_twh, softcap, logit_scale,
                               HAS_BIAS, HAS_TEACHER_BIAS, HAS_SOFTCAP, DOT_PRECISION, UPCAST, BLOCK_M, BLOCK_N,
                               BLOCK_K)
            pm, qm = jsd_terms(s, t, col_valid, lse_s, lse_t, inv_temp, log_beta, log_1m_beta)
            kl_pm += pm
            kl_qm += qm
    plane = tl.num_programs(1) * N
    tl.store(PART + pid_s * N + rows, kl_pm, mask=row_valid)
    tl.store(PART + plane + pid_s * N + rows, kl_qm, mask=row_valid)


@triton.jit
def tile_distill_backward_kernel(X, W, B, Xt, Wt, Bt, Y, STATS, ROW_SCALE, DX, DW, DB, N, V, H, Ht, stride_xn,
                                 stride_xh, stride_wv, stride_wh, stride_tn, stride_th, stride_tv, stride_twh, softcap,
                                 logit_scale, ce_weight, smoothing, inv_vocab, z_loss, kd_coef, inv_temp, beta,
                                 log_beta, log_1m_beta, KD_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                                 HAS_TEACHER_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, COMPUTE_DX: tl.constexpr,
                                 COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                 UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_K: tl.constexpr):
    """STATS rows: lse, lse_s, lse_t, KL(p || q), KL(p || m) (5 x N)."""
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
    """(the [N_FINAL, n] final planes, [2, n] sums of KL(p || m) and KL(q || m) when ``jsd`` else None)
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
    part = torch.empty(N_PARTIAL, splits, n, device=x.device, dtype=torch.float32)
    tile_distill_forward_kernel[(n_row_blocks, splits)](
        *common, labels, part, *shapes, inv_temp=kd_scalars["inv_temp"], blocks_per_split=blocks_per_split,
        HAS_SMOOTHING=has_smoothing, **scalars, **flags, **cfg)
    final = torch.empty(N_FINAL, n, device=x.device, dtype=torch.float32)
    mcfg = kernel_config("merge_distill_splits", x.dtype)
    merge_distill_splits_kernel[(triton.cdiv(n, mcfg["BLOCK"]),)](part, final, n, splits, **mcfg)
    if not jsd:
        return final, None
    jcfg = kernel_config("tile_jsd", x.dtype)
    j_row_blocks, j_splits, j_per_split = vocab_splits(n, vocab, jcfg, x.device)
    jpart = torch.empty(2, j_splits, n, device=x.device, dtype=torch.float32)
    lse_s, lse_t = final[5], final[6]
    tile_jsd_kernel[(j_row_blocks, j_splits)](
        *common, lse_s, lse_t, jpart, *shapes, blocks_per_split=j_per_split, **scalars, **kd_scalars, **flags,
        **jcfg)
    return final, jpart.sum(1)


def tile_distill_backward(x, weight, bias, labels, aux, teacher: tuple, row_scale, scalars: dict, kd_mode: int,
                          has_softcap: bool, compute_dx: bool, compute_dw: bool, compute_db: bool):
    """float32 (dX, dW, db) of CE + KD from ``aux`` (lse, lse_s, lse_t, KL(p || q), KL(p || m); 5 x n);
    ``scalars``: the head's, the gradient's and the KD's (kd_coef, inv_temp, beta, log_beta, log_1m_beta)."""
    n, h = x.shape
    vocab = weight.shape[0]
    t_ptrs, t_dims = _teacher_layout(*teacher)
    dx, dw, db = grad_buffers(n, h, vocab, x.device, compute_dx, compute_dw, compute_db and bias is not None)
    if n:
        cfg = kernel_config("tile_distill_backward", x.dtype)
        grid = (triton.cdiv(n, cfg["BLOCK_M"]) * triton.cdiv(vocab, cfg["BLOCK_N"]),)
        tile_distill_backward_kernel[grid](
            x, weight, bias if bias is not None else x, *t_ptrs, labels, aux.contiguous(),
            row_scale.float().contiguous(), aux if dx is None else dx, aux if dw is None else dw,
            aux if db is None else db, n, vocab, h, t_dims[0], x.stride(0), x.stride(1), weight.stride(0),
            weight.stride(1), *t_dims[1:], KD_MODE=kd_mode, HAS_BIAS=bias is not None,
            HAS_TEACHER_BIAS=teacher[2] is not None, HAS_SOFTCAP=has_softcap, COMPUTE_DX=dx is not None,
            COMPUTE_DW=dw is not None, COMPUTE_DB=db is not None, **dot_flags(x.dtype), **scalars, **cfg)
    return dx, dw, db
