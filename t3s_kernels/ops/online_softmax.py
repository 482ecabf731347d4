"""The math every Triton kernel shares, once: logit transform, online softmax, loss gradient.

Row state over the vocabulary columns seen so far (a PyTorch twin is backends/base.py):
    m = max_j s_j,   d = sum_j exp(s_j - m),   u = sum_j exp(s_j - m) (s_j - m)
    lse = m + log d,   entropy = -sum_j p_j log p_j = log d - u / d
Two states merge exactly, so vocabulary blocks can be visited in any order and split
across programs. A second head (a teacher) keeps a second state beside the first.
"""

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    """tanh to a few fp32 ulps with core ops only (libdevice is not in every Triton's interpreter).
    2 * sigmoid(2x) - 1 cancels near 0: its relative error grows like 1 / |x|. Here, |x| < 0.55
    takes the odd Taylor series to x^17 (the next term is below 6e-9 relative there), and
    |x| >= 0.55 takes 1 - 2 / (e^(2|x|) + 1), where the subtraction loses at most one bit."""
    ax = tl.abs(x)
    x2 = ax * ax
    series = 6404582.0 / 10854718875.0
    series = series * x2 - 929569.0 / 638512875.0
    series = series * x2 + 21844.0 / 6081075.0
    series = series * x2 - 1382.0 / 155925.0
    series = series * x2 + 62.0 / 2835.0
    series = series * x2 - 17.0 / 315.0
    series = series * x2 + 2.0 / 15.0
    series = series * x2 - 1.0 / 3.0
    small = ax + ax * (series * x2)
    large = 1.0 - 2.0 / (tl.exp(2.0 * ax) + 1.0)
    t = tl.where(ax < 0.55, small, large)
    return tl.where(x < 0, -t, t)


@triton.jit
def transform_logits(z, softcap, logit_scale, HAS_SOFTCAP: tl.constexpr):
    """s = logit_scale * softcap * tanh(z / softcap), in float32 whatever dtype ``z`` was loaded in."""
    z = z.to(tl.float32)
    if HAS_SOFTCAP:
        z = softcap * tanh(z / softcap)
    return z * logit_scale


@triton.jit
def block_exps(x, col_valid):
    """(m, x - m, e^(x - m)) of each row of the tile ``x`` [rows, cols], m its max over the valid
    columns, e 0 at the others. ``col_valid`` is [1, cols]: masking through a broadcast -inf row
    costs no tile registers."""
    penalty = tl.where(col_valid, 0.0, float("-inf"))
    m = tl.max(x + penalty, axis=1)
    shifted = x - m[:, None]
    return m, shifted, tl.exp(shifted + penalty)


@triton.jit
def block_softmax_state(s, col_valid):
    """(m, d, u) of each row of the tile ``s`` over its valid columns."""
    m, shifted, e = block_exps(s, col_valid)
    return m, tl.sum(e, axis=1), tl.sum(e * shifted, axis=1)


@triton.jit
def merge_softmax_state(m1, d1, u1, m2, d2, u2):
    """The state of the union of two disjoint column sets (the online logsumexp merge)."""
    m = tl.maximum(m1, m2)
    a1 = tl.exp(m1 - m)
    a2 = tl.exp(m2 - m)
    # An empty state (d = 0, m = -inf) adds nothing; guard its (m - m_new) * d = -inf * 0.
    shift1 = tl.where(d1 > 0, m1 - m, 0.0)
    shift2 = tl.where(d2 > 0, m2 - m, 0.0)
    u = a1 * (u1 + shift1 * d1) + a2 * (u2 + shift2 * d2)
    d = a1 * d1 + a2 * d2
    return m, d, u


@triton.jit
def merge_weighted_sum(m1, d1, w1, m2, d2, w2):
    """The (m, d, w) state of the union of two column sets, w = sum e^(x - m) * values. Unlike ``u``,
    ``w`` is a plain weighted sum: it merges by rescaling alone."""
    m = tl.maximum(m1, m2)
    a1 = tl.exp(m1 - m)
    a2 = tl.exp(m2 - m)
    return m, a1 * d1 + a2 * d2, a1 * w1 + a2 * w2


@triton.jit
def fold_weighted_block(m, d, w, m_b, e, values, col_valid):
    """Fold a tile's exponentials ``e`` = e^(x - m_b) (block_exps) into an (m, d, w) state."""
    return merge_weighted_sum(m, d, w, m_b, tl.sum(e, axis=1), tl.sum(e * tl.where(col_valid, values, 0.0), axis=1))


@triton.jit
def log_add_exp(a, b):
    """log(e^a + e^b) as max + log(1 + e^(min - max)): one exponential (the max's own is 1). Written
    with min rather than -|a - b|, with which Triton 3.6's code for the JSD sweep spills on sm_90."""
    mx = tl.maximum(a, b)
    return mx + tl.log(1.0 + tl.exp(tl.minimum(a, b) - mx))


@triton.jit
def finish_softmax_state(m, d, u):
    """(lse, entropy) from a row's final state."""
    log_d = tl.log(d)
    return m + log_d, log_d - u / d


@triton.jit
def loss_grad_wrt_logits(s, col_valid, is_label, lse, row_scale, ce_weight, smoothing, inv_vocab, z_loss,
                         softcap, logit_scale, HAS_SOFTCAP: tl.constexpr, extra_ds=0.0):
    """dL/dz for the raw logits z of a tile, with L = sum_i g_i l_i and
    l = ce_weight * (lse - (1 - eps) s_y - eps / V sum_j s_j) + z_loss * lse^2 (+ terms whose
    dl/ds the caller passes as ``extra_ds``, e.g. distillation):
        dl/ds_j = ce_weight * (p_j - (1 - eps) [j = y] - eps / V) + 2 z_loss lse p_j (+ extra_ds_j)
    then ds/dz = logit_scale * (1 - tanh^2) through the softcap."""
    return loss_grad_from_probs(tl.exp(s - lse[:, None]), s, col_valid, is_label, lse, row_scale, ce_weight,
                                smoothing, inv_vocab, z_loss, softcap, logit_scale, HAS_SOFTCAP, extra_ds)


@triton.jit
def loss_grad_from_probs(p, s, col_valid, is_label, lse, row_scale, ce_weight, smoothing, inv_vocab, z_loss,
                         softcap, logit_scale, HAS_SOFTCAP: tl.constexpr, extra_ds):
    """``loss_grad_wrt_logits`` for a caller that has the tile's p = e^(s - lse) already."""
    ds = p * (ce_weight + 2.0 * z_loss * lse)[:, None] - ce_weight * smoothing * inv_vocab + extra_ds
    ds = tl.where(is_label, ds - ce_weight * (1.0 - smoothing), ds)
    ds = ds * (row_scale * logit_scale)[:, None]
    if HAS_SOFTCAP:
        t = s / (logit_scale * softcap)
        ds = ds * (1.0 - t * t)
    return tl.where(col_valid, ds, 0.0)


@triton.jit
def fold_label_and_sum(s, cols, col_valid, y, label_logit, sum_logits, HAS_SMOOTHING: tl.constexpr):
    """Add a tile's label logit (where the label is among its columns) and, for smoothing, its logit sum."""
    label_logit += tl.sum(tl.where(cols[None, :] == y[:, None], s, 0.0), axis=1)
    if HAS_SMOOTHING:
        sum_logits += tl.sum(tl.where(col_valid, s, 0.0), axis=1)
    return label_logit, sum_logits


@triton.jit
def fold_student_block(s, cols, col_valid, y, m, d, u, label_logit, sum_logits, HAS_SMOOTHING: tl.constexpr):
    """Fold one tile of transformed student logits into the rows' state, label logit and logit sum."""
    m_b, d_b, u_b = block_softmax_state(s, col_valid)
    m, d, u = merge_softmax_state(m, d, u, m_b, d_b, u_b)
    label_logit, sum_logits = fold_label_and_sum(s, cols, col_valid, y, label_logit, sum_logits, HAS_SMOOTHING)
    return m, d, u, label_logit, sum_logits


@triton.jit
def empty_state(BLOCK: tl.constexpr):
    """The state of BLOCK rows over no columns: m = -inf and zero sums (merges as the identity)."""
    zero = tl.zeros((BLOCK,), tl.float32)
    return tl.full((BLOCK,), float("-inf"), tl.float32), zero, zero


@triton.jit
def empty_student_state(BLOCK: tl.constexpr):
    """(m, d, u, label_logit, sum_logits) of BLOCK rows over no columns."""
    m, d, u = empty_state(BLOCK)
    return m, d, u, d, d


# A student's partial state is five planes, ``plane`` floats apart: m, d, u, label_logit, sum_logits.
# Masked rows load as (0, 1, 0, ...): finite, so merging them computes no NaN.

@triton.jit
def load_student_state(P, plane, valid):
    m = tl.load(P, mask=valid, other=0.0)
    d = tl.load(P + plane, mask=valid, other=1.0)
    u = tl.load(P + 2 * plane, mask=valid, other=0.0)
    return m, d, u, tl.load(P + 3 * plane, mask=valid, other=0.0), tl.load(P + 4 * plane, mask=valid, other=0.0)


@triton.jit
def store_student_state(P, plane, valid, m, d, u, label_logit, sum_logits):
    tl.store(P, m, mask=valid)
    tl.store(P + plane, d, mask=valid)
    tl.store(P + 2 * plane, u, mask=valid)
    tl.store(P + 3 * plane, label_logit, mask=valid)
    tl.store(P + 4 * plane, sum_logits, mask=valid)


@triton.jit
def merge_student_state(m, d, u, label_logit, sum_logits, P, plane, valid):
    """The rows' state merged with the partial state stored at P."""
    m_p, d_p, u_p, label_p, sum_p = load_student_state(P, plane, valid)
    m, d, u = merge_softmax_state(m, d, u, m_p, d_p, u_p)
    return m, d, u, label_logit + label_p, sum_logits + sum_p


@triton.jit
def finish_kd_state(m_s, d_s, a_r, m_t, d_t, a_f):
    """(lse_s, lse_t, KL(q || p), KL(p || q)) of the tempered heads from their final states:
    KL(q || p) = A_f / d_t - lse_t + lse_s and KL(p || q) = A_r / d_s - lse_s + lse_t."""
    lse_s = m_s + tl.log(d_s)
    lse_t = m_t + tl.log(d_t)
    return lse_s, lse_t, a_f / d_t - lse_t + lse_s, a_r / d_s - lse_s + lse_t


@triton.jit
def fold_distill_block(s, t, cols, col_valid, y, inv_temp, m, d, u, label_logit, sum_logits, m_s, d_s, a_r,
                       m_t, d_t, a_f, HAS_SMOOTHING: tl.constexpr, SAME_TEMP: tl.constexpr):
    """Fold one tile of both heads into the student's state (as fold_student_block does) and the
    tempered states: (m_s, d_s, A_r) of the student and (m_t, d_t, A_f) of the teacher,
    A_r = sum e^(s/T - m_s) (s - t)/T and A_f = sum e^(t/T - m_t) (t - s)/T. At T = 1 (SAME_TEMP)
    the student's tempered state is its own: one set of exponentials serves both, with the same
    numbers as two would give."""
    diff = (s - t) * inv_temp
    if SAME_TEMP:
        m_b, shifted, e = block_exps(s, col_valid)
        m, d, u = merge_softmax_state(m, d, u, m_b, tl.sum(e, axis=1), tl.sum(e * shifted, axis=1))
        m_s, d_s, a_r = fold_weighted_block(m_s, d_s, a_r, m_b, e, diff, col_valid)  # sum(e): one reduction, CSE'd
        label_logit, sum_logits = fold_label_and_sum(s, cols, col_valid, y, label_logit, sum_logits, HAS_SMOOTHING)
    else:
        m, d, u, label_logit, sum_logits = fold_student_block(s, cols, col_valid, y, m, d, u, label_logit,
                                                              sum_logits, HAS_SMOOTHING)
        m_b, _, e = block_exps(s * inv_temp, col_valid)
        m_s, d_s, a_r = fold_weighted_block(m_s, d_s, a_r, m_b, e, diff, col_valid)
    m_b, _, e = block_exps(t * inv_temp, col_valid)
    m_t, d_t, a_f = fold_weighted_block(m_t, d_t, a_f, m_b, e, -diff, col_valid)
    return m, d, u, label_logit, sum_logits, m_s, d_s, a_r, m_t, d_t, a_f


@triton.jit
def tempered_log_probs(s, t, lse_s, lse_t, inv_temp):
    """(log p, log q) of a tile: the tempered student and teacher."""
    return s * inv_temp - lse_s[:, None], t * inv_temp - lse_t[:, None]


@triton.jit
def jsd_terms(log_p, log_q, col_valid, log_beta, log_1m_beta):
    """This tile's share of KL(p || m) and KL(q || m), m = (1 - beta) p + beta q (tempered)."""
    log_m = log_add_exp(log_p + log_1m_beta, log_q + log_beta)
    kl_pm = tl.sum(tl.where(col_valid, tl.exp(log_p) * (log_p - log_m), 0.0), axis=1)
    kl_qm = tl.sum(tl.where(col_valid, tl.exp(log_q) * (log_q - log_m), 0.0), axis=1)
    return kl_pm, kl_qm


@triton.jit
def kd_grad_wrt_student(p, log_p, log_q, kl_reverse, kl_pm, inv_temp, beta, log_beta, log_1m_beta,
                        KD_MODE: tl.constexpr):
    """dKD/ds for the student's (softcapped) logits s, from the tempered p = e^(log p) and log q;
    KD_MODE 1 forward KL, 2 reverse KL, 3 JSD."""
    if KD_MODE == 1:
        dkd = p - tl.exp(log_q)
    elif KD_MODE == 2:
        dkd = p * (log_p - log_q - kl_reverse[:, None])
    else:
        log_m = log_add_exp(log_p + log_1m_beta, log_q + log_beta)
        dkd = (1.0 - beta) * p * (log_p - log_m - kl_pm[:, None])
    return dkd * inv_temp


@triton.jit
def store_row_stats(OUT, plane, rows, valid, lse, label_logit, sum_logits, entropy, max_logit):
    """The five per-row statistics every forward kernel returns, as planes 0..4 of OUT."""
    out = OUT + rows
    tl.store(out, lse, mask=valid)
    tl.store(out + plane, label_logit, mask=valid)
    tl.store(out + 2 * plane, sum_logits, mask=valid)
    tl.store(out + 3 * plane, entropy, mask=valid)
    tl.store(out + 4 * plane, max_logit, mask=valid)
