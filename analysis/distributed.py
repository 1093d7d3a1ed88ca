"""Rank, world size and reductions over ``torch.distributed``: one home for every package.

Every rank holds the same model and the same list of batches; rank ``r`` of ``W`` takes
batches ``r, r + W, r + 2W, ...``. Sums over samples are then all-reduced, so each rank
ends with the full-data value. With no process group (or ``distributed=False``) these
helpers are the identity.

The ``distributed`` flag of every function here (and of every measure that takes one):

* ``False``: one process, whatever is initialized;
* ``True``: a process group must be running (else ``ValueError``);
* ``None``: use the process group when one is initialized.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist


def rank_world(distributed: bool | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process under the ``distributed`` flag (module doc).

    Raises:
        ValueError: ``distributed=True`` but ``torch.distributed`` is not initialized.

    >>> rank_world(False)
    (0, 1)
    """
    on = dist.is_available() and dist.is_initialized()
    if distributed and not on:
        raise ValueError(
            "distributed=True needs torch.distributed.init_process_group() first "
            "(e.g. launch with torchrun)"
        )
    if on and distributed is not False:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed(distributed: bool | None) -> bool:
    """True when ``distributed`` selects a process group of more than one rank."""
    return rank_world(distributed)[1] > 1


def init_from_env(device: str | torch.device = "cpu") -> tuple[int, int]:
    """Initialise the process group under ``torchrun`` (``WORLD_SIZE > 1``); ``(rank, world)``.

    The backend is nccl for a CUDA device and gloo otherwise. Without torchrun this is
    ``(0, 1)`` and nothing is initialised.
    """
    if not dist.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def local_device(device: str) -> str:
    """``cuda:LOCAL_RANK`` for a CUDA device under torchrun, else ``device`` unchanged."""
    if torch.device(device).type == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def shard(batches: Iterable, distributed: bool | None) -> list:
    """This rank's share of ``batches`` (every ``world``-th batch from its rank)."""
    rank, world = rank_world(distributed)
    return list(batches)[rank::world]


def _wire_device(t: torch.Tensor) -> torch.device:
    """Where a reduction can run: nccl reduces CUDA tensors only."""
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def all_reduce_sum(t: torch.Tensor, distributed: bool | None) -> torch.Tensor:
    """Sum ``t`` over ranks in place (float64 on the wire for exact-order sums); return it."""
    if is_distributed(distributed):
        buf = t.to(_wire_device(t), torch.float64)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        t.copy_(buf)
    return t


def gather_floats(values: list[float], distributed: bool | None) -> list[float]:
    """Concatenate every rank's list of floats (rank order); the identity when not distributed."""
    if not is_distributed(distributed):
        return list(values)
    out: list[list[float]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(out, list(values))
    return [v for part in out for v in part]


def barrier(distributed: bool | None) -> None:
    """Wait for every rank (a no-op on one process)."""
    if is_distributed(distributed):
        dist.barrier()
