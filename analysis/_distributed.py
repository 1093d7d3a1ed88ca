"""Sharding data across ``torch.distributed`` ranks and summing results.

Every rank holds the same model and the same list of batches; rank ``r`` of
``W`` takes batches ``r, r + W, r + 2W, ...``. Sums over samples are then
all-reduced, so each rank ends with the full-data value. With no process
group (or ``distributed=False``) these helpers are the identity.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


def is_distributed(flag: bool) -> bool:
    """True when ``flag`` is set and a process group with more than one rank is running.

    Raises:
        ValueError: ``flag`` is set but ``torch.distributed`` is not initialized.
    """
    if not flag:
        return False
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "distributed=True needs torch.distributed.init_process_group() first "
            "(e.g. launch with torchrun)"
        )
    return dist.get_world_size() > 1


def shard(batches: Iterable, distributed: bool) -> list:
    """This rank's share of ``batches`` (every ``world``-th batch from its rank)."""
    batches = list(batches)
    if not is_distributed(distributed):
        return batches
    rank, world = dist.get_rank(), dist.get_world_size()
    return batches[rank::world]


def all_reduce_sum(t: torch.Tensor, distributed: bool) -> torch.Tensor:
    """Sum ``t`` over ranks in place (float64 on the wire for exact-order sums); return it."""
    if is_distributed(distributed):
        buf = t.to(torch.float64)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        t.copy_(buf)
    return t


def gather_floats(values: list[float], distributed: bool) -> list[float]:
    """Concatenate every rank's list of floats (rank order); the identity when not distributed."""
    if not is_distributed(distributed):
        return list(values)
    out: list[list[float]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(out, list(values))
    return [v for part in out for v in part]
