r"""SAF's store traffic in chunks: targets read for many steps at once, writes buffered.

When the trainer knows an epoch's batches in advance (it always does: one permutation per
epoch), :class:`TargetPrefetch` reads the targets of the next ``chunk`` batches from the
:class:`~saf.trajectory.OutputStore` in one gather and turns them into what each step
needs, and it writes the logits the steps record back in one scatter per chunk. A step
then costs SAF three small kernels (:func:`kl_grad`) instead of about twenty.
Inside a CPU training step each small kernel costs ~20 us (cold caches after the
convolutions), so on the default model this is most of SAF's overhead; on a GPU it saves
kernel launches, and under DDP one all-gather per chunk replaces one per step.

Per step, with :math:`w_i = m_i\lambda\tau/B` (:math:`m_i` the store's validity mask),
:math:`p_i = \mathrm{softmax}(z^{past}_i/\tau)` and :math:`\tilde p_i = w_i p_i`, all
prepared per chunk, and :math:`q_i = \mathrm{softmax}(z_i/\tau)`, a step computes only the
gradient (:func:`kl_grad`, three small kernels):

.. math::
    \frac{\partial L_{tra}}{\partial z_i} = w_i\,q_i - \tilde p_i

The loss value, needed only for the metrics, is computed when the chunk's logits are
written, for all its steps at once: :math:`L_{tra} = \tau\sum_i \tilde p_i\cdot(\log p_i
- \log q_i)`. A step therefore returns its trajectory loss as a 0-d view that is filled in
at that write (:meth:`TargetPrefetch.flush`; at the latest by ``Stepper.end_epoch``). Both
are :func:`~saf.trajectory.trajectory_loss_and_grad` rearranged (tested against it).

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
def kl_grad(z: Tensor, target: tuple[Tensor, Tensor], tau: float) -> Tensor:
    """The trajectory loss's gradient ``w q - p~`` at the logits ``z``, from a prepared
    target ``(-p~, w)`` (:meth:`TargetPrefetch.next_target`)."""
    neg_pw, w = target
    if w.dtype != z.dtype:
        neg_pw, w = neg_pw.to(z.dtype), w.to(z.dtype)
    q = (z * (1.0 / tau)).softmax(1)  # tensor methods: no Python wrapper
    return torch.addcmul(neg_pw, q, w)


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
        self.ready: list[tuple[tuple[Tensor, Tensor], Tensor]] = []
        self.pending: list[tuple[Tensor, Tensor]] = []
        self._loss: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # the chunk's
        self._row_cache: dict = {}

    def begin_epoch(self, epoch: int, batches: list[Tensor], read: bool) -> None:
        """Start an epoch whose steps will see ``batches`` in this order; ``read``: whether
        its steps need targets (the trajectory loss is active)."""
        self.flush()
        self.epoch, self.read, self.batches, self.pos = epoch, read, list(batches), 0
        self.ready = []

    def expects(self, idx: Tensor) -> bool:
        """Whether ``idx`` is the next planned batch (the same tensor object)."""
        return self.pos < len(self.batches) and self.batches[self.pos] is idx

    def next_target(self) -> tuple[tuple[Tensor, Tensor], Tensor]:
        """The prepared target ``(-p~, w)`` of the next planned batch, and the 0-d tensor
        its trajectory loss will be written to when its chunk is flushed."""
        if not self.ready:
            self._fetch()
        return self.ready.pop(0)

    def record(self, idx: Tensor, logits: Tensor) -> None:
        """Buffer this step's logits (written at the next read or :meth:`flush`)."""
        self.pending.append((idx, logits.detach()))
        self.pos += 1
        if not self.read and len(self.pending) >= self.chunk:
            self.flush()

    @torch.no_grad()
    def flush(self) -> None:
        """Write the buffered logits to the store; fill in their steps' trajectory losses."""
        if not self.pending:
            return
        idx = torch.cat([i for i, _ in self.pending])
        z = torch.cat([z for _, z in self.pending])
        self.pending = []
        if self._loss is not None:
            self._fill_losses(z)
        if self.gather is not None:
            idx, z = self.gather(idx, z)
        self.store.write(idx, z, self.epoch)

    def _fill_losses(self, z: Tensor) -> None:
        """Each step's trajectory loss (the module's formula) from the logits ``z`` of
        the chunk's first ``len(z)`` rows (the steps taken)."""
        pw, log_p, step_of_row, losses = self._loss
        self._loss, n = None, len(z)
        log_q = (z.to(pw.dtype) * (1.0 / self.tau)).log_softmax(1)
        rows = torch.linalg.vecdot(pw[:n], log_p[:n] - log_q)
        losses.index_add_(0, step_of_row[:n], rows, alpha=self.tau)

    def _rows(self, sizes: list[int], dtype: torch.dtype, dev: torch.device):
        """Per row of a chunk: ``lam * tau / B`` of its batch, its step within the chunk,
        and a row of zeros in the compute dtype (made once per chunk shape)."""
        key = (tuple(sizes), dtype, dev, self.lam, self.tau)
        if key not in self._row_cache:
            if len(self._row_cache) >= 4:  # e.g. full chunks, an epoch's last one
                self._row_cache.clear()
            counts = torch.tensor(sizes, device=dev)
            scale = [self.lam * self.tau / s for s in sizes]
            self._row_cache[key] = (
                torch.tensor(scale, dtype=dtype, device=dev).repeat_interleave(counts),
                torch.arange(len(sizes), device=dev).repeat_interleave(counts),
                torch.zeros(1, self.store.logits.shape[2], dtype=dtype, device=dev),
            )
        return self._row_cache[key]

    @torch.no_grad()
    def _fetch(self) -> None:
        self.flush()
        batches = self.batches[self.pos : self.pos + self.chunk]
        if not batches:
            raise RuntimeError("TargetPrefetch: more steps than planned batches")
        sizes = [len(b) for b in batches]
        past, mask = self.store.read(torch.cat(batches), self.epoch)
        dtype = torch.promote_types(past.dtype, torch.float32)
        scale, step_of_row, zeros = self._rows(sizes, dtype, past.device)
        w = (scale * mask).unsqueeze(1)  # (N, 1), 0 where masked
        past = torch.where(mask.unsqueeze(1), past, zeros)  # masked rows may hold inf
        log_p = past.mul_(1.0 / self.tau).log_softmax(1)
        pw = log_p.exp().mul_(w)
        losses = torch.zeros(len(batches), dtype=dtype, device=past.device)
        parts = zip(pw.neg().split(sizes), w.split(sizes), strict=True)
        self.ready = list(zip(parts, losses.unbind(), strict=True))
        self._loss = (pw, log_p, step_of_row, losses)
