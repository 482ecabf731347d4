"""The forward tile kernel's last step: merge the partial states of a row's vocabulary splits.

A forward tile grid splits the vocabulary across programs when there are few token blocks;
each split leaves a partial state (online_softmax.py: the student's five planes) for every row.
One program per BLOCK rows merges a row's splits in order and stores the final planes,
``STATE_PLANES``.
"""

import torch
import triton
import triton.language as tl

from .configs import kernel_config
from .online_softmax import empty_student_state, finish_softmax_state, merge_student_state, store_row_stats

# The final planes, in the order merge_splits_kernel stores them (online_softmax.store_row_stats).
STATE_PLANES = ("lse", "label_logit", "sum_logits", "entropy", "max_logit")
N_STATE = len(STATE_PLANES)
N_STUDENT_PARTIAL = 5  # m, d, u, label_logit, sum_logits
# The same count as the kernels read it (a kernel reads only constexpr globals).
STATE_OFFSET = tl.constexpr(N_STATE)


@triton.jit
def merge_splits_kernel(PART, OUT, N, n_splits, BLOCK: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    valid = rows < N
    plane = n_splits * N
    m, d, u, label_logit, sum_logits = empty_student_state(BLOCK)
    for sp in range(0, n_splits):
        m, d, u, label_logit, sum_logits = merge_student_state(m, d, u, label_logit, sum_logits,
                                                               PART + sp * N + rows, plane, valid)
    lse, entropy = finish_softmax_state(m, d, u)
    store_row_stats(OUT, N, rows, valid, lse, label_logit, sum_logits, entropy, m)


def merge_splits(part: torch.Tensor) -> torch.Tensor:
    """The [N_STATE, n] float32 final planes of the partial states ``part`` [planes, splits, n]."""
    _, splits, n = part.shape
    out = torch.empty(N_STATE, n, device=part.device, dtype=torch.float32)
    cfg = kernel_config("merge_splits", torch.float32)
    merge_splits_kernel[(triton.cdiv(n, cfg["BLOCK"]),)](part, out, n, splits, **cfg)
    return out
