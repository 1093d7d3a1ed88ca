"""Losses by name, and a check that a loss fits the data before any work is done.

Every measure takes ``loss_fn(output, targets)``, a batch mean. By name:

* ``"ce"``: cross-entropy on logits, targets class indices (or class probabilities);
* ``"nll"``: negative log-likelihood on log-probabilities, targets class indices;
* ``"mse"``: mean squared error, targets shaped like the output;
* ``"bce"``: binary cross-entropy on logits, targets in [0, 1] shaped like the output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

LOSSES: dict[str, Callable] = {
    "ce": F.cross_entropy,
    "nll": F.nll_loss,
    "mse": F.mse_loss,
    "bce": F.binary_cross_entropy_with_logits,
}


def loss_function(loss: str | Callable) -> Callable:
    """The loss for a name of :data:`LOSSES` (a callable is returned as it is).

    >>> loss_function("mse") is F.mse_loss
    True
    """
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[loss]


LOSS_MODULES = {  # the nn modules of the named losses
    torch.nn.CrossEntropyLoss: "ce",
    torch.nn.NLLLoss: "nll",
    torch.nn.MSELoss: "mse",
    torch.nn.BCEWithLogitsLoss: "bce",
}


def _name(loss_fn: Callable) -> str | None:
    """Which named loss ``loss_fn`` is (the function or its ``nn`` module), if any."""
    named = next((k for k, f in LOSSES.items() if f is loss_fn), None)
    return named or LOSS_MODULES.get(type(loss_fn))


def check_loss(loss_fn: Callable, output: torch.Tensor, targets: Any) -> None:
    """Raise a one-line ValueError when ``loss_fn`` does not fit this output and these targets.

    The named losses are checked by their rules (the module docstring): cross-entropy on a
    one-column output or on float targets that are not probabilities, MSE on targets of
    another shape, and so on. Any loss must give a finite scalar on the batch.

    >>> check_loss(F.cross_entropy, torch.zeros(4, 1), torch.zeros(4))
    Traceback (most recent call last):
    ...
    ValueError: cross-entropy needs class scores (an output of >= 2 columns), got shape (4, 1)...
    """
    name = _name(loss_fn)
    shape = tuple(output.shape)
    if name in ("ce", "nll"):
        what = "cross-entropy" if name == "ce" else "nll"
        if output.dim() < 2 or output.shape[1] < 2:
            raise ValueError(
                f"{what} needs class scores (an output of >= 2 columns), got shape {shape}; "
                "for a regressor use --loss mse"
            )
        if not isinstance(targets, torch.Tensor):
            raise ValueError(f"{what} needs tensor targets, got {type(targets).__name__}")
        if targets.is_floating_point() and (name == "nll" or targets.shape != output.shape):
            raise ValueError(
                f"{what} needs integer class labels (or, for ce, probabilities shaped like the "
                f"output), got float targets of shape {tuple(targets.shape)}; for a "
                "regressor use --loss mse"
            )
        if not targets.is_floating_point() and (
            targets.min() < 0 or targets.max() >= output.shape[1]
        ):
            raise ValueError(
                f"{what}: class labels must lie in 0..{output.shape[1] - 1} for an output of "
                f"{output.shape[1]} columns, got {int(targets.min())}..{int(targets.max())}"
            )
    if name in ("mse", "bce"):
        if not isinstance(targets, torch.Tensor) or targets.shape != output.shape:
            got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets)
            raise ValueError(
                f"{name} needs targets shaped like the output {shape}, got {got}; for class "
                "labels use --loss ce"
            )
        if name == "bce" and not (targets.is_floating_point() and 0 <= targets.min() <= 1
                                  and targets.max() <= 1):  # fmt: skip
            raise ValueError("bce needs float targets in [0, 1]")
    try:
        value = loss_fn(output, targets)
    except Exception as e:  # a loss of the caller's own, or a rule not checked above
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"the loss fails on the first batch: {first}") from None
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ValueError("the loss must return one number per batch (a mean), not a vector")
