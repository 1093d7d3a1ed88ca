r"""One training step per method, built on the drop-in API: ``step(x, y, idx, epoch)``.

* ``sgd``: :math:`\nabla\,\mathrm{CE}` with the base optimizer (SGD or AdamW).
* ``sam`` / ``asam``: the gradient at :math:`w+\hat\epsilon` (:class:`saf.SAM`), BatchNorm
  statistics frozen on the second pass.
* ``saf`` / ``mesa``: :math:`\mathrm{CE} + L_{tra}`, the target from :class:`saf.SAFLoss`
  (the logits of epoch :math:`e-\tilde E`) or :class:`saf.MESALoss` (an EMA teacher).

This is the trainer's step; a loop of your own does the same with the same classes (README,
"Use SAF in your own loop"). Returned tensors are detached and stay on the device (no host
sync per step).

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

from saf.api import MESALoss, SAFLoss
from saf.paper import METHODS
from saf.sam import SAM


class Stepper:
    """Runs one step of a method on a batch ``(x, y, idx)``.

    Args:
        method: one of :data:`METHODS`.
        model: the model (in train mode), possibly wrapped in DDP.
        optimizer: ``SAM`` for sam/asam, any optimizer otherwise.
        traj: the trajectory loss: a :class:`saf.SAFLoss` (saf) or :class:`saf.MESALoss`
            (mesa); None otherwise.
        criterion: ``criterion(logits, y)``, the batch mean (cross-entropy by default).
        autocast: a context-manager factory for mixed precision (``contextlib.nullcontext``).
        clip_grad: clip the gradient's global norm to this before each update (None: no).
        sam_local_eps: under DDP, each rank's SAM perturbation uses its own gradient
            (``no_sync`` on the first pass: m-sharpness with m = the rank's batch), as the
            reference implementations do; False all-reduces it first (one global epsilon).

    Call it once per batch: ``ce, traj, logits = step(x, y, idx, epoch, weight)``; the
    optional ``weight`` scales the batch's loss (the trainer weights ranks by their share
    of an unevenly split batch).
    """

    def __init__(
        self,
        method: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        traj: SAFLoss | MESALoss | None = None,
        *,
        criterion: Callable = F.cross_entropy,
        autocast: Callable = contextlib.nullcontext,
        clip_grad: float | None = None,
        sam_local_eps: bool = True,
    ):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if method in ("sam", "asam") and not isinstance(optimizer, SAM):
            raise ValueError(f"method {method!r} needs a saf.SAM optimizer")
        need = {"saf": SAFLoss, "mesa": MESALoss}.get(method)
        if need is not None and not isinstance(traj, need):
            raise ValueError(f"method {method!r} needs a saf.{need.__name__}")
        self.method, self.model, self.opt, self.traj = method, model, optimizer, traj
        self.criterion, self.autocast, self.clip_grad = criterion, autocast, clip_grad
        self.sam_local_eps = sam_local_eps

    def __call__(self, x: Tensor, y: Tensor, idx: Tensor, epoch: int, weight: float = 1.0):
        if self.method in ("sam", "asam"):
            return self._sam(x, y, weight)
        # MESA's teacher runs before the student's forward, not between it and its backward,
        # where its activations would evict the student's.
        target = self.traj.target(x, epoch) if self.method == "mesa" else None
        logits, z, ce = self._forward_ce(x, y)
        loss, traj = ce, None
        if self.method == "saf":
            traj = self.traj(z, idx, epoch)
        elif self.method == "mesa":
            traj = self.traj(z, target)
        if traj is not None:
            loss = ce + traj
        self.opt.zero_grad(set_to_none=True)
        (loss if weight == 1.0 else loss * weight).backward()  # no kernel for a weight of 1
        self._clip()
        self.opt.step()
        if self.method == "mesa":
            self.traj.update(self.model)
        traj = torch.zeros((), device=z.device) if traj is None else traj.detach()
        return ce.detach(), traj, logits.detach()

    def _forward_ce(self, x, y):
        """``(logits, z, ce)``: ``z`` is the float32 (or wider) view of the logits."""
        with self.autocast():
            logits = self.model(x)
        z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        return logits, z, self.criterion(z, y)

    def _sam(self, x, y, weight):
        local = self.sam_local_eps and hasattr(self.model, "no_sync")
        with self.model.no_sync() if local else contextlib.nullcontext():
            logits, _, ce = self._forward_ce(x, y)
            self.opt.zero_grad(set_to_none=True)
            (ce if weight == 1.0 else ce * weight).backward()
        self.opt.first_step(zero_grad=True)
        ce2 = self._forward_ce(x, y)[2]
        (ce2 if weight == 1.0 else ce2 * weight).backward()
        self._clip()
        self.opt.second_step(zero_grad=True)
        return ce.detach(), torch.zeros((), device=ce.device), logits.detach()

    def _clip(self) -> None:
        if self.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad, foreach=True)
