"""The forward tile kernels' last step: merge the partial states of a row's vocabulary splits.

A forward tile grid splits the vocabulary across programs when there are few token blocks;
each split leaves a partial state (online_softmax.py: the student's five planes, and with a
teacher the six tempered ones after them) for every row. One program per BLOCK rows merges
a row's splits in order and stores the final planes: the student's ``STATE_PLANES``, then,
with a teacher, ``KD_PLANES``.
"""

import torch
import triton
import triton.language as tl

from .configs import kernel_config
from .online_softmax import (
    empty_state,
    empty_student_state,
    finish_kd_state,
    finish_softmax_state,
    merge_kd_state,
    merge_student_state,
    store_row_stats,
)

# The final planes, in the order merge_splits_kernel stores them (online_softmax.store_row_stats first).
STATE_PLANES = ("lse", "label_logit", "sum_logits", "entropy", "max_logit")
KD_PLANES = ("lse_s", "lse_t", "kl_forward", "kl_reverse")
N_STATE = len(STATE_PLANES)
N_STUDENT_PARTIAL = 5  # m, d, u, label_logit, sum_logits
N_DISTILL_PARTIAL = N_STUDENT_PARTIAL + 6  # then m_s, d_s, A_r, m_t, d_t, A_f
# The same counts as the kernels read them (a kernel reads only constexpr globals).
STATE_OFFSET = tl.constexpr(N_STATE)
KD_STATE_OFFSET = tl.constexpr(N_STUDENT_PARTIAL)


@triton.jit
def merge_splits_kernel(PART, OUT, N, n_splits, DISTILL: tl.constexpr, BLOCK: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    valid = rows < N
    plane = n_splits * N
    m, d, u, label_logit, sum_logits = empty_student_state(BLOCK)
    m_s, d_s, a_r = empty_state(BLOCK)
    m_t, d_t, a_f = empty_state(BLOCK)
    for sp in range(0, n_splits):
        part = PART + sp * N + rows
        m, d, u, label_logit, sum_logits = merge_student_state(m, d, u, label_logit, sum_logits, part, plane, valid)
        if DISTILL:
            m_s, d_s, a_r, m_t, d_t, a_f = merge_kd_state(m_s, d_s, a_r, m_t, d_t, a_f,
                                                          part + KD_STATE_OFFSET * plane, plane, valid)
    lse, entropy = finish_softmax_state(m, d, u)
    store_row_stats(OUT, N, rows, valid, lse, label_logit, sum_logits, entropy, m)
    if DISTILL:
        lse_s, lse_t, kl_forward, kl_reverse = finish_kd_state(m_s, d_s, a_r, m_t, d_t, a_f)
        out = OUT + STATE_OFFSET * N + rows
        tl.store(out, lse_s, mask=valid)
        tl.store(out + N, lse_t, mask=valid)
        tl.store(out + 2 * N, kl_forward, mask=valid)
        tl.store(out + 3 * N, kl_reverse, mask=valid)


def merge_splits(part: torch.Tensor, distill: bool) -> torch.Tensor:
    """The [N_STATE (+ len(KD_PLANES) with ``distill``), n] float32 final planes of the partial
    states ``part`` [planes, splits, n]."""
    _, splits, n = part.shape
    out = torch.empty(N_STATE + (len(KD_PLANES) if distill else 0), n, device=part.device, dtype=torch.float32)
    cfg = kernel_config("merge_splits", torch.float32)
    merge_splits_kernel[(triton.cdiv(n, cfg["BLOCK"]),)](part, out, n, splits, DISTILL=distill, **cfg)
    return out
