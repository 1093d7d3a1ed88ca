r"""Exponential moving average of the weights: MESA's teacher (timm ``ModelEmaV2`` style).

After every optimizer step, for every parameter and floating-point buffer,

.. math:: v \leftarrow \beta v + (1-\beta)\,\theta

(integer buffers such as BatchNorm's ``num_batches_tracked`` are copied). The update
uses one ``torch._foreach_lerp_`` over all tensors: no per-tensor Python loop. The
student is never modified.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class EMA:
    r"""EMA copy of a model, :math:`v \leftarrow \beta v + (1-\beta)\theta` after each step.

    Args:
        model: the model being trained (its current weights initialise the average).
        decay: :math:`\beta \in [0, 1)`.

    The teacher (:attr:`module`) is kept in eval mode and never needs gradients; call the
    EMA itself for the teacher's output (``ema(x)``, no autograd graph).

    >>> m = nn.Linear(1, 1, bias=False)
    >>> _ = m.weight.data.fill_(1.0)
    >>> ema = EMA(m, decay=0.75)
    >>> _ = m.weight.data.fill_(3.0)
    >>> ema.update(m)
    >>> float(ema.module.weight)  # 0.75 * 1 + 0.25 * 3
    1.5
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(_unwrap(model)).eval().requires_grad_(False)
        self._pairs(model)  # check the structures match
        self._cache: tuple | None = None
        self.num_updates = 0

    def _pairs(self, model: nn.Module):
        model = _unwrap(model)
        ema_sd, sd = self.module.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
        if ema_sd.keys() != sd.keys():
            raise ValueError("EMA.update got a model with a different structure")
        floats = [(ema_sd[k], sd[k]) for k in sd if sd[k].is_floating_point()]
        ints = [(ema_sd[k], sd[k]) for k in sd if not sd[k].is_floating_point()]
        return floats, ints

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of :math:`v \\leftarrow \\beta v + (1-\\beta)\\theta`.

        ``model`` may be wrapped in ``DistributedDataParallel`` or ``DataParallel`` (the
        trainer steps the wrapper): the wrapped module's tensors are averaged."""
        model = _unwrap(model)
        # .to() replaces buffers (not parameters): list the pairs again when one was replaced
        buffers = [*self.module.buffers(), *model.buffers()]
        cache = self._cache
        if cache is None or cache[0] is not model or not _same(cache[4], buffers):
            floats, ints = self._pairs(model)  # listed once per student and device
            ema_t, model_t = [e for e, _ in floats], [m for _, m in floats]
            self._cache = (model, ema_t, model_t, ints, buffers)
        _, ema_t, model_t, ints, _ = self._cache
        if ema_t:
            torch._foreach_lerp_(ema_t, model_t, 1.0 - self.decay)
        for e, m in ints:
            e.copy_(m)
        self.num_updates += 1

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        """The teacher's output (eval mode)."""
        return self.module(x)

    def state_dict(self) -> dict:
        """The teacher's state dict (tensors only), the decay and the number of updates."""
        return {
            "module": self.module.state_dict(),
            "decay": self.decay,
            "updates": self.num_updates,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` (copies in place)."""
        self.module.load_state_dict(state["module"])
        self.decay = float(state["decay"])
        self.num_updates = int(state.get("updates", 1))  # older states: updated, count unknown


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a (Distributed)DataParallel wrapper, else ``model``."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    return model.module if isinstance(model, wrappers) else model


def scaled_ema_decay(steps_per_epoch: int, epochs: int) -> float:
    r"""MESA's EMA decay for a run of ``epochs`` epochs of ``steps_per_epoch`` steps.

    The paper uses timm's :math:`\beta = 0.9998` on CIFAR (200 epochs x 391 steps) and
    ImageNet. Its averaging horizon :math:`1/(1-\beta) = 5000` steps is 6.4% of the CIFAR
    run; we keep that fraction of the run on any schedule, capped at the paper's value:

    .. math:: \beta = \min\Big(0.9998,\; 1 - \frac{1}{\max(1,\ 0.064\,E\cdot
              \text{steps/epoch})}\Big)

    So the paper's settings give the paper's 0.9998 (CIFAR and ImageNet), and a 40-epoch
    run of 12 steps per epoch averages over its last ~31 steps. A run of at most 15 steps
    gets :math:`\beta = 0`: the teacher then equals the student and MESA's loss is 0, so
    pass an explicit decay for such smoke runs.

    >>> scaled_ema_decay(391, 200), scaled_ema_decay(5005, 90), round(scaled_ema_decay(12, 40), 4)
    (0.9998, 0.9998, 0.9674)
    """
    if steps_per_epoch < 1 or epochs < 1:
        raise ValueError(
            f"steps_per_epoch and epochs must be >= 1, got {steps_per_epoch}, {epochs}"
        )
    return min(0.9998, 1.0 - 1.0 / max(1.0, 0.064 * epochs * steps_per_epoch))
