"""torch.distributed helpers for the trainer (DDP under ``torchrun``; gloo on CPU, nccl on GPU).

Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is initialised on first use.
Every rank draws the same global permutation and takes ``batch[rank::world]`` of each
global batch. For SAF, :meth:`DistInfo.gather` collects every rank's ``(idx, logits)``
after each step, so every rank's store holds every sample's own logits, whichever rank
saw it (the reference code keeps a per-rank store that the sampler's reshuffle breaks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from analysis.distributed import all_reduce_sum, init_from_env


@dataclass
class DistInfo:
    """Rank and world size of this process (``0, 1`` when not distributed)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls, device: str = "cpu") -> DistInfo:
        """Initialise the process group under torchrun if needed; return rank and world."""
        return cls(*init_from_env(device))

    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum over ranks (in place); a no-op on one process."""
        return all_reduce_sum(t, self.world > 1)

    def gather(self, idx: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Every rank's ``(idx, logits)`` of this step, concatenated (padded, then trimmed)."""
        n = torch.tensor([len(idx)], device=idx.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        m = int(max(s.item() for s in sizes))
        pad_i = torch.zeros(m, dtype=idx.dtype, device=idx.device)
        pad_z = logits.new_zeros(m, logits.shape[1])
        pad_i[: len(idx)], pad_z[: len(idx)] = idx, logits
        all_i = [torch.empty_like(pad_i) for _ in range(self.world)]
        all_z = [torch.empty_like(pad_z) for _ in range(self.world)]
        dist.all_gather(all_i, pad_i)
        dist.all_gather(all_z, pad_z)
        keep = [(i[: int(s)], z[: int(s)]) for i, z, s in zip(all_i, all_z, sizes, strict=True)]
        return torch.cat([k[0] for k in keep]), torch.cat([k[1] for k in keep])
