"""A head past one GPU: what FSDP2, FSDP1 and tensor parallelism make of the LM head, and how the
fused loss runs inside their hooks."""

from __future__ import annotations

import torch

from ..validation import is_dtensor


def _instance_of(module, name: str) -> bool:
    """``isinstance(module, torch.distributed.fsdp.<name>)``, False on a torch without distributed."""
    try:
        import torch.distributed.fsdp as fsdp
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(module, getattr(fsdp, name))


def is_fsdp2_module(module) -> bool:
    return _instance_of(module, "FSDPModule")


def is_fsdp1_unit(module) -> bool:
    return _instance_of(module, "FullyShardedDataParallel")


def is_plain_linear(module) -> bool:
    """Exactly ``nn.Linear``, FSDP2's wrapper class of exactly ``nn.Linear`` (``fully_shard`` swaps the
    class), or an FSDP1 unit wrapping exactly ``nn.Linear``."""
    cls = type(module)
    if cls is torch.nn.Linear:
        return True
    if is_fsdp1_unit(module):
        return type(module.module) is torch.nn.Linear
    if not is_fsdp2_module(module):
        return False
    from torch.distributed.fsdp import FSDPModule

    return [b for b in cls.__bases__ if b is not FSDPModule] == [torch.nn.Linear]


def runs_through_module(head, weight) -> bool:
    """Whether the loss must run inside a call of the head module: an FSDP2-sharded head (its weight a
    DTensor between calls) or an FSDP1 unit, whose hooks gather the parameters around that call."""
    return (is_dtensor(weight) and is_fsdp2_module(head)) or is_fsdp1_unit(head)


def check_tensor_parallel_head(name: str, hidden, weight, kept_vocab) -> None:
    """What the vocabulary-parallel loss of a tensor-parallel head cannot take (the op checks the rest:
    a Shard(0) head on a 1-D mesh, a teacher split alike or whole)."""
    if is_dtensor(hidden):
        raise ValueError(f"{name}'s LM head input is a DTensor (sequence parallelism?); the vocabulary-parallel "
                         "loss takes the replicated hidden states")
    if kept_vocab is not None and kept_vocab < weight.shape[0]:
        raise ValueError(f"{name} drops padded vocabulary entries; not supported with a tensor-parallel head")


def call_through_head(head, hidden, compute):
    """The loss computed *inside* a call of the sharded head module, as its forward: the hooks of
    FSDP2 (or FSDP1's wrapper) around that call all-gather the weight (and cast it and the input
    under a mixed-precision policy), reshard after, and gather again in backward, exactly as for
    the Linear it replaces; the gradient reaches the sharded parameter through the reduce-scatter.
    FSDP1's wrapper calls the Linear inside it: that Linear's forward is the one replaced."""
    linear = head.module if is_fsdp1_unit(head) else head

    def forward(x):
        return compute(x, linear.weight, linear.bias)

    linear.forward = forward  # an instance attribute: the class's forward (and the hooks) stay
    try:
        return head(hidden)
    finally:
        del linear.forward
