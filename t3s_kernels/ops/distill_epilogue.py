"""The chunked engine's epilogue with a teacher: student and teacher logits of a chunk
(both by cuBLAS, float32 or the inputs' half dtype), per-token CE + KD, statistics and dL/dz in one kernel.

With s, t the two heads' logits after the softcap and T the KD temperature, the first sweep
over a row keeps three online states: the student at T = 1 (CE, statistics), the student at
T and the teacher at T, the last two with a weighted sum each (``merge_weighted_sum``); at
T = 1 the first two share one exponential per logit (``SAME_TEMP``), and so do CE's and the
KD's p in the gradient sweep:
    A_f = sum_j e^(t_j/T - m_t) (t_j - s_j)/T     ->  KL(q || p) = A_f / d_t - lse_t + lse_sT
    A_r = sum_j e^(s_j/T - m_s) (s_j - t_j)/T     ->  KL(p || q) = A_r / d_s - lse_sT + lse_t
The generalized JSD (mixture m = (1 - beta) p + beta q) needs normalized p and q, so it takes
one more sweep: JSD = beta KL(q || m) + (1 - beta) KL(p || m). The gradient sweep adds to the
CE term dKD/ds_j, divided by T:
    forward KL: p_j - q_j;   reverse KL: p_j (log p_j - log q_j - KL(p || q));
    JSD: (1 - beta) p_j (log p_j - log m_j - KL(p || m)).
KD_MODE: 1 forward KL, 2 reverse KL, 3 JSD with 0 < beta < 1 (beta 0 / 1 are modes 1 / 2);
``log_beta`` and ``log_1m_beta`` come from the host (finite, as mode 3 has 0 < beta < 1).
"""

import torch
import triton
import triton.language as tl

from .chunk_epilogue import column_block
from .configs import gradient_buffer, kernel_config
from .merge_splits import N_STATE, STATE_OFFSET
from .online_softmax import (
    empty_state,
    empty_student_state,
    finish_kd_state,
    finish_softmax_state,
    fold_distill_block,
    jsd_terms,
    kd_grad_wrt_student,
    loss_grad_from_probs,
    store_row_stats,
    tempered_log_probs,
    transform_logits,
)


@triton.jit
def _load_both(l_row, lt_row, cols, mask, softcap, logit_scale, HAS_SOFTCAP: tl.constexpr):
    """A block of both heads' logits, softcapped; the student's times its logit scale."""
    s = tl.load(l_row + cols[None, :], mask=mask, other=0.0)
    t = tl.load(lt_row + cols[None, :], mask=mask, other=0.0)
    return transform_logits(s, softcap, logit_scale, HAS_SOFTCAP), transform_logits(t, softcap, 1.0, HAS_SOFTCAP)


@triton.jit
def distill_epilogue_kernel(LOGITS, TEACHER_LOGITS, stride_l, stride_lt, DZ, stride_dz, Y, ROW_SCALE, OUT, n_rows, V,
                            softcap, logit_scale, ce_weight, smoothing, inv_vocab, z_loss, kd_coef, inv_temp, beta,
                            log_beta, log_1m_beta,
                            KD_MODE: tl.constexpr, GRAD: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                            HAS_SMOOTHING: tl.constexpr, SAME_TEMP: tl.constexpr, BLOCK_R: tl.constexpr,
                            BLOCK_V: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_valid = rows < n_rows
    y = tl.load(Y + rows, mask=row_valid, other=-1)
    l_row = LOGITS + rows[:, None] * stride_l
    lt_row = TEACHER_LOGITS + rows[:, None] * stride_lt

    m, d, u, label_logit, sum_logits = empty_student_state(BLOCK_R)
    m_s, d_s, a_r = empty_state(BLOCK_R)
    m_t, d_t, a_f = empty_state(BLOCK_R)
    for v0 in range(0, V, BLOCK_V):
        cols, col_valid, mask = column_block(v0, V, row_valid, BLOCK_V)
        s, t = _load_both(l_row, lt_row, cols, mask, softcap, logit_scale, HAS_SOFTCAP)
        m, d, u, label_logit, sum_logits, m_s, d_s, a_r, m_t, d_t, a_f = fold_distill_block(
            s, t, cols, col_valid, y, inv_temp, m, d, u, label_logit, sum_logits, m_s, d_s, a_r, m_t, d_t, a_f,
            HAS_SMOOTHING, SAME_TEMP)
    lse, entropy = finish_softmax_state(m, d, u)
    lse_s, lse_t, kl_forward, kl_reverse = finish_kd_state(m_s, d_s, a_r, m_t, d_t, a_f)

    kl_pm = tl.zeros((BLOCK_R,), tl.float32)
    if KD_MODE == 1:
        kd = kl_forward
    elif KD_MODE == 2:
        kd = kl_reverse
    else:
        kl_qm = tl.zeros((BLOCK_R,), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols, col_valid, mask = column_block(v0, V, row_valid, BLOCK_V)
            s, t = _load_both(l_row, lt_row, cols, mask, softcap, logit_scale, HAS_SOFTCAP)
            log_p, log_q = tempered_log_probs(s, t, lse_s, lse_t, inv_temp)
            pm, qm = jsd_terms(log_p, log_q, col_valid, log_beta, log_1m_beta)
            kl_pm += pm
            kl_qm += qm
        kd = beta * kl_qm + (1.0 - beta) * kl_pm

    store_row_stats(OUT, n_rows, rows, row_valid, lse, label_logit, sum_logits, entropy, m)
    tl.store(OUT + STATE_OFFSET * n_rows + rows, kd, mask=row_valid)

    if GRAD:
        g = tl.load(ROW_SCALE + rows, mask=row_valid, other=0.0)
        dz_row = DZ + rows[:, None] * stride_dz
        for v0 in range(0, V, BLOCK_V):
            cols, col_valid, mask = column_block(v0, V, row_valid, BLOCK_V)
            s, t = _load_both(l_row, lt_row, cols, mask, softcap, logit_scale, HAS_SOFTCAP)
            log_p, log_q = tempered_log_probs(s, t, lse_s, lse_t, inv_temp)
            p = tl.exp(log_p)
            dkd = kd_grad_wrt_student(p, log_p, log_q, kl_reverse, kl_pm, inv_temp, beta, log_beta, log_1m_beta,
                                      KD_MODE)
            p_ce = p if SAME_TEMP else tl.exp(s - lse[:, None])  # at T = 1 the tempered p is CE's, bit for bit
            dz = loss_grad_from_probs(p_ce, s, col_valid, cols[None, :] == y[:, None], lse, g, ce_weight,
                                      smoothing, inv_vocab, z_loss, softcap, logit_scale, HAS_SOFTCAP,
                                      kd_coef * dkd)
            tl.store(dz_row + cols[None, :], dz.to(DZ.dtype.element_ty), mask=mask)


# The output planes: the student's final state (merge_splits.STATE_PLANES), then the per-row KD.
N_OUT = N_STATE + 1


def distill_epilogue(logits, teacher_logits, labels, row_scale, scalars: dict, kd_mode: int, has_softcap: bool,
                     has_smoothing: bool, out_dtype):
    """([N_OUT, rows] float32 statistics and KD, dL/dz or None) of a chunk of both heads' float32
    or half logits; dL/dz over ``logits`` itself where ``out_dtype`` is theirs."""
    rows, width = logits.shape
    grad = row_scale is not None
    dz = gradient_buffer(logits, out_dtype) if grad else None
    out = torch.empty(N_OUT, rows, device=logits.device, dtype=torch.float32)
    cfg = kernel_config("distill_epilogue", out_dtype)
    distill_epilogue_kernel[(triton.cdiv(rows, cfg["BLOCK_R"]),)](
        logits, teacher_logits, logits.stride(0), teacher_logits.stride(0), dz if grad else logits,
        dz.stride(0) if grad else 0, labels, row_scale.float().contiguous() if grad else logits, out,
        rows, width, KD_MODE=kd_mode, GRAD=grad, HAS_SOFTCAP=has_softcap, HAS_SMOOTHING=has_smoothing,
        SAME_TEMP=scalars["inv_temp"] == 1.0, **scalars, **cfg)
    return out, dz
