r"""One training step per method, one signature: ``step(x, y, idx, epoch) -> (ce, traj, logits)``.

* ``sgd``: :math:`\nabla\,\mathrm{CE}`.
* ``sam`` / ``asam``: gradient at :math:`w+\hat\epsilon` (:class:`saf.sam.SAM`), second pass
  with BatchNorm running statistics frozen.
* ``saf`` and ``mesa``: :math:`\mathrm{CE} + L_{tra}` (:func:`~saf.trajectory.trajectory_loss`)
  with one composable target: the logits of epoch :math:`e-\tilde E` from the
  :class:`~saf.trajectory.OutputStore` (saf; this epoch's logits are written back, no
  extra forward or backward pass), or the EMA teacher's output (mesa; one extra no-grad
  forward, and the EMA is updated after every step from epoch 0).

Returned tensors are detached and stay on the device (no host sync per step).

**When the trajectory loss starts.** The paper (§4.1) uses it for epochs
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

from saf.ema import EMA
from saf.sam import SAM, disable_running_stats
from saf.trajectory import OutputStore, trajectory_loss

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

    Call it once per batch: ``ce, traj, logits = step(x, y, idx, epoch)``.
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

    def __call__(self, x: Tensor, y: Tensor, idx: Tensor, epoch: int):
        return self.step(x, y, idx, epoch)

    def _forward_ce(self, x, y):
        """``(logits, z, ce)``: ``z`` is the float32 (or wider) view of the logits CE reads."""
        with self.autocast():
            logits = self.model(x)
        z = _upcast(logits)
        return logits, z, F.cross_entropy(z, y)

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

    def _traj(self, x, y, idx, epoch):
        # The target first: MESA's teacher then runs before the student's forward, not
        # between it and its backward, where its activations would evict the student's.
        target = self._target(x, idx, epoch) if epoch >= self.start_epoch else None
        logits, z, ce = self._forward_ce(x, y)
        traj = ce.new_zeros(())
        if target is not None:
            past, mask = target
            traj = trajectory_loss(z, past, self.tau, self.lam, mask)
        if self.store is not None:
            i, out = (idx, logits) if self.gather is None else self.gather(idx, logits.detach())
            self.store.write(i, out, epoch)
        self.opt.zero_grad(set_to_none=True)
        (ce + traj).backward()
        self.opt.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return ce.detach(), traj.detach(), logits.detach()
