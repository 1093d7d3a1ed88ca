"""SAF's store under ``torch.distributed``: every rank's rows, gathered.

Every rank draws the same global permutation and takes ``batch[rank::world]`` of each
global batch. :func:`gather_rows` collects every rank's ``(idx, logits)`` of a step, so
every rank's store holds every sample's own logits, whichever rank saw it (the reference
code keeps a per-rank store that the sampler's reshuffle breaks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def gather_rows(idx: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Every rank's ``(idx, rows)`` of this step, concatenated in rank order (padded to the
    largest rank's count for the collective, then trimmed)."""
    world = dist.get_world_size()
    n = torch.tensor([len(idx)], device=idx.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    m = int(max(s.item() for s in sizes))
    pad_i = torch.zeros(m, dtype=idx.dtype, device=idx.device)
    pad_z = rows.new_zeros(m, rows.shape[1])
    pad_i[: len(idx)], pad_z[: len(idx)] = idx, rows
    all_i = [torch.empty_like(pad_i) for _ in range(world)]
    all_z = [torch.empty_like(pad_z) for _ in range(world)]
    dist.all_gather(all_i, pad_i)
    dist.all_gather(all_z, pad_z)
    keep = [(i[: int(s)], z[: int(s)]) for i, z, s in zip(all_i, all_z, sizes, strict=True)]
    return torch.cat([k[0] for k in keep]), torch.cat([k[1] for k in keep])
