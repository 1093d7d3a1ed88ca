r"""Hessian-vector products over a whole data set.

The loss is the mean over all samples, batches weighted by their size:

.. math:: L(w) = \frac{1}{N} \sum_b n_b \, \ell_b(w), \qquad
          Hv = \frac{1}{N} \sum_b n_b \, \nabla^2 \ell_b(w)\, v ,

where :math:`\ell_b` is ``loss_fn`` (a mean over its batch) on batch :math:`b`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from analysis._distributed import all_reduce_sum, shard
from analysis._functional import LossFn, ParamSpace, ParamSpec, model_mode, reiterable

DEFAULT_CACHE_BUDGET = 2 * 2**30  # bytes of saved activations kept across matvecs


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
        cache_budget: byte limit for ``cache="auto"`` (default: 2 GiB on the CPU, half
            the free memory on CUDA). The estimate is the size of the tensors saved by
            the first batch's graph times the number of batches.
        distributed: shard batches over ``torch.distributed`` ranks and all-reduce.

    Attributes:
        shape: ``(n, n)`` with ``n = n_params``.
        n_matvecs: number of products computed so far.
        n_samples: number of samples N (over all ranks).

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
    ):
        if cache not in (False, True, "auto"):
            raise ValueError(f"cache must be False, True or 'auto', got {cache!r}")
        with model_mode(model, mode):  # validates mode
            pass
        self.model, self.loss_fn, self.mode = model, loss_fn, mode
        self.space = ParamSpace(model, params, dtype, device)
        self.distributed = distributed
        self.batches = shard(reiterable(data), distributed)
        sizes = torch.tensor([float(len(y)) for _, y in self.batches], dtype=torch.float64)
        self.n_samples = int(all_reduce_sum(sizes.sum().reshape(1), distributed).item())
        if self.n_samples == 0:
            raise ValueError("data has no samples; pass at least one (inputs, targets) batch")
        self.n_params = self.space.n
        self.shape = (self.n_params, self.n_params)
        self.dtype, self.device = self.space.dtype, self.space.device
        self.n_matvecs = 0
        self._cache_mode, self._cache_budget = cache, cache_budget
        self._graph: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- products ---------------------------------------------------------
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Return :math:`Hv` for a flat vector ``v`` of length ``n_params``."""
        v = self._check(v)
        self.n_matvecs += 1
        if self._cache_mode and self._graph is None:
            self._graph = self._build_graph()
        if self._graph is not None:
            theta, g = self._graph
            (hv,) = torch.autograd.grad(g, theta, v, retain_graph=True)
            return all_reduce_sum(hv.detach(), self.distributed)
        hv = torch.zeros_like(v)
        with model_mode(self.model, self.mode):
            for batch in self.batches:
                x, y, nb = self.space.batch(batch)
                theta = self.space.theta.detach().requires_grad_(True)
                with torch.enable_grad():
                    loss = self.space.loss(theta, self.loss_fn, x, y)
                    (g,) = torch.autograd.grad(loss, theta, create_graph=True)
                    (hvb,) = torch.autograd.grad(g, theta, v)
                hv.add_(hvb, alpha=nb / self.n_samples)
        return all_reduce_sum(hv, self.distributed)

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
        """Sum of size-weighted first-order graphs of all batches (None if over budget)."""
        theta = self.space.theta.detach().requires_grad_(True)
        total, saved = None, [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t

        with model_mode(self.model, self.mode), torch.enable_grad():
            for i, batch in enumerate(self.batches):
                x, y, nb = self.space.batch(batch)
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    loss = self.space.loss(theta, self.loss_fn, x, y)
                    (g,) = torch.autograd.grad(loss, theta, create_graph=True)
                g = g * (nb / self.n_samples)
                total = g if total is None else total + g
                if (
                    self._cache_mode == "auto"
                    and i == 0
                    and saved[0] * len(self.batches) > self._budget()
                ):
                    self._cache_mode = False
                    return None
        self.cache_bytes = saved[0]
        return theta, total

    def _budget(self) -> int:
        if self._cache_budget is not None:
            return self._cache_budget
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0] // 2
        return DEFAULT_CACHE_BUDGET

    # -- first-order quantities -------------------------------------------
    def loss_and_gradient(self) -> tuple[float, torch.Tensor]:
        """Mean loss and its flat gradient at the current weights (one pass)."""
        total = torch.zeros(self.n_params + 1, dtype=torch.float64, device=self.device)
        with model_mode(self.model, self.mode):
            for batch in self.batches:
                x, y, nb = self.space.batch(batch)
                theta = self.space.theta.detach().requires_grad_(True)
                with torch.enable_grad():
                    loss = self.space.loss(theta, self.loss_fn, x, y)
                    (g,) = torch.autograd.grad(loss, theta)
                total[0] += float(loss.detach()) * nb
                total[1:] += g.to(torch.float64) * nb
        total = all_reduce_sum(total, self.distributed) / self.n_samples
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
