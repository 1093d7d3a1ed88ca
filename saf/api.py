r"""SAF and MESA for your own training loop: an index wrapper and two losses.

Each loss is :math:`L_{tra}` (:func:`saf.trajectory_loss`) with its own target: SAF's comes
from the logits the same samples had :math:`\tilde E` epochs ago (:class:`SAFLoss`, no extra
forward pass), MESA's from an EMA teacher of the weights (:class:`MESALoss`, one no-grad
forward). Both are ordinary autograd scalars, so ``torch.amp`` autocast, a ``GradScaler``,
gradient clipping and gradient accumulation work as with any loss. The trainer
(:func:`saf.train`) steps with exactly these classes.

SAF in any loop::

    train_set = WithIndex(train_set)                     # items: (x, y, index)
    saf_loss = SAFLoss(len(train_set), num_classes=10)   # the paper's lambda, tau, lag, E_start
    for epoch in range(epochs):
        for x, y, idx in loader:
            logits = model(x)
            loss = F.cross_entropy(logits, y) + saf_loss(logits, idx, epoch)
            opt.zero_grad(); loss.backward(); opt.step()

Reference: Du et al., "Sharpness-Aware Training for Free", NeurIPS 2022.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from analysis import batches
from analysis.distributed import is_distributed
from saf._distributed import gather_rows
from saf.ema import EMA
from saf.paper import DEFAULT_LAG, DEFAULT_LAM, DEFAULT_START_EPOCH, DEFAULT_TAU
from saf.trajectory import OutputStore, trajectory_loss


class WithIndex(torch.utils.data.Dataset):
    """A map-style data set whose items carry their index: ``(x, y) -> (x, y, i)``, and a
    mapping (a Hugging Face example) ``{...} -> {..., "index": i}``.

    SAF stores each sample's logits under its index, so shuffling, prefetching workers
    and a ``DistributedSampler`` cannot misalign them.

    >>> ds = WithIndex([(10.0, 0), (20.0, 1)])
    >>> ds[1], len(ds)
    ((20.0, 1, 1), 2)
    >>> WithIndex([{"input_ids": [5, 6], "labels": 1}])[0]
    {'input_ids': [5, 6], 'labels': 1, 'index': 0}
    """

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple | dict:
        item = self.dataset[i]
        if isinstance(item, Mapping):
            if "index" in item:
                raise ValueError("WithIndex: the item already has an 'index' key; rename it")
            return {**item, "index": i}
        return (*item, i) if isinstance(item, tuple) else (item, i)


class SAFLoss:
    r"""SAF's trajectory loss from (logits, sample index, epoch), with its store.

    A call at epoch :math:`e` returns
    :math:`\lambda\tau^2\frac1B\sum_i \mathrm{KL}(\mathrm{softmax}(z_i^{(e-\tilde E)}/\tau)
    \,\|\,\mathrm{softmax}(z_i/\tau))` from the logits stored for the same samples
    :math:`\tilde E` epochs earlier (0 before ``start_epoch``, and for rows never written),
    then stores this batch's logits for epoch :math:`e`. Call it once per (micro-)batch;
    under ``torch.distributed`` every rank's logits are gathered, so every rank's store
    holds every sample. Logits without a graph (``torch.no_grad``, evaluation) are neither
    stored nor penalised: an evaluation pass cannot overwrite training rows.

    The store is training state: save :meth:`state_dict` with your checkpoint and restore
    it on resume. A resumed run that forgot it finds no past logits, and the loss is
    silently 0; so is a first active epoch with ``start_epoch < lag``. Either case warns
    once (``UserWarning``); ``start_epoch < lag`` also warns at construction, since the
    loss then first pulls toward the logits of epoch 0 (the paper: 5 >= 3).

    Args:
        num_samples: the data set's size (indices are ``0 .. num_samples - 1``).
        num_classes: logits per sample.
        lam, tau, lag, start_epoch: :math:`\lambda`, :math:`\tau`, :math:`\tilde E` and
            the first (0-based) epoch with the loss; the paper's defaults (0.3, 5, 3, 5).
        device: where the store lives (default: the CPU; a store on another device than
            the logits works, at one copy per call).
        dtype: the store's dtype (fp16: ``2 * lag`` bytes per sample and class).
        distributed: gather every rank's rows (None: when a process group is running).
    """

    def __init__(
        self,
        num_samples: int,
        num_classes: int,
        lam: float = DEFAULT_LAM["saf"],
        tau: float = DEFAULT_TAU,
        lag: int = DEFAULT_LAG,
        start_epoch: int = DEFAULT_START_EPOCH,
        *,
        device: Any = "cpu",
        dtype: torch.dtype = torch.float16,
        distributed: bool | None = None,
    ):
        _check(lam, tau, start_epoch)
        self.lam, self.tau, self.start_epoch = float(lam), float(tau), int(start_epoch)
        self.store = OutputStore(num_samples, num_classes, lag, dtype, device)
        if start_epoch < lag:
            warnings.warn(
                f"SAFLoss(lag={lag}, start_epoch={start_epoch}): epoch {lag} pulls toward "
                f"epoch 0's logits, those of a barely trained model; use start_epoch >= lag "
                f"(the paper: 5 >= 3)",
                stacklevel=2,
            )
        self.distributed = distributed
        self._warned, self._checked = False, None

    def active(self, epoch: int) -> bool:
        """Whether the loss is on at ``epoch`` (logits are stored from epoch 0 either way)."""
        return epoch >= self.start_epoch

    def __call__(self, logits: Tensor, idx: Tensor, epoch: int) -> Tensor:
        """The trajectory loss of this batch (a 0-d tensor); stores its logits (training
        only: logits without a graph give 0 and are not stored)."""
        loss = torch.zeros((), device=logits.device)
        if not logits.requires_grad:  # evaluation: the store holds training outputs only
            return loss
        where = self.store.logits.device
        idx = idx.to(where)
        if self.active(epoch):
            past, mask = self.store.read(idx, epoch)
            self._warn_if_empty(mask, epoch)
            past, mask = past.to(logits.device), mask.to(logits.device)
            loss = trajectory_loss(logits, past, self.tau, self.lam, mask)
        rows = logits.detach()
        if is_distributed(self.distributed):
            idx, rows = gather_rows(idx.to(rows.device), rows)
        self.store.write(idx.to(where), rows.to(where), epoch)
        return loss

    def _warn_if_empty(self, mask: Tensor, epoch: int) -> None:
        # the first batch of each epoch only: bool() waits for the device, once an epoch
        if self._warned or self._checked == epoch:
            return
        self._checked = epoch
        if bool(mask.any()):
            return
        self._warned = True
        past = epoch - self.store.lag
        why = (
            "after a resume, restore it with SAFLoss.load_state_dict(saved SAFLoss.state_dict())"
            if past >= 0
            else f"start_epoch={self.start_epoch} < lag={self.store.lag}"
        )
        warnings.warn(
            f"SAFLoss at epoch {epoch}: no logits stored at epoch {past} for this batch, so "
            f"the trajectory loss is 0 ({why})",
            stacklevel=3,
        )

    def state_dict(self) -> dict:
        """The store (plain tensors, ``weights_only``-loadable)."""
        return self.store.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore the store from :meth:`state_dict`."""
        self.store.load_state_dict(state)


class MESALoss:
    r"""MESA's trajectory loss: the target is an EMA teacher's output.

    :math:`v \leftarrow \beta v + (1-\beta)\theta` after every optimizer step
    (:meth:`update`, from epoch 0); from ``start_epoch`` on the loss is
    :math:`\lambda\tau^2\frac1B\sum_i \mathrm{KL}(\mathrm{softmax}(f_v(x_i)/\tau)\,\|\,
    \mathrm{softmax}(z_i/\tau))`. One loop step::

        target = mesa.target(x, epoch)         # before the student's forward (None if off)
        logits = model(x)
        loss = F.cross_entropy(logits, y) + mesa(logits, target)
        opt.zero_grad(); loss.backward(); opt.step()
        mesa.update(model)

    Args:
        model: the student (its current weights initialise the teacher; it is never
            modified). A (Distributed)DataParallel wrapper is unwrapped.
        decay: :math:`\beta \in [0, 1)` (see :func:`saf.scaled_ema_decay`).
        lam, tau, start_epoch: :math:`\lambda` (the paper's 0.8), :math:`\tau`, first epoch.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float,
        lam: float = DEFAULT_LAM["mesa"],
        tau: float = DEFAULT_TAU,
        start_epoch: int = DEFAULT_START_EPOCH,
    ):
        _check(lam, tau, start_epoch)
        self.lam, self.tau, self.start_epoch = float(lam), float(tau), int(start_epoch)
        self.ema = EMA(model, decay)
        self._warned = False

    def active(self, epoch: int) -> bool:
        """Whether the loss is on at ``epoch``."""
        return epoch >= self.start_epoch

    @torch.inference_mode()
    def target(self, inputs: Any, epoch: int) -> Tensor | None:
        """The teacher's output on ``inputs`` (eval mode, no graph), or None when the loss is
        off at ``epoch``. Inputs follow the :mod:`analysis.batches` convention.

        Warns once when the loss is on after epoch 0 but the teacher was never updated:
        a resumed run that did not restore :meth:`state_dict` (the teacher would be the
        student itself, and the loss 0)."""
        if not self.active(epoch):
            return None
        if epoch > 0 and self.ema.num_updates == 0 and not self._warned:
            self._warned = True
            warnings.warn(
                f"MESALoss at epoch {epoch}: the EMA teacher was never updated (after a "
                "resume, restore it with MESALoss.load_state_dict(saved MESALoss.state_dict()))",
                stacklevel=3,
            )
        return batches.forward(self.ema.module, inputs)

    def __call__(self, logits: Tensor, target: Tensor | None) -> Tensor:
        """The trajectory loss toward ``target`` (0 when ``target`` is None)."""
        if target is None:
            return torch.zeros((), device=logits.device)
        return trajectory_loss(logits, target, self.tau, self.lam)

    def update(self, model: nn.Module) -> None:
        """Move the teacher toward ``model``: call after every optimizer step."""
        self.ema.update(model)

    def state_dict(self) -> dict:
        """The teacher's weights and the decay."""
        return self.ema.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore the teacher from :meth:`state_dict`."""
        self.ema.load_state_dict(state)


def _check(lam: float, tau: float, start_epoch: int) -> None:
    if not (lam >= 0 and tau > 0 and start_epoch >= 0):
        raise ValueError(
            f"need lam >= 0, tau > 0 and start_epoch >= 0; got {lam}, {tau}, {start_epoch}"
        )
