r"""Curvature beyond the Hessian: the generalized Gauss–Newton and the empirical Fisher.

Both are size-weighted means over batches, like :class:`analysis.HessianOperator`:

.. math:: G = \frac1N \sum_b n_b\, J_b^\top\, \nabla^2_f \ell_b\, J_b, \qquad
          F = \frac1N \sum_i g_i g_i^\top,

with :math:`J_b = \partial f / \partial w` the Jacobian of the outputs of batch :math:`b`,
:math:`\nabla^2_f \ell_b` the Hessian of the batch loss w.r.t. those outputs and
:math:`g_i = \nabla_w \ell_i` the gradient of sample :math:`i`'s own loss. Both are
positive semi-definite for a convex loss (the empirical Fisher always; rank :math:`\le N`),
and :math:`G = H` when the model is linear in its weights.

References: Schraudolph, "Fast curvature matrix-vector products for second-order gradient
descent", Neural Computation 2002; Martens, "New insights and perspectives on the natural
gradient method", JMLR 2020; Kunstner, Hennig & Balles, "Limitations of the empirical
Fisher approximation for natural gradient descent", NeurIPS 2019.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from analysis._functional import LossFn, ParamSpec
from analysis._hvp import HessianOperator, math_attention
from analysis.batches import _unreduced, batch_mean, model_mode

CURVATURES = ("hessian", "ggn", "fisher")


def _jvp(out: torch.Tensor, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r""":math:`Jv` by reverse mode twice: :math:`u \mapsto J^\top u` is linear in a dummy
    :math:`u`, and its vector-Jacobian product with ``v`` is :math:`Jv` (works on every
    op with a double backward, where forward mode may be missing)."""
    u = torch.zeros_like(out, requires_grad=True)
    (jtu,) = torch.autograd.grad(out, theta, u, create_graph=True)
    return torch.autograd.grad(jtu, u, v)[0]


class _OutputCurvature(HessianOperator):
    """A :class:`HessianOperator` whose product is a per-batch function of the outputs:
    the subclasses say what one batch contributes; the size-weighted loop, the checks,
    ``to_dense``, ``to_scipy`` and ``loss_and_gradient`` are the Hessian operator's."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Iterable, params: ParamSpec = None,
                 **kwargs):  # fmt: skip
        if kwargs.pop("cache", False):
            raise ValueError(f"{type(self).__name__} keeps no graphs; drop cache=")
        super().__init__(model, loss_fn, data, params, cache=False, **kwargs)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        v = self._check(v)
        self.n_matvecs += 1
        theta = self.space.theta.detach().requires_grad_(True)

        def one(batch):
            b = self.space.batch(batch)
            return self._product(theta, self.space.output(theta, b), b[1], v)

        with model_mode(self.model, self.mode), torch.enable_grad(), math_attention():
            return batch_mean(one, self.batches, n_samples=self.n_samples,
                              distributed=self.distributed, loss_fn=self.loss_fn)  # fmt: skip

    __matmul__ = matvec

    def _product(self, theta, out, targets, v) -> torch.Tensor:
        raise NotImplementedError


class GGNOperator(_OutputCurvature):
    r"""The generalized Gauss–Newton matrix of the mean data loss, as a linear operator.

    .. math:: v \mapsto Gv = \frac1N \sum_b n_b\, J_b^\top \big(\nabla^2_f \ell_b\,(J_b v)\big)

    :math:`J_b v` by the double-backward trick, :math:`\nabla^2_f \ell_b` by autograd on the
    loss of the batch's outputs (any loss: for cross-entropy it is
    :math:`(\mathrm{diag}(p) - pp^\top)/n_b` per sample, for the mean squared error
    :math:`2I/(n_b C)`), then :math:`J_b^\top` by one backward pass. Same arguments as
    :class:`HessianOperator` (``cache`` excepted); plugs into every solver.

    Reference: Schraudolph, Neural Computation 2002 (the GGN product).

    >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> G = GGNOperator(nn.Linear(2, 1, bias=False), nn.MSELoss(), [(X, torch.zeros(2, 1))])
    >>> G.matvec(torch.tensor([1.0, 1.0]))  # linear model: G = H = 2 X^T X / N
    tensor([1., 4.])
    """

    def _product(self, theta, out, targets, v):
        jv = _jvp(out, theta, v)
        f = out.detach().requires_grad_(True)
        (df,) = torch.autograd.grad(self.loss_fn(f, targets), f, create_graph=True)
        (hjv,) = torch.autograd.grad(df, f, jv)
        return torch.autograd.grad(out, theta, hjv)[0]


class FisherOperator(_OutputCurvature):
    r"""The empirical Fisher :math:`F = \frac1N\sum_i g_i g_i^\top` as a linear operator.

    .. math:: Fv = \frac1N \sum_b n_b\, \frac{1}{n_b} J_{\ell,b}^\top (J_{\ell,b} v)

    where :math:`J_{\ell,b}` stacks the per-sample gradients :math:`g_i^\top` of batch
    :math:`b`: :math:`c = J_{\ell,b} v` (the directional derivatives of the per-sample
    losses) by the double-backward trick, then :math:`J_{\ell,b}^\top c` by one backward
    pass. No per-sample gradient is ever stored, so memory is that of a Hessian product.
    The loss must be a mean over samples with a per-sample form (the named losses, their
    ``nn`` modules, or any loss :func:`torch.vmap` can batch), not a token loss.

    Reference: Kunstner, Hennig & Balles, NeurIPS 2019 (the empirical Fisher).

    >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> model = nn.Linear(2, 1, bias=False)
    >>> _ = model.weight.data.zero_()  # f = 0, so g_i = 2 (f_i - y_i) x_i = -2 x_i
    >>> F = FisherOperator(model, nn.MSELoss(), [(X, torch.ones(2, 1))])
    >>> F.matvec(torch.tensor([1.0, 1.0]))  # g_1 = (-2, 0), g_2 = (0, -4): F = diag(2, 8)
    tensor([2., 8.])
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Iterable, params: ParamSpec = None,
                 **kwargs):  # fmt: skip
        if hasattr(loss_fn, "count_terms"):
            raise ValueError("the empirical Fisher needs a per-sample loss; use curvature='ggn'")
        super().__init__(model, loss_fn, data, params, **kwargs)

    def _product(self, theta, out, targets, v):
        per = _per_sample(self.loss_fn, out, targets)
        c = _jvp(per, theta, v)
        return torch.autograd.grad(per, theta, c)[0] / per.numel()


def _per_sample(loss_fn: Callable, out: torch.Tensor, targets: Any) -> torch.Tensor:
    """The differentiable per-sample losses whose mean is the batch loss."""
    per = _unreduced(loss_fn, out, targets)
    if per is None:
        per = torch.vmap(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0)).reshape(()))(
            out, targets
        )
    return per


def curvature_operator(
    curvature: str,
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable,
    params: ParamSpec = None,
    **kwargs,
) -> HessianOperator:
    """The operator of ``curvature``: ``"hessian"``, ``"ggn"`` or ``"fisher"``.

    ``kwargs`` are :class:`HessianOperator`'s; ``cache`` only reaches the Hessian.

    >>> data = [(torch.randn(8, 3), torch.randn(8, 1))]
    >>> curvature_operator("ggn", nn.Linear(3, 1), nn.MSELoss(), data).shape
    (4, 4)
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {', '.join(CURVATURES)}; got {curvature!r}")
    if curvature == "hessian":
        return HessianOperator(model, loss_fn, data, params, **kwargs)
    kwargs.pop("cache", None)
    cls = GGNOperator if curvature == "ggn" else FisherOperator
    return cls(model, loss_fn, data, params, **kwargs)
