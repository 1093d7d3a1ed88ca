r"""One training step per method, one signature: ``step(x, y, idx, epoch) -> (ce, traj, logits)``.

* ``sgd``: :math:`\nabla\,\mathrm{CE}`.
* ``sam`` / ``asam``: gradient at :math:`w+\hat\epsilon` (:class:`saf.sam.SAM`), second pass
  with BatchNorm running statistics frozen.
* ``saf``: :math:`\mathrm{CE} + L_{tra}` with the target read from the
  :class:`~saf.trajectory.OutputStore` (logits of epoch :math:`e-\tilde E`); this epoch's
  logits are written back. No extra forward or backward pass. When the epoch's batches
  are announced (:meth:`Stepper.begin_epoch`, as the trainer does), the store is read and
  written once per chunk of steps (:mod:`saf._prefetch`): fewer small kernels per step.
* ``mesa``: :math:`\mathrm{CE} + L_{tra}` with the target from the EMA teacher (one extra
  no-grad forward, BatchNorm folded into its convolutions: :mod:`saf._teacher`); the EMA
  is updated after every step from epoch 0 (one ``lerp_`` over packed tensors).

For saf and mesa, :math:`\nabla L_{tra}` with respect to the logits is closed-form
(:func:`~saf.trajectory.trajectory_loss_and_grad`); the backward pass starts from two
roots, the CE and the logits with that gradient, which autograd sums in C++ (no Python
hook, no autograd graph for the KL term).

Returned tensors are detached and stay on the device (no host sync per step).

**When the trajectory loss starts.** The issue (and the paper, §4.1) use it for epochs
:math:`e \ge E_{start}` counted from 0; the public code tests ``epoch > E_start`` in its
own epoch numbering, an off-by-one that we do not reproduce. Logits are recorded from
epoch 0 either way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saf._prefetch import TargetPrefetch, kl_grad
from saf.ema import EMA
from saf.sam import SAM, disable_running_stats
from saf.trajectory import OutputStore, trajectory_loss_and_grad

METHODS = ("sgd", "sam", "asam", "saf", "mesa")


def _upcast(logits: Tensor) -> Tensor:
    """fp16/bf16 logits (autocast) as float32 for the losses; other dtypes unchanged."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


class Stepper:
    """Runs one step of a method on a batch ``(x, y, idx)``.

    Args:
        method: one of :data:`METHODS`.
        model: the model (in train mode).
        optimizer: ``SAM`` for sam/asam, any optimizer otherwise.
        lam, tau, start_epoch: trajectory-loss weight, temperature and first epoch (0-based).
        store: the output store (saf).
        ema: the EMA teacher (mesa).
        autocast: a context-manager factory for mixed precision (``contextlib.nullcontext``).
        gather: for distributed SAF, ``gather(idx, logits) -> (all_idx, all_logits)`` of
            every rank's batch, so each rank's store holds every sample.

    Call it once per batch: ``ce, traj, logits = step(x, y, idx, epoch)``. Optionally
    announce each epoch's batches first (:meth:`begin_epoch`, then :meth:`end_epoch`):
    the results are the same (to float rounding; tested in float64) at a lower cost, but
    SAF's ``traj`` is then a 0-d tensor filled in when its chunk of store writes lands:
    read it after :meth:`end_epoch` (the trainer does).
    """

    def __init__(
        self,
        method: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lam: float = 0.0,
        tau: float = 5.0,
        start_epoch: int = 0,
        store: OutputStore | None = None,
        ema: EMA | None = None,
        autocast: Callable = contextlib.nullcontext,
        gather: Callable | None = None,
    ):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if method in ("sam", "asam") and not isinstance(optimizer, SAM):
            raise ValueError(f"method {method!r} needs a saf.SAM optimizer")
        if method == "saf" and store is None or method == "mesa" and ema is None:
            raise ValueError(
                f"method {method!r} needs {'a store' if method == 'saf' else 'an EMA'}"
            )
        self.method, self.model, self.opt = method, model, optimizer
        self.lam, self.tau, self.start_epoch = lam, tau, start_epoch
        self.store, self.ema, self.autocast, self.gather = store, ema, autocast, gather
        self.step = {"sgd": self._sgd, "sam": self._sam, "asam": self._sam}.get(method, self._traj)
        self.prefetch = None if store is None else TargetPrefetch(store, tau, lam, gather=gather)
        self._planned = False

    def __call__(self, x: Tensor, y: Tensor, idx: Tensor, epoch: int):
        return self.step(x, y, idx, epoch)

    def begin_epoch(self, epoch: int, batches: list[Tensor]) -> None:
        """Announce an epoch's index batches, in order (optional; SAF then reads and
        writes its store once per chunk of steps: :mod:`saf._prefetch`). Each step of the
        epoch must then be called with the very tensor ``batches[k]`` as its ``idx``."""
        if self.prefetch is not None:
            self.prefetch.begin_epoch(epoch, batches, read=epoch >= self.start_epoch)
            self._planned = True

    def end_epoch(self) -> None:
        """Write what the epoch's steps left buffered (call before saving the store)."""
        if self.prefetch is not None:
            self.prefetch.flush()
            self._planned = False

    def _forward_ce(self, x, y):
        """``(logits, z, ce)``: ``z`` is the float32 (or wider) view of the logits CE reads."""
        with self.autocast():
            logits = self.model(x)
        z = _upcast(logits)
        return logits, z, F.cross_entropy(z, y)

    def _forward_ce_traj(self, x, y, target):
        """Logits, CE, the trajectory loss and the backward roots ``(tensors, grads)``: the
        KL term's closed-form gradient enters as a second root at the logits."""
        logits, z, ce = self._forward_ce(x, y)
        if target is None:
            return logits, ce, torch.zeros_like(ce.detach()), ((ce,), None)
        past, mask = target
        traj, grad = trajectory_loss_and_grad(z, past, self.tau, self.lam, mask)
        return logits, ce, traj, ((ce, z), (None, grad))

    def _sgd(self, x, y, idx, epoch):
        logits, _, ce = self._forward_ce(x, y)
        self.opt.zero_grad(set_to_none=True)
        ce.backward()
        self.opt.step()
        return ce.detach(), torch.zeros_like(ce.detach()), logits.detach()

    def _sam(self, x, y, idx, epoch):
        with getattr(self.model, "no_sync", contextlib.nullcontext)():  # local grad (DDP)
            logits, _, ce = self._forward_ce(x, y)
            self.opt.zero_grad(set_to_none=True)
            ce.backward()
        self.opt.first_step(zero_grad=True)
        with disable_running_stats(self.model):
            self._forward_ce(x, y)[2].backward()
        self.opt.second_step(zero_grad=True)
        return ce.detach(), torch.zeros_like(ce.detach()), logits.detach()

    def _target(self, x, idx, epoch):
        """(target logits, validity mask or None) for the trajectory loss."""
        if self.method == "saf":
            return self.store.read(idx, epoch)
        with torch.inference_mode(), self.autocast():  # leaner than no_grad
            return self.ema(x), None

    def _planned_saf(self, x, y, idx, epoch):
        """SAF on an announced batch: the target was prepared for a chunk of steps, and
        the logits are buffered for one write per chunk."""
        pre = self.prefetch
        if not pre.expects(idx) or epoch != pre.epoch:
            raise ValueError(
                "Stepper.begin_epoch announced other batches: call each step with the "
                "announced idx tensors, in order, and the announced epoch"
            )
        target, traj = pre.next_target() if pre.read else (None, None)
        logits, z, ce = self._forward_ce(x, y)
        roots = ((ce,), None)
        if target is None:
            traj = torch.zeros_like(ce.detach())
        else:
            roots = ((ce, z), (None, kl_grad(z, target, self.tau)))
        pre.record(idx, logits)
        self.opt.zero_grad(set_to_none=True)
        torch.autograd.backward(*roots)
        self.opt.step()
        return ce.detach(), traj, logits.detach()

    def _traj(self, x, y, idx, epoch):
        if self._planned:
            return self._planned_saf(x, y, idx, epoch)
        # The target first: MESA's teacher forward then runs before the student's forward,
        # not between it and its backward, where the teacher's activations evict the
        # student's saved ones from cache. Measured with separate, equally warm models:
        # 1.26x instead of 1.29x an sgd step. The numbers are the same either way (the
        # teacher is in eval mode and draws no random numbers).
        target = self._target(x, idx, epoch) if epoch >= self.start_epoch else None
        logits, ce, traj, roots = self._forward_ce_traj(x, y, target)
        if self.store is not None:
            i, z = (idx, logits) if self.gather is None else self.gather(idx, logits.detach())
            self.store.write(i, z, epoch)
        self.opt.zero_grad(set_to_none=True)
        torch.autograd.backward(*roots)
        self.opt.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return ce.detach(), traj, logits.detach()
