r"""SAF, MESA and SAM in a Lightning ``LightningModule``: one callback, :class:`SAFCallback`.

The losses are called in ``training_step`` as in any loop (:mod:`saf.api`); the callback
does what the loop around them must do, where Lightning owns that loop:

* it saves the SAF store or the MESA teacher in the Lightning checkpoint and restores it
  on ``trainer.fit(model, ckpt_path=...)`` (refusing a checkpoint without it, where the
  trajectory loss would silently be 0);
* it updates MESA's teacher after every real optimizer step, not after an accumulation
  micro-batch, and keeps the teacher on the module's device;
* it refuses SAM where its step would be silently wrong: gradient accumulation (Lightning
  computes one micro-batch's gradient before ``step`` and another's in the closure, so
  :math:`\hat\epsilon` would come from the wrong data), a ``GradScaler`` precision
  (``"16-mixed"``; ``"bf16-mixed"`` works), and, under manual optimization, calling
  ``first_step`` then ``second_step`` directly (``trainer.global_step`` stays 0: no
  checkpoint is ever written). Step with ``self.optimizers().step(closure)`` instead, or
  end a ``first_step`` with ``self.optimizers().step()``.

Under automatic optimization Lightning calls ``SAM.step(closure)``, which runs
``training_step`` twice (at :math:`w` and :math:`w+\hat\epsilon`); what the module logs
comes from both passes, and the step's returned loss is the perturbed one. Under manual
optimization::

    def training_step(self, batch, batch_idx):
        def closure():
            loss = F.cross_entropy(self.net(batch[0]), batch[1])
            self.manual_backward(loss)
            return loss

        return self.optimizers().step(closure)  # two passes; global_step advances

Example (SAF; MESA is ``saf.MESALoss(self.net, decay)`` with ``SAFCallback(self.mesa,
student=self.net)``)::

    class Net(L.LightningModule):
        def __init__(self, n):
            super().__init__()
            self.net = torch.nn.Linear(20, 4)
            self.saf = saf.SAFLoss(n, num_classes=4)

        def training_step(self, batch, batch_idx):
            x, y, idx = batch  # a saf.WithIndex data set
            logits = self.net(x)
            return F.cross_entropy(logits, y) + self.saf(logits, idx, self.current_epoch)

    model = Net(len(data))
    L.Trainer(callbacks=[SAFCallback(model.saf)]).fit(model, loader)
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from analysis.monitor import SharpnessMonitor
from saf.api import MESALoss, SAFLoss
from saf.sam import SAM


class SAFCallback(pl.Callback):
    """Checkpointing, the EMA update and SAM's safety checks for a ``LightningModule``.

    Args:
        loss: the module's :class:`saf.SAFLoss` or :class:`saf.MESALoss` (None for SAM
            alone: the callback then only checks SAM's use).
        student: for MESA, the module whose weights the teacher averages (the one given
            to ``MESALoss``); default: the ``LightningModule`` itself.
    """

    def __init__(self, loss: SAFLoss | MESALoss | None = None, student: nn.Module | None = None):
        if loss is not None and not isinstance(loss, (SAFLoss, MESALoss)):
            raise ValueError(f"SAFCallback takes a SAFLoss or a MESALoss, got {type(loss)}")
        self.loss, self.student = loss, student
        self._step_at_start = 0
        self._sam_version: int | None = None

    @property
    def method(self) -> str | None:
        """``"saf"``, ``"mesa"`` or None (SAM alone)."""
        return None if self.loss is None else _method(self.loss)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse SAM's silent failures; move MESA's teacher to the module's device."""
        sams = [o for o in trainer.optimizers if isinstance(o, SAM)]
        if sams:
            _check_sam(trainer, pl_module, self.method)
        if self.method == "mesa":
            self.loss.ema.module.to(pl_module.device)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_at_start = trainer.global_step
        self._sam_version = _sam_version(trainer, pl_module)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """After a real optimizer step (``global_step`` moved): update MESA's teacher."""
        stepped = trainer.global_step > self._step_at_start
        if not stepped and self._sam_version not in (None, _sam_version(trainer, pl_module)):
            raise ValueError(
                "SAM moved the weights but trainer.global_step did not advance (no checkpoint "
                "would be saved): in manual optimization call self.optimizers().step(closure)"
            )
        if stepped and self.method == "mesa":
            self.loss.update(pl_module if self.student is None else self.student)

    def state_dict(self) -> dict[str, Any]:
        """The SAF store or the MESA teacher, saved in the Lightning checkpoint."""
        if self.loss is None:
            return {}
        return {"method": self.method, "state": self.loss.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the store or the teacher from :meth:`state_dict`."""
        if self.loss is None:
            return
        if state_dict.get("method") != self.method:
            raise ValueError(
                f"the checkpoint holds {state_dict.get('method')!r} state, this run uses "
                f"{self.method!r}: resume with the same method"
            )
        self.loss.load_state_dict(state_dict["state"])

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Refuse a checkpoint without this callback's state (the loss would silently be 0)."""
        if self.loss is not None and self.state_key not in checkpoint.get("callbacks", {}):
            raise ValueError(
                f"the checkpoint has no {self.method} state (saved without SAFCallback?): "
                "resume from a checkpoint of a run with the callback, or start afresh"
            )


class SharpnessCallback(pl.Callback):
    """:class:`analysis.SharpnessMonitor` in a Lightning run: every ``every`` optimizer steps
    (``trainer.global_step``), the sharpness on ``probe`` beside the optimizer's threshold,
    into ``csv``; the run is bitwise what it is without it.

    Args:
        loss_fn: ``loss_fn(output, targets)`` of the measured network.
        probe: fixed ``(inputs, targets)`` batches.
        every: measure every ``every`` optimizer steps.
        module: the attribute of the ``LightningModule`` holding the network (``"net"``);
            None: the module itself (it must define ``forward``).
        **monitor_kwargs: ``measures``, ``k``, ``csv``, ``curvature``, ... of the monitor.
    """

    def __init__(
        self, loss_fn, probe, every: int = 50, module: str | None = None, **monitor_kwargs
    ):
        self.loss_fn, self.probe, self.every, self.module = loss_fn, probe, every, module
        self.kwargs, self.monitor, self._last = monitor_kwargs, None, -1

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = pl_module if self.module is None else getattr(pl_module, self.module)
        opt = trainer.optimizers[0] if trainer.optimizers else None
        self.monitor = SharpnessMonitor(
            net, self.loss_fn, self.probe, self.every, optimizer=opt, **self.kwargs
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step != self._last:  # after a real optimizer step, not an accumulation micro-batch
            self._last = step
            self.monitor.step(step, trainer.current_epoch)


def _method(loss: SAFLoss | MESALoss) -> str:
    return "saf" if isinstance(loss, SAFLoss) else "mesa"


def _check_sam(trainer: pl.Trainer, pl_module: pl.LightningModule, method: str | None) -> None:
    if pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1:
        raise ValueError(
            f"SAM with accumulate_grad_batches={trainer.accumulate_grad_batches} would take "
            "epsilon from one micro-batch and the step from another: use 1 (a larger batch)"
        )
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        raise ValueError(
            "SAM under Lightning cannot step through a GradScaler: use precision='bf16-mixed' "
            "or '32-true'"
        )
    if method == "saf":
        raise ValueError(
            "SAF with SAM: the closure's second pass would overwrite SAF's stored logits with "
            "perturbed ones; use one method"
        )


def _sam_version(trainer: pl.Trainer, pl_module: pl.LightningModule) -> int | None:
    """In manual optimization, a version counter that moves when a SAM moves its weights."""
    if pl_module.automatic_optimization:
        return None
    params = [p for o in trainer.optimizers if isinstance(o, SAM) for p in _first_params(o)]
    return sum(p._version for p in params) if params else None


def _first_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [g["params"][0] for g in opt.param_groups if g["params"]]
