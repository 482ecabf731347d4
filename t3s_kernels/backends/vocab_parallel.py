"""A head split over the vocabulary across ranks (tensor parallelism): each rank holds the entries
[start, start + V_local) of the vocabulary (those rows of the weight matrix) and sees every token.

Each rank runs any engine over its own entries, then each token row's state merges exactly across
ranks (the online-softmax merge of backends/base.py, as a collective):
    m = max_r m_r,   d = sum_r e^(m_r - m) d_r,   u = sum_r e^(m_r - m) (u_r + (m_r - m) d_r)
the label's logit and the smoothing sum are sums (a label lives on one rank; the others add 0),
``correct`` compares the label's logit with the global max. The gradient then needs only the
global logsumexp: each rank's dL/dz over its own columns is exact, dW and db stay local, and dX
is the sum of the ranks' partial products (one all-reduce). Every rank must call with the same
tokens, labels and weights, as tensor parallelism gives them.

Distillation: the teacher's head is split the same way (the same entries on each rank). Its
divergences need both heads' logsumexps, merged across ranks before the per-rank sums over the
vocabulary (backends/distill.py with ``ShardedVocab``); this path runs the chunked driver with the
PyTorch epilogue (cuBLAS matmuls on a GPU) whatever the engine asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..options import GradRequest, HeadOptions
from ..validation import is_dtensor
from .base import HeadGrads, RowStats, rescaled_state
from .chunked import ChunkedEngine
from .distill import VocabAxis
from .torch_epilogue import TorchEpilogue


@dataclass(frozen=True)
class VocabShard:
    """This rank's part of a vocabulary-parallel head: entries ``[start, start + weight.shape[0])`` of a
    vocabulary of ``vocab_size``, split across the ranks of ``group`` (None: the default group)."""

    start: int
    vocab_size: int
    group: Any = None


def local_head(weight, bias, vocab_parallel, name: str = "weight"):
    """(this rank's weight rows, bias entries, ``VocabShard``) of a head split over the vocabulary.

    ``vocab_parallel`` is a ``VocabShard`` (``weight`` already holds this rank's entries), or the
    1-D ``DeviceMesh`` of a ``Shard(0)`` DTensor ``weight``: passing the mesh is the caller's
    statement that the head is tensor-parallel (FSDP2's parameters carry the same placement, so it
    is never inferred); its local part (differentiable, the gradient reaches the DTensor as
    Shard(0)) and its offset come from the DTensor's own layout, with no communication."""
    if isinstance(vocab_parallel, VocabShard):
        if is_dtensor(weight):
            raise TypeError(f"{name} is a DTensor; with vocab_parallel=VocabShard(...) pass its local part "
                            f"({name}.to_local()), or pass vocab_parallel={name}.device_mesh")
        return weight, bias, vocab_parallel
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(vocab_parallel, DeviceMesh):
        raise TypeError(f"vocab_parallel must be a VocabShard or the DeviceMesh of a Shard(0) DTensor {name}; got "
                        f"{type(vocab_parallel).__name__}")
    if not is_dtensor(weight):
        raise TypeError(f"vocab_parallel=<a DeviceMesh> is for a DTensor {name}; for a plain local part pass "
                        "vocab_parallel=VocabShard(start, vocab_size, group)")
    mesh = weight.device_mesh
    if mesh != vocab_parallel or mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        raise ValueError(f"{name} is a DTensor with placements {tuple(weight.placements)} on a {mesh.ndim}-D mesh"
                         f"{'' if mesh == vocab_parallel else ' other than vocab_parallel'}; the vocabulary-parallel "
                         "loss handles a head sharded over the vocabulary (Shard(0)) on the 1-D mesh it is given")
    _, offset = compute_local_shape_and_global_offset(weight.shape, mesh, weight.placements)
    shard = VocabShard(start=int(offset[0]), vocab_size=int(weight.shape[0]), group=mesh.get_group())
    local = weight.to_local()
    return local, shard_entries(bias, shard, local.shape[0], "bias"), shard


def shard_entries(t, shard: VocabShard, local_vocab: int, name: str):
    """This rank's ``local_vocab`` entries of a per-vocabulary tensor (a bias, a teacher's head) for
    ``shard``: a ``Shard(0)`` DTensor's local part (split as the student's), a whole plain tensor's
    slice, or a plain tensor that already holds them; anything else is refused."""
    from torch.distributed.tensor import Shard

    if t is None:
        return None
    if is_dtensor(t):
        if tuple(t.placements) != (Shard(0),) or t.device_mesh.ndim != 1 or t.shape[0] != shard.vocab_size:
            raise ValueError(f"{name} is a DTensor with placements {tuple(t.placements)} and {t.shape[0]} entries; a "
                             f"vocabulary-parallel head needs it sharded as the head (Shard(0) of "
                             f"{shard.vocab_size} entries on the same mesh) or whole")
        local = t.to_local()
    elif t.shape[0] == shard.vocab_size and local_vocab != shard.vocab_size:
        local = t[shard.start:shard.start + local_vocab]
    else:
        local = t
    if local.shape[0] != local_vocab:
        raise ValueError(f"{name} has {local.shape[0]} vocabulary entries on this rank, the head {local_vocab}: "
                         f"give it whole ({shard.vocab_size} entries) or split as the head")
    return local


def check_shards(shard: VocabShard, local_vocab: int, device: torch.device) -> None:
    """The ranks' shards must tile the vocabulary exactly (no gap, no overlap), or be refused."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("vocab_parallel needs an initialized torch.distributed process group")
    if not (isinstance(shard.start, int) and isinstance(shard.vocab_size, int) and 0 <= shard.start
            and shard.start + local_vocab <= shard.vocab_size):
        raise ValueError(f"vocab_parallel: this rank's entries [{shard.start}, {shard.start + local_vocab}) do not lie "
                         f"in [0, vocab_size = {shard.vocab_size})")
    world = dist.get_world_size(shard.group)
    mine = torch.tensor([shard.start, local_vocab, shard.vocab_size], device=device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=shard.group)
    spans = sorted((int(t[0]), int(t[1]), int(t[2])) for t in everyone)
    if any(v != shard.vocab_size for _, _, v in spans):
        raise ValueError(f"vocab_parallel: the ranks disagree on vocab_size: {[v for _, _, v in spans]}")
    end = 0
    for start, rows, _ in spans:
        if start != end:
            raise ValueError(f"vocab_parallel: the ranks' entries {[(s, s + r) for s, r, _ in spans]} do not tile "
                             f"[0, {shard.vocab_size}) exactly")
        end = start + rows
    if end != shard.vocab_size:
        raise ValueError(f"vocab_parallel: the ranks' entries cover [0, {end}), not [0, {shard.vocab_size})")


def for_shard(engine, shard: Optional[VocabShard], local_vocab: int, device: torch.device):
    """(engine, whole vocabulary size): ``engine`` and its weight's entries as they are, or for a
    vocabulary-parallel head, the engine merged across ranks after the shards are checked."""
    if shard is None:
        return engine, local_vocab
    check_shards(shard, local_vocab, device)
    return VocabParallelEngine(engine, shard), shard.vocab_size


class _SumOverRanks(torch.autograd.Function):
    """All-reduce sum whose backward is the identity: what follows it is computed identically on
    every rank (replicated), so each rank's share receives the replicated gradient once."""

    @staticmethod
    def forward(ctx, t, group):
        import torch.distributed as dist

        out = t.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ToShardedWork(torch.autograd.Function):
    """Identity whose backward all-reduces: a replicated value that enters per-rank (sharded) terms
    receives from each rank the gradient of that rank's terms only; the whole is their sum."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ShardedVocab(VocabAxis):
    """Reductions over a vocabulary split across the ranks of a tensor-parallel group: this rank
    holds columns ``[shard.start, shard.start + width)``; sums and picks add up across ranks
    (differentiably), the max is taken across ranks (it only stabilizes, no gradient). As in
    Megatron's tensor-parallel regions, a sum over ranks has an identity backward and a replicated
    value broadcast into per-rank terms an all-reduced one."""

    def __init__(self, shard: VocabShard):
        self.shard = shard

    def sum(self, t):
        return _SumOverRanks.apply(t.sum(-1), self.shard.group)

    def max(self, t):
        import torch.distributed as dist

        m = t.detach().amax(-1)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=self.shard.group)
        return m

    def pick(self, s, ids):
        width = s.shape[-1]
        local = ids - self.shard.start
        here = (local >= 0) & (local < width)
        picked = super().pick(s, local.clamp(0, width - 1))
        return _SumOverRanks.apply(torch.where(here, picked, torch.zeros_like(picked)), self.shard.group)

    def logsumexp(self, t):
        m = self.max(t)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        return m + torch.log(self.sum(torch.exp(t - m[:, None])))

    def log_softmax(self, t):
        return t - _ToShardedWork.apply(self.logsumexp(t), self.shard.group)[:, None]


class VocabParallelEngine:
    """Any engine over this rank's vocabulary entries, its states merged across the ranks (module docstring)."""

    fuses_backward = True

    def __init__(self, inner, shard: VocabShard):
        self.inner, self.shard = inner, shard

    def _merge(self, st: RowStats) -> RowStats:
        import torch.distributed as dist

        group = self.shard.group
        m_r = st.max_logit
        d_r = torch.exp(st.lse - m_r)
        u_r = d_r * (torch.log(d_r) - st.entropy)  # entropy = log d - u / d
        m = m_r.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        sums = torch.stack([*rescaled_state(m_r, d_r, u_r, m), st.label_logit, st.sum_logits])
        dist.all_reduce(sums, group=group)
        d, u, label_logit, sum_logits = sums
        log_d = torch.log(d)
        return RowStats(lse=m + log_d, label_logit=label_logit, sum_logits=sum_logits, entropy=log_d - u / d,
                        max_logit=m)

    def forward(self, x, weight, bias, labels, opts: HeadOptions, row_scale: Optional[torch.Tensor] = None,
                grads: GradRequest = GradRequest(), teacher=None) -> "tuple[RowStats, Optional[HeadGrads]]":
        if teacher is not None:
            stats, out = self._distill_engine().forward(x, weight, bias, labels, opts, row_scale, grads, teacher)
            return stats, None if out is None else self._sum_dx(out)
        local, _ = self.inner.forward(x, weight, bias, labels - self.shard.start, opts,
                                      grads=GradRequest(False, False, False))
        stats = self._merge(local)
        if row_scale is None or not grads.any:
            return stats, None
        return stats, self.backward(x, weight, bias, labels, stats.lse, row_scale, opts, grads)

    def backward(self, x, weight, bias, labels, lse, row_scale, opts: HeadOptions, grads: GradRequest,
                 teacher=None) -> HeadGrads:
        if teacher is not None:
            return self._sum_dx(self._distill_engine().backward(x, weight, bias, labels, lse, row_scale, opts,
                                                                grads, teacher))
        return self._sum_dx(self.inner.backward(x, weight, bias, labels - self.shard.start, lse, row_scale, opts,
                                                grads))

    def _distill_engine(self) -> ChunkedEngine:
        """The chunked driver with the PyTorch epilogue over this rank's slice of both heads."""
        return ChunkedEngine(TorchEpilogue(ShardedVocab(self.shard)), getattr(self.inner, "budget_bytes", None))

    def _sum_dx(self, out: HeadGrads) -> HeadGrads:
        """Each rank's dX covers its own columns only: the whole dX is their sum."""
        import torch.distributed as dist

        if out.hidden is not None:
            total = out.hidden.float()  # the ranks' partial dX, summed in float32
            dist.all_reduce(total, group=self.shard.group)
            out.hidden = total.to(out.hidden.dtype)
        return out
