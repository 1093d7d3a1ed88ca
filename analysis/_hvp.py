r"""Hessian-vector products over a whole data set.

The loss is the mean over all samples, batches weighted by their size:

.. math:: L(w) = \frac{1}{N} \sum_b n_b \, \ell_b(w), \qquad
          Hv = \frac{1}{N} \sum_b n_b \, \nabla^2 \ell_b(w)\, v ,

where :math:`\ell_b` is ``loss_fn`` (a mean over its batch) on batch :math:`b`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from analysis._functional import LossFn, ParamSpace, ParamSpec
from analysis.batches import Call, batch_mean, count_samples, model_mode, reiterable
from analysis.distributed import all_reduce_sum, shard
from analysis.memory import budget_bytes


def _tensors(obj) -> Iterator[torch.Tensor]:
    """Every tensor in nested tuples, lists and mappings (batches)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors(v)


def _vjp(g: torch.Tensor, theta: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """The product (dg/dtheta)^T v, zero where ``g`` does not depend on theta (a loss linear
    in the weights has a zero Hessian, not an error)."""
    if not g.requires_grad:
        return torch.zeros_like(theta).detach()
    (hv,) = torch.autograd.grad(g, theta, v, allow_unused=True, **kw)
    return torch.zeros_like(theta).detach() if hv is None else hv.detach()


def math_attention():
    """``scaled_dot_product_attention`` on its math kernel (the fused CPU and flash kernels
    have no double backward), for the duration of our own products only."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: the math kernel is the only one with a double backward
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


class _OverBudget(Exception):
    """The first batch's graph, times the number of batches, exceeds the cache budget."""


class HessianOperator:
    r"""The Hessian of the mean data loss w.r.t. selected parameters, as a linear operator.

    .. math:: v \mapsto Hv = \frac{1}{N}\sum_b n_b \nabla^2_w \ell_b(w)\, v

    Each product is a double-backward pass (Pearlmutter's trick) per batch, computed
    with :func:`torch.func.functional_call` on copies of the weights: the model is
    never modified. Without caching, each batch's graph is freed before the next
    one, so memory does not grow with the number of batches.

    With ``cache=True`` (or ``"auto"`` when the estimated size of the saved graphs
    fits ``cache_budget`` bytes) the first-order graph :math:`\nabla \ell_b` of every
    batch is built once and kept; a product is then a single backward pass through
    it instead of forward + backward + double backward.

    Args:
        model: any ``nn.Module``.
        loss_fn: ``loss_fn(outputs, targets)``, a mean over the batch.
        data: iterable of ``(inputs, targets)`` batches (a generator is read once).
        params: which parameters: None (all trainable), names, parameter tensors,
            or a predicate ``(name, param) -> bool`` (see
            :func:`params_without_norm_and_bias`).
        mode: ``"eval"`` (default: BatchNorm uses running statistics, dropout off) or
            ``"train"`` (batch statistics; running statistics are not touched).
        dtype: e.g. ``torch.float64`` for exact-arithmetic checks (None: model's).
        device: e.g. ``"cuda"`` (None: the model's device).
        cache: keep first-order graphs across products: False, True or ``"auto"``.
        cache_budget: byte limit for ``cache="auto"`` (default: half the free memory on the
            device, or ``$SAF_MEMORY_BUDGET``: :func:`analysis.memory.budget_bytes`). The
            estimate is the memory the first batch's graph adds (each saved storage once, not
            the weights) times the number of batches. Kept graphs
            make a product 0.68× (digits CNN) to 0.69× (resnet18, CIFAR-shaped) of one
            without them, and cost about one product to build, so they pay from the second
            product on (``benchmarks/hvp_scale.py``, ``benchmarks/hessian.py --hvp-forms``).
        distributed: shard batches over ``torch.distributed`` ranks and all-reduce.
        fold: in eval mode, fold each BatchNorm into the convolution before it
            (:func:`analysis.fold.fold_batchnorm`): the loss is the same function of the
            same parameters, so the Hessian is exact up to float rounding (float64 agrees
            to 1e-15). A product through the kept graph takes 0.82× the time on the
            digits CNN and on resnet18, whose kept graph also needs 0.61× the memory
            (``benchmarks/hessian.py --hvp-forms``, ``benchmarks/hvp_scale.py``). Models
            that ``torch.fx`` cannot trace, train mode and a ``forward_fn`` hook run the
            model as it is.
        forward_fn, output_fn: hooks for models outside the batch convention
            (:class:`analysis.batches.Call`).

    Attributes:
        shape: ``(n, n)`` with ``n = n_params``.
        n_matvecs: number of products computed so far.
        n_samples: number of samples N (over all ranks).
        cached: whether products use kept first-order graphs; ``cache_bytes`` is then
            their size.
        folded: the number of conv→BatchNorm pairs folded (0: the model runs as it is).

    Reference: Pearlmutter, "Fast exact multiplication by the Hessian", 1994.

    >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> model = nn.Linear(2, 1, bias=False)
    >>> H = HessianOperator(model, nn.MSELoss(), [(X, torch.zeros(2, 1))])
    >>> H.matvec(torch.tensor([1.0, 1.0]))  # 2 X^T X / N = diag(1, 4)
    tensor([1., 4.])
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Iterable,
        params: ParamSpec = None,
        *,
        mode: str = "eval",
        dtype: torch.dtype | None = None,
        device: Any = None,
        cache: bool | str = False,
        cache_budget: int | None = None,
        distributed: bool = False,
        fold: bool = True,
        forward_fn: Callable | None = None,
        output_fn: Callable | None = None,
    ):
        if cache not in (False, True, "auto"):
            raise ValueError(f"cache must be False, True or 'auto', got {cache!r}")
        with model_mode(model, mode):  # validates mode
            pass
        if mode == "train" and any(
            isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()
        ):
            warnings.warn(
                "mode='train' with dropout: every product draws new dropout masks, so the "
                "operator is random (not a fixed Hessian); use mode='eval'",
                stacklevel=3,
            )
        self.model, self.loss_fn, self.mode = model, loss_fn, mode
        call = Call(forward_fn, output_fn)
        self.space = ParamSpace(model, params, dtype, device, call, fold and mode == "eval")
        self.folded = self.space.folded
        self.distributed = distributed
        self.batches = shard(reiterable(data), distributed)
        self.n_samples = count_samples(self.batches, distributed, loss_fn)  # LM: tokens
        if self.n_samples == 0:
            raise ValueError("data has no samples; pass at least one (inputs, targets) batch")
        self.n_params = self.space.n
        self.shape = (self.n_params, self.n_params)
        self.dtype, self.device = self.space.dtype, self.space.device
        self.n_matvecs = 0
        self._cache_mode, self._cache_budget = cache, cache_budget
        self._graph: tuple[torch.Tensor, torch.Tensor] | None = None
        self._first_order: torch.Tensor | None = None  # [loss, gradient] from the graph

    @property
    def cached(self) -> bool:
        """Whether products run through kept first-order graphs (built at the first one)."""
        return self._graph is not None

    # -- products ---------------------------------------------------------
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Return :math:`Hv` for a flat vector ``v`` of length ``n_params``."""
        v = self._check(v)
        self.n_matvecs += 1
        if self._cache_mode and self._graph is None:
            self._graph = self._build_graph()
        if self._graph is not None:
            theta, g = self._graph
            return all_reduce_sum(_vjp(g, theta, v, retain_graph=True), self.distributed)

        def hvp(theta, loss):
            (g,) = torch.autograd.grad(loss, theta, create_graph=True)
            return _vjp(g, theta, v)

        return self._mean(hvp)

    def _mean(self, per_batch, theta=None, distributed=None) -> torch.Tensor:
        """Size-weighted mean over the batches of ``per_batch(theta, batch_loss)``, summed
        over ranks (unless ``distributed=False``)."""
        theta = self.space.theta.detach().requires_grad_(True) if theta is None else theta

        def one(batch):
            return per_batch(theta, self.space.loss(theta, self.loss_fn, self.space.batch(batch)))

        with model_mode(self.model, self.mode), torch.enable_grad(), math_attention():
            return batch_mean(
                one,
                self.batches,
                n_samples=self.n_samples,
                distributed=self.distributed if distributed is None else distributed,
                loss_fn=self.loss_fn,
            )

    __matmul__ = matvec

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)

    def _check(self, v: torch.Tensor) -> torch.Tensor:
        if v.shape != (self.n_params,):
            raise ValueError(
                f"expected a flat vector of length {self.n_params}, got {tuple(v.shape)}"
            )
        return v.to(device=self.device, dtype=self.dtype)

    def _build_graph(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The size-weighted sum of every batch's first-order graph (None if over budget)."""
        theta = self.space.theta.detach().requires_grad_(True)
        saved, batches = [0], [0]
        # Memory the graph adds: each storage once, not the weights nor the data (held anyway).
        seen = {theta.untyped_storage().data_ptr()}
        seen.update(t.untyped_storage().data_ptr() for t in self.space.fixed.values())
        seen.update(t.untyped_storage().data_ptr() for t in _tensors(self.batches))

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                saved[0] += t.untyped_storage().nbytes()
            return t.detach()  # not t: a saved output holding its own grad_fn is a cycle

        def gradient_graph(theta, loss):
            (g,) = torch.autograd.grad(loss, theta, create_graph=True)
            first, batches[0] = batches[0] == 0, batches[0] + 1
            # the first batch's size times the number of batches estimates the whole cache
            if (
                first
                and self._cache_mode == "auto"
                and saved[0] * len(self.batches) > self._budget()
            ):
                raise _OverBudget
            return torch.cat([loss.reshape(1), g])  # the loss rides along for loss_and_gradient

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                total = self._mean(gradient_graph, theta, distributed=False)
        except _OverBudget:
            self._cache_mode = False
            return None
        self.cache_bytes = saved[0]
        self._first_order = total.detach().to(torch.float64)  # this rank's share
        return theta, total[1:]

    def _budget(self) -> int:
        if self._cache_budget is not None:
            return self._cache_budget
        return budget_bytes(self.device)  # half the free memory, or $SAF_MEMORY_BUDGET

    # -- first-order quantities -------------------------------------------
    def loss_and_gradient(self) -> tuple[float, torch.Tensor]:
        """Mean loss and its flat gradient at the current weights (one pass).

        When products keep graphs (``cache``), the graph is built here if it is not yet, and
        the loss and gradient are the ones it computed: no pass of their own.
        """
        if self._cache_mode and self._graph is None:
            self._graph = self._build_graph()
        if self._graph is not None:
            total = all_reduce_sum(self._first_order.clone(), self.distributed)
            return float(total[0]), total[1:].to(self.dtype)

        def loss_grad(theta, loss):
            (g,) = torch.autograd.grad(loss, theta)
            return torch.cat([loss.detach().reshape(1), g]).to(torch.float64)

        total = self._mean(loss_grad)
        return float(total[0]), total[1:].to(self.dtype)

    # -- interop ------------------------------------------------------------
    def to_scipy(self):
        """A :class:`scipy.sparse.linalg.LinearOperator` (float64 numpy in and out)."""
        from scipy.sparse.linalg import LinearOperator

        def mv(x):
            v = torch.as_tensor(np.asarray(x).reshape(-1), dtype=self.dtype, device=self.device)
            return self.matvec(v).to("cpu", torch.float64).numpy()

        return LinearOperator(self.shape, matvec=mv, dtype=np.float64)

    def to_dense(self) -> torch.Tensor:
        """The full ``n x n`` matrix, one product per column (small models only)."""
        eye = torch.eye(self.n_params, dtype=self.dtype, device=self.device)
        return torch.stack([self.matvec(e) for e in eye], dim=1)


def hessian_operator(
    model: nn.Module, loss_fn: LossFn, data: Iterable, params: ParamSpec = None, **kwargs
) -> HessianOperator:
    """Build a :class:`HessianOperator` (see there for the arguments).

    >>> data = [(torch.randn(8, 3), torch.randn(8, 1))]
    >>> H = hessian_operator(nn.Linear(3, 1), nn.MSELoss(), data)
    >>> H.shape
    (4, 4)
    """
    return HessianOperator(model, loss_fn, data, params, **kwargs)
