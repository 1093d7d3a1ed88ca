"""Losses by name, and a check that a loss fits the data before any work is done.

Every measure takes ``loss_fn(output, targets)``, a batch mean. By name:

* ``"ce"``: cross-entropy on logits, targets class indices (or class probabilities);
* ``"nll"``: negative log-likelihood on log-probabilities, targets class indices;
* ``"mse"``: mean squared error, targets shaped like the output;
* ``"bce"``: binary cross-entropy on logits, targets in [0, 1] shaped like the output;
* ``"lm"``: next-token cross-entropy of a language model, ``(batch, seq, vocab)`` logits
  against ``(batch, seq)`` token ids, position :math:`t` scored on token :math:`t+1` (pass
  ``input_ids`` as the targets), labels ``-100`` ignored (:class:`TokenCrossEntropy`);
* ``"token_ce"``: the same without the shift: one label per position (masked language
  models, token classification).

Cross-entropy (``ce``, ``nll``) ignores the label ``-100``, as PyTorch does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""The label that cross-entropy skips (PyTorch's and Hugging Face's padding label)."""


class TokenCrossEntropy:
    r"""Cross-entropy per token: the mean over the :math:`n` labels that are not ``ignore_index``,

    .. math:: \ell = -\frac1n \sum_{b,t:\ y_{b,t+s} \ne \text{ignore}}
        \log \operatorname{softmax}(z_{b,t})_{y_{b,t+s}},

    with :math:`s = 1` (``shift=True``: position :math:`t` predicts the next token, as
    Hugging Face's causal LMs do when given labels) or :math:`s = 0`. Batches are weighted
    by :meth:`count_terms` (:func:`analysis.batches.batch_size`), so the mean over several
    batches is the mean over all their tokens.

    Args:
        shift: score logits ``[:, :-1]`` against labels ``[:, 1:]``.
        ignore_index: the label left out of the mean (and of the count).

    >>> lm = TokenCrossEntropy()
    >>> lm(torch.zeros(1, 3, 4), torch.tensor([[0, 1, -100]])), lm.count_terms(torch.ones(2, 3))
    (tensor(1.3863), 4)
    """

    def __init__(self, shift: bool = True, ignore_index: int = IGNORE_INDEX):
        self.shift, self.ignore_index = shift, ignore_index

    def __repr__(self) -> str:
        return f"TokenCrossEntropy(shift={self.shift}, ignore_index={self.ignore_index})"

    def pairs(self, output: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(logits, labels)`` flattened to ``(n, vocab)`` and ``(n,)``, shifted if asked."""
        if self.shift:
            output, targets = output[:, :-1], targets[:, 1:]
        return output.reshape(-1, output.shape[-1]), targets.reshape(-1)

    def count_terms(self, targets: torch.Tensor) -> int:
        """The labels the mean runs over: those that are not ``ignore_index``."""
        labels = targets[:, 1:] if self.shift else targets
        return int((labels != self.ignore_index).sum())

    def accuracy(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Share of counted tokens whose label is the argmax of its logits (0 when none)."""
        z, y = self.pairs(output.detach(), targets)
        keep = y != self.ignore_index
        hits = (z[keep].argmax(-1) == y[keep]).sum().to(torch.float64)
        return hits / max(int(keep.sum()), 1)

    def __call__(
        self, output: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        """The mean (``reduction="none"``: each counted token's loss, a vector)."""
        z, y = self.pairs(output, targets)
        if reduction == "none":
            keep = y != self.ignore_index
            return F.cross_entropy(z[keep], y[keep], reduction="none")
        total = F.cross_entropy(z, y, ignore_index=self.ignore_index, reduction="sum")
        return total / max(self.count_terms(targets), 1)  # no token: 0, not NaN


LOSSES: dict[str, Callable] = {
    "ce": F.cross_entropy,
    "nll": F.nll_loss,
    "mse": F.mse_loss,
    "bce": F.binary_cross_entropy_with_logits,
    "lm": TokenCrossEntropy(shift=True),
    "token_ce": TokenCrossEntropy(shift=False),
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
    if isinstance(loss_fn, TokenCrossEntropy):
        return "lm" if loss_fn.shift else "token_ce"
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
    if name in ("lm", "token_ce"):
        _check_tokens(loss_fn, output, targets)
    if name in ("ce", "nll"):
        what = "cross-entropy" if name == "ce" else "nll"
        _check_not_tokens(what, output, targets)
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
        if not targets.is_floating_point():
            _check_labels(what, targets, output.shape[1], "an output of {} columns")
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
    _check_value(loss_fn, output, targets)


def _check_labels(
    what: str, targets: torch.Tensor, n: int, of: str, ignore: int = IGNORE_INDEX
) -> None:
    """Labels in ``0..n-1`` but for the ignored ones, else a one-line ValueError."""
    labels = targets[targets != ignore]
    if labels.numel() and (labels.min() < 0 or labels.max() >= n):
        raise ValueError(
            f"{what}: labels must lie in 0..{n - 1} (or be {ignore}: ignored) for "
            f"{of.format(n)}, got {int(labels.min())}..{int(labels.max())}"
        )


def _check_not_tokens(what: str, output: torch.Tensor, targets: Any) -> None:
    """Refuse a language model's ``(batch, seq, vocab)`` logits with ``(batch, seq)`` token
    labels, which cross-entropy would read as ``seq`` classes."""
    if (
        isinstance(targets, torch.Tensor)
        and output.dim() == 3
        and not targets.is_floating_point()
        and tuple(targets.shape) == tuple(output.shape[:2])
        and output.shape[1] != output.shape[2]
    ):
        raise ValueError(
            f"{what} got per-token logits {tuple(output.shape)} (batch, seq, vocab) and token "
            f"labels {tuple(targets.shape)}; use --loss lm (next token: labels shifted) or "
            "--loss token_ce (one label per position)"
        )


def _check_tokens(loss_fn: Any, output: torch.Tensor, targets: Any) -> None:
    """The rules of the token losses: ``(batch, seq, vocab)`` logits, ``(batch, seq)``
    integer labels."""
    name = _name(loss_fn)
    if output.dim() != 3:
        raise ValueError(
            f"{name} needs (batch, seq, vocab) logits, got shape {tuple(output.shape)}; for "
            "one label per sample use --loss ce"
        )
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point():
        raise ValueError(f"{name} needs integer token labels (batch, seq), e.g. the input_ids")
    if tuple(targets.shape) != tuple(output.shape[:2]):
        raise ValueError(
            f"{name} needs token labels shaped (batch, seq) = {tuple(output.shape[:2])}, got "
            f"{tuple(targets.shape)}"
        )
    if loss_fn.shift and output.shape[1] < 2:
        raise ValueError("lm predicts the next token: sequences need >= 2 tokens")
    _check_labels(name, targets, output.shape[2], "a vocabulary of {}", loss_fn.ignore_index)


def _check_value(loss_fn: Callable, output: torch.Tensor, targets: Any) -> None:
    """The loss gives one number on the batch, else a one-line ValueError."""
    try:
        value = loss_fn(output, targets)
    except Exception as e:  # a loss of the caller's own, or a rule not checked above
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"the loss fails on the first batch: {first}") from None
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ValueError("the loss must return one number per batch (a mean), not a vector")
