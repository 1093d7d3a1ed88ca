r"""SAF, MESA and SAM in the Hugging Face ``Trainer``: :class:`SAFTrainer`, no hand-written
``compute_loss``.

* **SAF / MESA** (``trajectory=saf.SAFLoss(...)`` or ``saf.MESALoss(model, decay)``): the
  term is added to the model's own loss on training batches only (evaluation and
  prediction never read or write the store); each example's ``"index"`` (from
  :class:`saf.WithIndex`) is kept by the Trainer's column filter and taken out before the
  model's forward, so ``remove_unused_columns`` can stay on. The store or the teacher is
  saved as ``saf_state.pt`` in every ``checkpoint-N/`` (atomically, ``weights_only``
  loadable) and restored by ``train(resume_from_checkpoint=...)``; a checkpoint without
  it is refused. MESA's teacher moves after every optimizer step, not per accumulation
  micro-batch. With gradient accumulation the term is scaled as the Trainer scales the
  model's loss, so each micro-batch weighs the same. Training logs carry the term's mean
  as ``trajectory_loss``. (transformers 5 takes a model whose ``forward`` has ``**kwargs``
  to normalise its loss by ``num_items_in_batch``; BERT's and GPT-2's classifiers do not,
  so under accumulation their loss, not the term, weighs ``gradient_accumulation_steps``
  times too much: set ``model.accepts_loss_kwargs = False``.)
* **SAM** (``rho=0.05``; ASAM with ``adaptive=True, eta=0.01, rho=0.5``): the Trainer's
  own optimizer (``optim``, learning rate, weight decay groups, scheduler) becomes the
  base of a :class:`saf.SAM`; each step is two forward-backward passes (the second at
  :math:`w+\hat\epsilon`), then the Trainer's clipping and step. Gradient accumulation
  (the second pass would need every micro-batch again) and ``fp16`` (a skipped step would
  leave the weights at :math:`w+\hat\epsilon`) are refused; use ``bf16``.

Example::

    trainer = SAFTrainer(
        model, args, train_dataset=saf.WithIndex(train_set), eval_dataset=val_set,
        trajectory=saf.SAFLoss(len(train_set), num_classes=model.config.num_labels),
    )
    trainer.train()
"""

from __future__ import annotations

import os
from typing import Any

import torch
import transformers
from torch import Tensor, nn

from analysis.io import atomic_torch_save, safe_torch_load
from analysis.monitor import SharpnessMonitor
from saf.api import MESALoss, SAFLoss
from saf.sam import SAM

STATE_FILE = "saf_state.pt"


class SAFTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains with SAF, MESA or SAM.

    Args:
        *args: the ``Trainer``'s arguments (model, ``TrainingArguments``, data, ...).
        trajectory: a :class:`saf.SAFLoss` (the train set wrapped in :class:`saf.WithIndex`)
            or a :class:`saf.MESALoss` built on the model; its term is added to the
            model's loss. The model must return ``(batch, classes)`` logits.
        rho, adaptive, eta: SAM or ASAM (:class:`saf.SAM`) around the Trainer's optimizer;
            None: no SAM.
        **kwargs: the ``Trainer``'s keyword arguments.
    """

    def __init__(
        self,
        *args: Any,
        trajectory: SAFLoss | MESALoss | None = None,
        rho: float | None = None,
        adaptive: bool = False,
        eta: float = 0.0,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        if trajectory is not None and not isinstance(trajectory, (SAFLoss, MESALoss)):
            raise ValueError(f"trajectory= takes a saf.SAFLoss or saf.MESALoss, not {trajectory}")
        if rho is not None:
            _check_sam(self, trajectory)
        self.trajectory, self.sam = trajectory, None
        self._term_sum, self._term_count = None, 0  # for the logs, without a device sync
        self._sam_kwargs = dict(rho=rho, adaptive=adaptive, eta=eta)
        if isinstance(trajectory, MESALoss):
            trajectory.ema.module.to(self.args.device)
            self.add_callback(_UpdateTeacher(trajectory))

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if "index" not in self._signature_columns:  # keep WithIndex's column for SAF
            self._signature_columns.append("index")

    def compute_loss(
        self, model: nn.Module, inputs: dict, return_outputs: bool = False, **kwargs: Any
    ) -> Tensor | tuple[Tensor, Any]:
        """The model's loss, plus the trajectory term on training batches."""
        inputs = dict(inputs)
        idx = inputs.pop("index", None)
        training = self.trajectory is not None and model.training and torch.is_grad_enabled()
        target = None
        if training and isinstance(self.trajectory, MESALoss):  # before the student's forward
            features = {k: v for k, v in inputs.items() if k not in self.label_names}
            target = self.trajectory.target(features, self._epoch())
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        if training:
            term = self._term(outputs["logits"], idx, target)
            total = self._term_sum if self._term_sum is not None else 0
            self._term_sum, self._term_count = total + term.detach(), self._term_count + 1
            loss = loss + term / self._accumulation_divisor(kwargs.get("num_items_in_batch"))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args: Any, **kwargs: Any) -> None:
        """The Trainer's log; a training log gets ``trajectory_loss``, the term's mean since
        the last one (a term stuck at 0 is visible)."""
        if self._term_count and "loss" in logs:
            mean = float(self._term_sum) / self._term_count
            logs = {**logs, "trajectory_loss": round(mean, 6)}
            self._term_sum, self._term_count = None, 0
        super().log(logs, *args, **kwargs)

    def prediction_step(self, model: nn.Module, inputs: dict, *args: Any, **kwargs: Any):
        """The Trainer's, without the ``"index"`` column (no store is read or written)."""
        inputs = {k: v for k, v in inputs.items() if k != "index"}
        return super().prediction_step(model, inputs, *args, **kwargs)

    def training_step(self, model: nn.Module, inputs: dict, *args: Any, **kwargs: Any) -> Tensor:
        """One step's passes; with SAM a second forward-backward at :math:`w+\\hat\\epsilon`
        (the Trainer then clips and calls ``optimizer.step()``: back to :math:`w`, base step).
        Returns the loss at :math:`w`."""
        loss = super().training_step(model, inputs, *args, **kwargs)
        if self.sam is not None:
            self.sam.first_step(zero_grad=True)  # the Trainer's optimizer.step() ends the step
            super().training_step(model, inputs, *args, **kwargs)
        return loss

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """The Trainer's optimizer, wrapped in :class:`saf.SAM` when ``rho`` is set."""
        base = super().create_optimizer(*args, **kwargs)
        if self._sam_kwargs["rho"] is None or isinstance(base, SAM):
            return base
        cls_kwargs = getattr(self, "optimizer_cls_and_kwargs", None)
        cls, opt_kwargs = cls_kwargs or self.get_optimizer_cls_and_kwargs(self.args, self.model)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise ValueError(f"SAM needs a torch.optim.Optimizer class as its base, not {cls}")
        opt_kwargs = {k: v for k, v in opt_kwargs.items() if k != "params"}
        groups = base.param_groups
        self.sam = SAM(groups, cls, **self._sam_kwargs, model=self.model, **opt_kwargs)
        self.optimizer = self.sam
        return self.sam

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.trajectory is not None and self.args.should_save:
            state = {"method": _method(self.trajectory), "state": self.trajectory.state_dict()}
            atomic_torch_save(state, os.path.join(output_dir, STATE_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.trajectory is None:
            return
        path, method = os.path.join(checkpoint, STATE_FILE), _method(self.trajectory)
        if not os.path.isfile(path):
            raise ValueError(
                f"{checkpoint} has no {STATE_FILE} (saved without SAFTrainer's {method}?): "
                "resume from a checkpoint of a SAFTrainer run with it, or start afresh"
            )
        state = safe_torch_load(path)
        if state.get("method") != method:
            raise ValueError(
                f"{path} holds {state.get('method')!r} state, this run uses {method!r}"
            )
        self.trajectory.load_state_dict(state["state"])

    def _epoch(self) -> int:
        return int(self.state.epoch or 0)  # epoch + (step + 1) / steps: exact at the boundaries

    def _term(self, logits: Tensor, idx: Tensor | None, target: Tensor | None) -> Tensor:
        if logits.dim() != 2:
            raise ValueError(
                f"SAF and MESA need (batch, classes) logits, got shape {tuple(logits.shape)}: "
                "use a sequence-classification head"
            )
        if isinstance(self.trajectory, MESALoss):
            return self.trajectory(logits, target)
        if idx is None:
            raise ValueError("SAF needs each example's index: train_dataset=saf.WithIndex(...)")
        return self.trajectory(logits, idx, self._epoch())

    def _accumulation_divisor(self, num_items_in_batch: Any) -> int:
        """What the Trainer does not divide by itself: a loss it already scaled for
        accumulation (normalised by ``num_items_in_batch``) gets the term divided here."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            accepts = getattr(self, "model_accepts_loss_kwargs", False)
            scaled = (accepts and num_items_in_batch is not None) or (
                getattr(self, "compute_loss_func", None) is not None
            )
        steps = getattr(self, "current_gradient_accumulation_steps", None)
        return (steps or self.args.gradient_accumulation_steps) if scaled else 1


class SharpnessCallback(transformers.TrainerCallback):
    """:class:`analysis.SharpnessMonitor` in a Hugging Face ``Trainer`` (any, not only
    :class:`SAFTrainer`): every ``every`` optimizer steps (``state.global_step``), the
    sharpness on ``probe`` beside the optimizer's threshold, into ``csv``; the run is bitwise
    what it is without it. ``trainer.add_callback(SharpnessCallback(F.cross_entropy, probe))``.

    Args:
        loss_fn: ``loss_fn(logits, labels)``; the model's output is read by its ``logits``.
        probe: fixed ``(inputs, labels)`` batches, inputs a mapping (``{"input_ids": ...}``).
        every: measure every ``every`` optimizer steps.
        **monitor_kwargs: ``measures``, ``k``, ``csv``, ``curvature``, ... of the monitor.
    """

    def __init__(self, loss_fn, probe, every: int = 50, **monitor_kwargs):
        self.loss_fn, self.probe, self.every = loss_fn, probe, every
        self.kwargs, self.monitor = monitor_kwargs, None

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.monitor is None:
            self.monitor = SharpnessMonitor(
                model,
                self.loss_fn,
                self.probe,
                self.every,
                **self.kwargs,
                optimizer=getattr(optimizer, "optimizer", optimizer),  # accelerate wraps it
            )
        self.monitor.step(state.global_step, int(state.epoch or 0))


class _UpdateTeacher(transformers.TrainerCallback):
    """MESA's EMA update after every optimizer step (not per accumulation micro-batch)."""

    def __init__(self, mesa: MESALoss):
        self.mesa = mesa

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.mesa.update(model)


def _method(loss: SAFLoss | MESALoss) -> str:
    return "saf" if isinstance(loss, SAFLoss) else "mesa"


def _check_sam(trainer: transformers.Trainer, trajectory: Any) -> None:
    args = trainer.args
    if trajectory is not None:
        raise ValueError("SAFTrainer takes trajectory= or rho= (SAM), not both: use one method")
    if args.gradient_accumulation_steps > 1:
        raise ValueError(
            f"SAM with gradient_accumulation_steps={args.gradient_accumulation_steps} would "
            "perturb with one micro-batch's gradient: use 1 (a larger batch)"
        )
    if args.fp16:
        raise ValueError("SAM cannot step through fp16's GradScaler here: use bf16=True or fp32")
    if trainer.optimizer is not None:
        raise ValueError("SAFTrainer builds SAM from the Trainer's optimizer: drop optimizers=")
