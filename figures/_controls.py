r"""Controls that separate "flatter because the loss stays higher" from what SAF adds.

A run that ends at a higher training cross-entropy looks flatter at the same CE: the CE
Hessian shrinks as the softmax saturates. Two controls reach SAF's final CE without SAF:

* **temperature matching** (no retraining): the final layer of a trained SGD or SAM model
  divided by :math:`T`, so the logits become :math:`z/T` (Guo et al. 2017, "On Calibration
  of Modern Neural Networks"), with :math:`T` fitted so the training CE equals the target
  method's (:func:`fit_temperature`);
* **label smoothing** (a real SGD run): the smoothing whose CE floor equals the target
  method's final CE (:func:`smoothing_for_ce`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import numpy as np
import torch
from scipy.optimize import brentq
from torch import nn
from torch.nn import functional as F

from analysis import model_mode
from analysis.batches import forward, split

LOG_T_MAX = math.log(1e6)


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear`` (in module order): its output layer in the models here.

    Raises:
        ValueError: the model has no ``nn.Linear``.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear final layer to rescale; temperature "
            "matching needs one"
        )
    return layers[-1]


def _logits(model: nn.Module, data: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    """All outputs (float64, eval mode, no graph) and targets of ``data``, concatenated."""
    with torch.no_grad(), model_mode(model, "eval"):
        parts = [(forward(model, split(b)[0]).double(), split(b)[1]) for b in data]
    return torch.cat([z for z, _ in parts]), torch.cat([t for _, t in parts])


def mean_ce(model: nn.Module, data: Iterable, temperature: float = 1.0) -> float:
    r"""Mean cross-entropy :math:`\frac1N\sum_i -\log\mathrm{softmax}(z_i/T)_{y_i}` over
    ``data`` in eval mode, in float64."""
    z, y = _logits(model, data)
    return float(F.cross_entropy(z / temperature, y))


def fit_temperature(model: nn.Module, data: Iterable, target: float) -> float:
    r"""The :math:`T > 0` with :math:`\mathrm{CE}(z/T) = ` ``target`` on ``data``.

    :math:`\mathrm{CE}(z/T)` is convex in :math:`1/T` (a convex function of logits linear in
    :math:`1/T`) and tends to :math:`\log K` as :math:`T\to\infty`, so a target between the
    model's CE and :math:`\log K` has one root with :math:`T > 1`; a target below it is
    sought with :math:`T < 1` (the crossing nearest :math:`T = 1`: with misclassified samples
    the CE rises again as :math:`T \to 0`). Steps of 0.25 in :math:`\log T` bracket the root,
    then Brent's method on :math:`\log T` (``scipy.optimize.brentq``).

    Raises:
        ValueError: no :math:`T \in [10^{-6}, 10^6]` reaches ``target``.
    """
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"target cross-entropy must be a finite number > 0, got {target}")
    logits, y = _logits(model, data)
    f = lambda log_t: float(F.cross_entropy(logits / math.exp(log_t), y)) - target  # noqa: E731
    if f(0.0) == 0:
        return 1.0
    step = 0.25 if f(0.0) < 0 else -0.25  # raise T to raise the CE, lower it to lower the CE
    for a in np.arange(0.0, math.copysign(LOG_T_MAX, step), step):  # the root nearest T = 1
        if f(a) * f(a + step) <= 0:
            return math.exp(brentq(f, min(a, a + step), max(a, a + step), xtol=1e-12))
    raise ValueError(
        f"no temperature in [1e-6, 1e6] gives cross-entropy {target:.4g} (the model's is "
        f"{f(0.0) + target:.4g}; no temperature gives more than log K)"
    )


def with_temperature(model: nn.Module, temperature: float) -> nn.Module:
    """A copy of ``model`` whose last ``nn.Linear`` has weight and bias divided by ``T``.

    When that layer is the output (as in the models here), the logits are :math:`z/T`.
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    out = copy.deepcopy(model)
    layer = last_linear(out)
    with torch.no_grad():
        layer.weight.div_(temperature)
        if layer.bias is not None:
            layer.bias.div_(temperature)
    return out


def temperature_matched(model: nn.Module, data: Iterable, target: float):
    """``(model with T, T)``: :func:`with_temperature` at :func:`fit_temperature`'s T.

    Raises:
        ValueError: the last ``nn.Linear`` is not the output layer (the rescaled model's CE
            misses ``target`` by more than 1e-4).
    """
    data = list(data)
    t = fit_temperature(model, data, target)
    scaled = with_temperature(model, t)
    got = mean_ce(scaled, data)
    if abs(got - target) > 1e-4:
        raise ValueError(
            f"rescaling the last nn.Linear by 1/{t:.4g} gives CE {got:.6g}, not {target:.6g}: "
            "that layer is not the model's output layer"
        )
    return scaled, t


def smoothing_for_ce(ce: float, num_classes: int) -> float:
    r"""The label smoothing :math:`s` whose CE floor is ``ce``.

    A model that fits the smoothed targets exactly predicts :math:`1 - s + s/K` for the true
    class, so its (plain) cross-entropy is :math:`-\log(1 - s(K-1)/K)`; solved for :math:`s`,

    .. math:: s = \frac{K}{K-1}\,(1 - e^{-\mathrm{ce}}).

    A finite run ends above that floor, so its final CE is reported beside it.

    >>> round(smoothing_for_ce(-math.log(0.91), 10), 12)  # K=10: p_true = 1 - 0.9 s = 0.91
    0.1
    """
    if num_classes < 2 or not (math.isfinite(ce) and ce >= 0):
        raise ValueError(f"need ce >= 0 and num_classes >= 2, got {ce} and {num_classes}")
    s = num_classes / (num_classes - 1) * (1 - math.exp(-ce))
    if s >= 1:
        raise ValueError(f"cross-entropy {ce:.4g} is at or above chance for {num_classes} classes")
    return s
