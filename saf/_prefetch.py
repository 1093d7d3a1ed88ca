r"""SAF's store traffic in chunks: targets read for many steps at once, writes buffered.

When the trainer knows an epoch's batches in advance (it always does: one permutation per
epoch), :class:`TargetPrefetch` reads the targets of the next ``chunk`` batches from the
:class:`~saf.trajectory.OutputStore` in one gather and turns them into what each step
needs, and it writes the logits the steps record back in one scatter per chunk. A step
then costs SAF a handful of small kernels (:func:`kl_step`) instead of about twenty.
Inside a CPU training step each small kernel costs ~20 us (cold caches after the
convolutions), so on the default model this is most of SAF's overhead; on a GPU it saves
kernel launches, and under DDP one all-gather per chunk replaces one per step.

Per step, with :math:`w_i = m_i\lambda\tau/B` (:math:`m_i` the store's validity mask),
:math:`p_i = \mathrm{softmax}(z^{past}_i/\tau)` and :math:`\tilde p_i = w_i p_i`, all
prepared per chunk, and :math:`q_i = \mathrm{softmax}(z_i/\tau)`:

.. math::
    L_{tra} = \tau\sum_i \tilde p_i\cdot(\log p_i - \log q_i),\qquad
    \frac{\partial L_{tra}}{\partial z_i} = w_i\,q_i - \tilde p_i

which is :func:`~saf.trajectory.trajectory_loss_and_grad` rearranged (tested against it).

**Order of reads and writes.** Before a chunk is read, the writes of the previous chunk
land, so every read sees what the per-step order (read, step, write) would have shown it,
except a sample that appears twice within one chunk of one epoch: its second occurrence
gets its epoch :math:`e-\tilde E` target instead of being masked out. The trainer's sampler
never repeats a sample within an epoch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from saf.trajectory import OutputStore


@torch.no_grad()
def kl_step(z: Tensor, target: tuple[Tensor, ...], tau: float) -> tuple[Tensor, Tensor]:
    """``(loss, grad)`` of the trajectory loss from a prepared target
    ``(-p~, w, log p, tau p~)`` (:meth:`TargetPrefetch.next_target`)."""
    neg_pw, w, log_p, pwt = target
    if w.dtype != z.dtype:
        neg_pw, w, log_p, pwt = (t.to(z.dtype) for t in target)
    log_q = (z * (1.0 / tau)).log_softmax(1)  # tensor methods: no Python wrapper
    grad = torch.addcmul(neg_pw, log_q.exp(), w)
    return torch.vdot(pwt.view(-1), (log_p - log_q).view(-1)), grad


class TargetPrefetch:
    """Chunked reads and buffered writes of an :class:`~saf.trajectory.OutputStore`.

    Args:
        store: the store.
        tau, lam: the trajectory loss's temperature and weight.
        chunk: batches per read/write.
        gather: for distributed SAF, ``gather(idx, logits)`` of every rank (called once
            per flush, on every rank at the same step).
    """

    def __init__(
        self,
        store: OutputStore,
        tau: float,
        lam: float,
        chunk: int = 32,
        gather: Callable | None = None,
    ):
        self.store, self.tau, self.lam, self.chunk, self.gather = store, tau, lam, chunk, gather
        self.epoch, self.read, self.batches, self.pos = 0, False, [], 0
        self.ready: list[tuple[Tensor, Tensor, Tensor]] = []
        self.pending: list[tuple[Tensor, Tensor]] = []

    def begin_epoch(self, epoch: int, batches: list[Tensor], read: bool) -> None:
        """Start an epoch whose steps will see ``batches`` in this order; ``read``: whether
        its steps need targets (the trajectory loss is active)."""
        self.flush()
        self.epoch, self.read, self.batches, self.pos = epoch, read, list(batches), 0
        self.ready = []

    def expects(self, idx: Tensor) -> bool:
        """Whether ``idx`` is the next planned batch (the same tensor object)."""
        return self.pos < len(self.batches) and self.batches[self.pos] is idx

    def next_target(self) -> tuple[Tensor, Tensor, Tensor]:
        """The prepared target of the next planned batch."""
        if not self.ready:
            self._fetch()
        return self.ready.pop(0)

    def record(self, idx: Tensor, logits: Tensor) -> None:
        """Buffer this step's logits (written at the next read or :meth:`flush`)."""
        self.pending.append((idx, logits.detach()))
        self.pos += 1
        if not self.read and len(self.pending) >= self.chunk:
            self.flush()

    def flush(self) -> None:
        """Write the buffered logits to the store."""
        if not self.pending:
            return
        idx = torch.cat([i for i, _ in self.pending])
        z = torch.cat([z for _, z in self.pending])
        self.pending = []
        if self.gather is not None:
            idx, z = self.gather(idx, z)
        self.store.write(idx, z, self.epoch)

    @torch.no_grad()
    def _fetch(self) -> None:
        self.flush()
        batches = self.batches[self.pos : self.pos + self.chunk]
        if not batches:
            raise RuntimeError("TargetPrefetch: more steps than planned batches")
        sizes = [len(b) for b in batches]
        past, mask = self.store.read(torch.cat(batches), self.epoch)
        dev, dtype = past.device, torch.promote_types(past.dtype, torch.float32)
        t = float(self.tau)
        scale = torch.tensor([self.lam * t / s for s in sizes], dtype=dtype, device=dev)
        counts = torch.tensor(sizes, device=dev)
        w = (scale.repeat_interleave(counts) * mask).unsqueeze(1)  # (N, 1), 0 where masked
        past = torch.where(mask.unsqueeze(1), past, 0.0).to(dtype)  # masked rows: anything
        log_p = past.mul_(1.0 / t).log_softmax(1)
        pw = log_p.exp().mul_(w)
        parts = (-pw, w, log_p, pw.mul_(t))
        self.ready = list(zip(*(p.split(sizes) for p in parts), strict=True))
