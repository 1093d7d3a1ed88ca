r"""The one batch convention of the toolkit, and the one size-weighted loop over batches.

Every measure, surface and loop (Hessian products, Lanczos, trace, density, m-sharpness,
surfaces, interpolation, PCA, ``analyze_run``, the trainer's evaluation) reads data the
same way:

* **A batch** is ``(inputs, targets)``; its size is counted from the targets: their
  rows, or the terms the loss averages over when it says (``loss_fn.count_terms``: the
  tokens of :class:`analysis.losses.TokenCrossEntropy` that are not ignored).
* **Inputs** call the model by their type: a Tensor calls ``model(x)``, a tuple or list
  ``model(*x)``, a mapping ``model(**x)`` (a Hugging-Face-style batch of named tensors).
* **Outputs** are used by their type: a Tensor as it is, a tuple or list by its first
  element, a mapping (a Hugging Face ``ModelOutput`` is one) by its ``"logits"``.
* **Anything else** is two hooks away (:class:`Call`): ``forward_fn(model, batch) ->
  output`` replaces the call, ``output_fn(output) -> tensor`` the choice of the tensor.
* **The data-set loss** is the size-weighted mean of the batch losses,

  .. math:: L = \frac{1}{N}\sum_b n_b\,\ell_b, \qquad N = \sum_b n_b,

  (:math:`n_b` the batch's size, above),

  computed by :func:`batch_mean` (over every rank under ``torch.distributed``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from analysis.distributed import all_reduce_sum
from analysis.losses import LOSS_MODULES, LOSSES, TokenCrossEntropy

Batch = tuple[Any, Any]


def split(batch: Any) -> Batch:
    """``(inputs, targets)`` of one batch.

    Raises:
        ValueError: the batch is not a pair.
    """
    try:
        inputs, targets = batch
    except (TypeError, ValueError):
        raise ValueError(
            "data must yield (inputs, targets) pairs, e.g. a DataLoader or a list of tuples"
        ) from None
    return inputs, targets


def batch_size(batch: Any, loss_fn: Callable | None = None) -> int:
    """The weight of a batch in a mean over batches: ``loss_fn.count_terms(targets)`` when
    the loss has it (the terms its mean runs over), else the rows of the targets.

    >>> batch_size((torch.zeros(5, 3), torch.zeros(5)))
    5
    """
    _, targets = split(batch)
    count_terms = getattr(loss_fn, "count_terms", None)
    if count_terms is not None:
        return int(count_terms(targets))
    if isinstance(targets, torch.Tensor):
        return int(targets.shape[0]) if targets.dim() > 0 else 1
    return len(targets)


def to(obj: Any, device: Any = None, dtype: torch.dtype | None = None) -> Any:
    """``obj`` with every tensor moved to ``device``; floating tensors cast to ``dtype``.

    Tuples, lists and mappings are walked (their structure is kept); other values pass.
    """
    if isinstance(obj, torch.Tensor):
        cast = dtype if dtype is not None and obj.is_floating_point() else obj.dtype
        return obj.to(device=device if device is not None else obj.device, dtype=cast)
    if isinstance(obj, Mapping):
        return {k: to(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        items = [to(v, device, dtype) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


def call_args(inputs: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` that call a model on ``inputs`` (see the module docstring)."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def output_tensor(output: Any) -> torch.Tensor:
    """The tensor a loss reads from a model's output (see the module docstring).

    Raises:
        ValueError: an output with no tensor where the convention looks.
    """
    if isinstance(output, Mapping):
        if "logits" not in output:
            raise ValueError(
                f"the model returned a mapping without 'logits' (keys {list(output)[:5]}); "
                "return a tensor or a mapping with 'logits'"
            )
        output = output["logits"]
    elif isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise ValueError(f"the model returned a {type(output).__name__}, not a tensor")
    return output


def forward(
    model: nn.Module, inputs: Any, params: Mapping[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """The model's output tensor on ``inputs``; with ``params``, via ``functional_call``
    (the model's own tensors are neither used for those names nor modified)."""
    return output_tensor(_run(model, inputs, params))


def _run(model: nn.Module, inputs: Any, params: Mapping[str, torch.Tensor] | None) -> Any:
    args, kwargs = call_args(inputs)
    if params is None:
        return model(*args, **kwargs)
    return functional_call(model, params, args, kwargs)


@dataclass(frozen=True)
class Call:
    """How a model is called on a batch and which tensor of its output the loss reads.

    Args:
        forward_fn: ``forward_fn(model, batch) -> output`` instead of the input convention
            (it may read the targets too, e.g. a model that takes its labels).
        output_fn: ``output_fn(output) -> Tensor`` instead of the output convention.

    >>> Call()(nn.Identity(), (torch.ones(2), torch.zeros(2)))
    tensor([1., 1.])
    >>> Call(output_fn=lambda out: 2 * out)(nn.Identity(), (torch.ones(2), None))
    tensor([2., 2.])
    """

    forward_fn: Callable[[nn.Module, Any], Any] | None = None
    output_fn: Callable[[Any], torch.Tensor] | None = None

    @property
    def plain(self) -> bool:
        """Whether both hooks are the convention's (so a traced copy of the model may run)."""
        return self.forward_fn is None and self.output_fn is None

    def __call__(
        self, model: nn.Module, batch: Any, params: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The output tensor the loss reads, on one ``(inputs, targets)`` batch; with
        ``params`` the model's tensors of those names are replaced (``functional_call``)."""
        if self.forward_fn is None:
            out = _run(model, split(batch)[0], params)
        elif params is None:
            out = self.forward_fn(model, batch)
        else:  # the hook calls the model: swap the tensors in on a wrapper around it
            prefixed = {f"model.{k}": v for k, v in params.items()}
            out = functional_call(_Hooked(model, self.forward_fn), prefixed, (batch,))
        return self.output_fn(out) if self.output_fn is not None else output_tensor(out)


class _Hooked(nn.Module):
    """``forward(batch) = fn(model, batch)``, so ``functional_call`` can run a hook."""

    def __init__(self, model: nn.Module, fn: Callable):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, batch):
        return self.fn(self.model, batch)


def concat(parts: list) -> Any:
    """Batches' inputs or targets joined along the sample axis (tensors, tuples, mappings)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, Mapping):
        return {k: concat([p[k] for p in parts]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(concat([p[i] for p in parts]) for i in range(len(first)))
    raise ValueError(f"cannot join batches of {type(first).__name__}; use tensors")


def take(obj: Any, rows: slice | torch.Tensor) -> Any:
    """The samples ``rows`` (a slice or an index tensor) of batched inputs or targets
    (tensors, tuples, mappings)."""
    if isinstance(obj, torch.Tensor):
        return obj[rows]
    if isinstance(obj, Mapping):
        return {k: take(v, rows) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(take(v, rows) for v in obj)
    raise ValueError(f"cannot cut a batch of {type(obj).__name__}; use tensors")


def is_class_batch(output: torch.Tensor, targets: Any) -> bool:
    """Whether ``targets`` are class labels of ``output`` (so accuracy means something)."""
    return (
        isinstance(targets, torch.Tensor)
        and output.dim() == 2
        and targets.dim() == 1
        and not targets.is_floating_point()
        and not targets.is_complex()
        and output.shape[0] == targets.shape[0]
    )


def accuracy(output: torch.Tensor, targets: Any) -> torch.Tensor:
    """Share of correct argmax predictions (a float64 0-d tensor), NaN when ``targets``
    are not class labels of ``output``."""
    if not is_class_batch(output, targets):
        return torch.full((), float("nan"), dtype=torch.float64, device=output.device)
    return (output.argmax(1) == targets).to(torch.float64).mean()


def loss_and_accuracy(loss_fn: Callable, output: torch.Tensor, targets: Any) -> torch.Tensor:
    """``[loss, accuracy]`` of one batch, a float64 tensor (accuracy NaN unless the targets
    are class labels of the output: :func:`accuracy`; a token loss's own accuracy, over the
    tokens it counts: :meth:`analysis.losses.TokenCrossEntropy.accuracy`)."""
    loss = loss_fn(output, targets).detach().to(torch.float64).reshape(())
    token = isinstance(loss_fn, TokenCrossEntropy)
    acc = loss_fn.accuracy(output, targets) if token else accuracy(output, targets)
    return torch.stack([loss, acc.to(loss)])


def sample_losses(
    loss_fn: Callable, output: torch.Tensor, targets: Any, batch_loss: float | None = None
) -> torch.Tensor | None:
    r"""Per-sample losses :math:`\ell_i = \text{loss\_fn}(f(x_i), y_i)`, float64, or ``None``.

    Each row is scored as a batch of one (:func:`torch.vmap`; a loop where the loss
    does not vectorise); the named losses (:data:`analysis.losses.LOSSES`) and their
    ``nn`` modules are called once with ``reduction="none"`` instead (the same numbers,
    about 80 times faster than ``vmap``); the token losses give one term per counted token.
    ``None`` when the targets are not a tensor with a row per output row, or when the mean
    of the :math:`\ell_i` is not the batch loss (to :math:`10^{-6}` relative): a loss that
    is not a mean over samples has no per-sample decomposition. ``batch_loss``: that batch
    loss when already computed.
    """
    if not (isinstance(targets, torch.Tensor) and targets.dim() >= 1):
        return None
    if not isinstance(output, torch.Tensor) or output.shape[:1] != targets.shape[:1]:
        return None

    def one(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return loss_fn(o.unsqueeze(0), t.unsqueeze(0)).reshape(())

    per = _unreduced(loss_fn, output, targets)
    if per is None:
        try:
            per = torch.vmap(one)(output, targets)
        except Exception:  # a loss that vmap cannot batch: score the rows one by one
            per = torch.stack([one(o, t) for o, t in zip(output, targets, strict=True)])
    per = per.detach().to(torch.float64)
    batch = float(loss_fn(output, targets)) if batch_loss is None else float(batch_loss)
    if abs(float(per.mean()) - batch) > 1e-6 * max(abs(batch), 1e-12):
        return None
    return per


def _unreduced(loss_fn: Callable, output: torch.Tensor, targets: Any) -> torch.Tensor | None:
    """The per-sample losses of a named loss in one call (``reduction="none"``, each
    sample's elements averaged), or None for any other loss."""
    if isinstance(loss_fn, TokenCrossEntropy) or any(loss_fn is f for f in LOSSES.values()):
        out = loss_fn(output, targets, reduction="none")
    elif type(loss_fn) in LOSS_MODULES:
        unreduced = copy.copy(loss_fn)
        unreduced.reduction = "none"
        out = unreduced(output, targets)
    else:
        return None
    return out.reshape(out.shape[0], -1).mean(1) if out.dim() >= 1 else None


@contextlib.contextmanager
def model_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Put every submodule in ``mode`` ("eval" or "train"); restore each one's flag after."""
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    saved = [(m, m.training) for m in model.modules()]
    model.train(mode == "train")
    try:
        yield
    finally:
        for m, training in saved:
            m.training = training


def reiterable(data: Iterable) -> Iterable:
    """``data`` itself when it can be iterated again; a list of its batches otherwise."""
    if iter(data) is data:  # a generator or iterator: read it once
        return list(data)
    return data


def count_samples(
    batches: Iterable, distributed: bool | None = False, loss_fn: Callable | None = None
) -> int:
    """``N``: the samples of ``batches`` (summed over ranks), or the terms of ``loss_fn``
    (:func:`batch_size`)."""
    n = torch.tensor([float(sum(batch_size(b, loss_fn) for b in batches))], dtype=torch.float64)
    return int(all_reduce_sum(n, distributed).item())


def batch_mean(
    fn: Callable[[Any], torch.Tensor],
    batches: Iterable,
    *,
    n_samples: int | None = None,
    distributed: bool | None = False,
    loss_fn: Callable | None = None,
) -> torch.Tensor:
    r"""The size-weighted mean :math:`\frac1N\sum_b n_b\, f(b)` of a per-batch mean ``fn``.

    Args:
        fn: ``fn(batch) -> Tensor``, a mean over the batch (any shape, same every batch).
        batches: ``(inputs, targets)`` batches (this rank's, under ``distributed``).
        n_samples: ``N`` over all ranks when known (each term is then added with weight
            :math:`n_b/N`); counted from the batches otherwise.
        distributed: sum over ranks (see :mod:`analysis.distributed`).
        loss_fn: the loss ``fn`` averages, when its batches count terms, not rows
            (:func:`batch_size`: language models' tokens).

    Raises:
        ValueError: no batch at all (on every rank), or no sample.

    >>> data = [(torch.ones(1), torch.zeros(1)), (3 * torch.ones(3), torch.zeros(3))]
    >>> batch_mean(lambda b: b[0].mean(), data)  # (1 * 1 + 3 * 3) / 4
    tensor(2.5000)
    """
    total, n = None, 0
    for batch in batches:
        nb = batch_size(batch, loss_fn)
        v = fn(batch)
        w = nb / n_samples if n_samples else float(nb)
        total = torch.add(torch.zeros_like(v) if total is None else total, v, alpha=w)
        n += nb
    if n_samples:
        if total is None:
            raise ValueError("this rank got no batch; pass at least one batch per rank")
        return all_reduce_sum(total, distributed)
    if total is None or n == 0:
        raise ValueError("data has no samples; pass at least one (inputs, targets) batch")
    count = all_reduce_sum(torch.tensor([float(n)], dtype=torch.float64), distributed)
    return all_reduce_sum(total, distributed) / count.to(total.device, total.dtype).squeeze(0)
