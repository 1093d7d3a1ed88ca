"""A model's selected parameters as one flat vector, evaluated with ``functional_call``.

Nothing here writes to the model: every loss is computed with
:func:`torch.func.functional_call` on copies of the parameters and buffers, so
the model's weights stay bitwise unchanged and no model is ever deep-copied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from analysis.batches import Call, model_mode, split, to
from analysis.fold import fold_batchnorm

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ParamSpec = None | Iterable[str] | Iterable[torch.Tensor] | Callable[[str, torch.Tensor], bool]

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def params_without_norm_and_bias(model: nn.Module) -> list[str]:
    """Names of the trainable parameters that are neither biases nor normalization weights.

    Pass the result as ``params=`` to restrict a measure to the "weights" only.

    >>> m = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 1))
    >>> params_without_norm_and_bias(m)
    ['0.weight', '2.weight']
    """
    norm = {
        f"{mn}.{pn}".lstrip(".")
        for mn, mod in model.named_modules()
        if isinstance(mod, _NORM_TYPES)
        for pn, _ in mod.named_parameters(recurse=False)
    }
    return [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and n not in norm and not n.endswith("bias")
    ]


def select_params(model: nn.Module, params: ParamSpec = None) -> list[str]:
    """Resolve ``params`` (None, names, tensors or a predicate) to parameter names.

    Raises:
        ValueError: an unknown name, a tensor that is not a parameter of the
            model, or an empty selection.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        names = [n for n, _ in named]
    elif callable(params):
        names = [n for n, p in named if params(n, p)]
    else:
        items = list(params)
        by_id = {id(p): n for n, p in named}
        known = {n for n, _ in named}
        names = []
        for it in items:
            name = it if isinstance(it, str) else by_id.get(id(it))
            if name not in known:
                raise ValueError(
                    f"params: {it if isinstance(it, str) else 'a tensor'} is not a trainable "
                    "parameter of the model; pass names from model.named_parameters()"
                )
            names.append(name)
    if not names:
        raise ValueError("params selects no trainable parameter; select at least one")
    return names


class ParamSpace:
    """The selected parameters of ``model`` as a flat vector; the rest held fixed.

    Args:
        model: any module; it is only read, never written.
        params: which parameters vary (see :func:`select_params`).
        dtype: floating dtype for parameters, buffers and inputs (None: keep).
        device: where to compute (None: the model's device).
        call: how the model is called (:class:`analysis.batches.Call`; the convention).
        fold: call an eval-mode copy of the graph with each conv→BatchNorm pair folded
            (:func:`analysis.fold.fold_batchnorm`; the same function of the same tensors,
            so exact up to float rounding). Only for eval-mode evaluation, and not with a
            ``forward_fn`` hook (that model runs as it is). ``folded`` counts the pairs.
    """

    def __init__(
        self,
        model: nn.Module,
        params: ParamSpec = None,
        dtype=None,
        device=None,
        call: Call | None = None,
        fold: bool = False,
    ):
        self.model, self.call = model, call or Call()
        self.net, self.folded = model, 0
        if fold and self.call.forward_fn is None:
            with model_mode(model, "eval"):  # trace the eval-mode branches of forward
                self.net, self.folded = fold_batchnorm(model)
        self.names = select_params(model, params)
        first = next(iter(model.parameters()))
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = dtype or first.dtype
        state = dict(model.named_parameters())
        self.shapes = [state[n].shape for n in self.names]
        self.numels = [state[n].numel() for n in self.names]
        self.n = sum(self.numels)
        self.theta = torch.cat([self._cast(state[n]).reshape(-1) for n in self.names])
        chosen = set(self.names)
        fixed = {n: p for n, p in state.items() if n not in chosen}
        fixed.update(dict(model.named_buffers()))
        # clone: train-mode BatchNorm updates running stats in place, on our copies only
        self.fixed = {n: self._cast(t).clone() for n, t in fixed.items()}

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return to(t.detach(), self.device, self.dtype)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector into ``{name: tensor}`` views of the parameter shapes."""
        parts = torch.split(flat, self.numels)
        return {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}

    def output(self, flat: torch.Tensor, batch: Any) -> torch.Tensor:
        """The output tensor the loss reads, with the selected parameters set to ``flat``
        (the :mod:`analysis.batches` convention, or the space's :class:`Call` hooks)."""
        return self.call(self.net, batch, {**self.fixed, **self.unflatten(flat)})

    def loss(self, flat: torch.Tensor, loss_fn: LossFn, batch: Any) -> torch.Tensor:
        """``loss_fn(output, targets)`` at parameters ``flat`` on one batch."""
        return loss_fn(self.output(flat, batch), batch[1])

    def batch(self, batch) -> tuple[Any, Any]:
        """One ``(inputs, targets)`` batch on the device, floating tensors in the dtype."""
        inputs, targets = split(batch)
        return to(inputs, self.device, self.dtype), to(targets, self.device, self.dtype)
