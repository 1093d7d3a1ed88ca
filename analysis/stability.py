r"""Stability thresholds ("edges of stability") of common optimizers, read from the optimizer.

On a quadratic :math:`L = \tfrac12 w^\top H w` a fixed-step optimizer converges iff each
eigenvalue of its (preconditioned) Hessian lies below a threshold; full-batch training
typically drives the sharpness up to that threshold and hovers there (Cohen et al. 2021).

* SGD: :math:`\lambda_{\max}(H) < 2/\eta` (:func:`sgd_threshold`);
* SGD with heavy-ball momentum :math:`\beta`: :math:`\lambda_{\max}(H) < 2(1+\beta)/\eta`;
* Adam, AdamW: :math:`\lambda_{\max}(P^{-1}H) < (2+2\beta_1)/((1-\beta_1)\eta)`, with
  :math:`P` from the second moments (:func:`adam_threshold`, :func:`adam_preconditioner`);
* SAM over SGD with radius :math:`\rho`: :math:`\lambda_{\max}(H) <` the SAM-edge, which
  depends on :math:`\|\nabla L\|` (:func:`sam_edge`).

The thresholds concern the loss's own Hessian: a coupled L2 weight decay :math:`\mu` adds
:math:`\mu I` to the matrix the optimizer sees (subtract :math:`\mu` from an SGD threshold).

References: Cohen, Kaur, Li, Kolter & Talwalkar, "Gradient descent on neural networks
typically occurs at the edge of stability", ICLR 2021; Cohen et al., "Adaptive gradient
methods at the edge of stability", arXiv:2207.14484, 2022; Long & Bartlett,
"Sharpness-aware minimization and the edge of stability", JMLR 2024 (arXiv:2309.12488).
"""

from __future__ import annotations

import math
from typing import Any

import torch

_ADAM = (torch.optim.Adam, torch.optim.AdamW)


def sgd_threshold(
    lr: float, momentum: float = 0.0, *, dampening: float = 0.0, nesterov: bool = False
) -> float:
    r"""The largest stable :math:`\lambda_{\max}(H)` of SGD as ``torch.optim.SGD`` steps it.

    Heavy ball, :math:`b \leftarrow \beta b + (1-d) g,\ w \leftarrow w - \eta b`, on one
    eigen-direction of curvature :math:`\lambda` has an eigenvalue :math:`-1` exactly at

    .. math:: \lambda^* = \frac{2(1+\beta)}{\eta\,(1-d)}, \qquad
              \text{Nesterov } (w \leftarrow w - \eta(g + \beta b)):\
              \lambda^* = \frac{2(1+\beta)}{\eta\,(1+2\beta)},

    which is :math:`2/\eta` without momentum (Cohen et al. 2021, §2 and App. for momentum).

    >>> round(sgd_threshold(0.1), 9), round(sgd_threshold(0.1, 0.9), 9), sgd_threshold(0.0)
    (20.0, 38.0, inf)
    """
    if not lr >= 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if lr == 0:  # the end of a schedule: no step, every curvature is stable
        return math.inf
    if not (0 <= momentum < 1 and 0 <= dampening < 1):
        raise ValueError(f"momentum and dampening must lie in [0, 1), got {momentum}, {dampening}")
    if nesterov:
        return 2 * (1 + momentum) / (lr * (1 + 2 * momentum))
    return 2 * (1 + momentum) / (lr * (1 - dampening if momentum else 1.0))


def adam_threshold(lr: float, beta1: float) -> float:
    r"""The largest stable preconditioned sharpness :math:`\lambda_{\max}(P^{-1}H)` of Adam.

    With the preconditioner frozen, Adam is EMA momentum :math:`m \leftarrow \beta_1 m +
    (1-\beta_1) g,\ w \leftarrow w - \eta P^{-1} m`, stable iff

    .. math:: \lambda_{\max}(P^{-1}H) < \frac{2 + 2\beta_1}{(1-\beta_1)\,\eta}

    (Cohen et al. 2022, eq. 2: :math:`38/\eta` for :math:`\beta_1 = 0.9`;
    :math:`P` is :func:`adam_preconditioner`).

    >>> round(adam_threshold(1.0, 0.9), 10)
    38.0
    """
    if not lr >= 0 or not 0 <= beta1 < 1:
        raise ValueError(f"need lr >= 0 and 0 <= beta1 < 1, got {lr}, {beta1}")
    return math.inf if lr == 0 else (2 + 2 * beta1) / ((1 - beta1) * lr)


def sam_edge(lr: float, rho: float, grad_norm: float, base: float | None = None) -> float:
    r"""Long & Bartlett's SAM-edge: the largest stable :math:`\lambda_{\max}(H)` under SAM.

    On a quadratic (minimum at 0) SAM's gradient is :math:`\nabla L(w + \rho g/\|g\|) =
    (I + \rho H/\|g\|)\, g`, so an eigen-direction of curvature :math:`\lambda` feels
    :math:`\lambda(1 + \rho\lambda/\|g\|)`; setting that to the base threshold
    :math:`T` (:math:`2/\eta` for gradient descent) gives

    .. math:: \lambda^* = \frac{\|g\|}{2\rho}\Big(\sqrt{1 + \frac{4\rho T}{\|g\|}} - 1\Big)
              \ \overset{T = 2/\eta}{=}\ \frac{\|g\|}{2\rho}\Big(\sqrt{1 +
              \frac{8\rho}{\eta\|g\|}} - 1\Big) \;<\; \frac2\eta

    (Long & Bartlett 2024, §3), which tends to :math:`T` as :math:`\rho\|g\|^{-1} \to 0`.
    ``base`` is :math:`T` (default :math:`2/\eta`; e.g. :func:`sgd_threshold` with momentum,
    under the same linearisation).

    >>> round(sam_edge(0.1, 0.05, 1.0), 6)  # (1 / 0.1) (sqrt(1 + 8 * 0.05 / 0.1) - 1)
    12.36068
    """
    if not (lr >= 0 and rho >= 0 and grad_norm >= 0):
        raise ValueError(f"need lr >= 0, rho >= 0, grad_norm >= 0; got {lr}, {rho}, {grad_norm}")
    T = (2 / lr if lr > 0 else math.inf) if base is None else base
    if rho == 0 or math.isinf(T):
        return T
    if grad_norm == 0:
        return 0.0
    x = 4 * rho * T / grad_norm
    return grad_norm / (2 * rho) * x / (math.sqrt(1 + x) + 1)  # sqrt(1+x)-1, without cancellation


def adam_preconditioner(
    optimizer: torch.optim.Optimizer, params: list[torch.Tensor]
) -> torch.Tensor:
    r"""Adam's diagonal preconditioner over ``params``, flat, in their order.

    PyTorch's Adam steps :math:`w \leftarrow w - \eta\, \hat m / (\sqrt{\hat v} + \epsilon)`
    with :math:`\hat m = m/(1-\beta_1^t)`, :math:`\hat v = v/(1-\beta_2^t)`, i.e.
    :math:`w \leftarrow w - \eta P^{-1} m` with

    .. math:: P = (1-\beta_1^t)\,\mathrm{diag}\big(\sqrt{v/(1-\beta_2^t)} + \epsilon\big)

    (Cohen et al. 2022, §2), read from the state (``exp_avg_sq``, or ``max_exp_avg_sq`` with
    ``amsgrad``, and ``step``). Raises ValueError before the first step.
    """
    inner = getattr(optimizer, "base_optimizer", optimizer)
    group_of = {id(p): g for g in inner.param_groups for p in g["params"]}
    parts = []
    for p in params:
        state, group = inner.state.get(p, {}), group_of.get(id(p))
        if group is None or "exp_avg_sq" not in state:
            raise ValueError("a parameter has no Adam state; measure after the optimizer's step")
        (b1, b2), t = group["betas"], float(state["step"])
        v = state["max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"]
        parts.append((1 - b1**t) * ((v / (1 - b2**t)).sqrt() + group["eps"]).reshape(-1))
    return torch.cat(parts)


class PreconditionedOperator:
    r"""The symmetric form :math:`P^{-1/2} A P^{-1/2}` of :math:`P^{-1}A` (same eigenvalues).

    :math:`P^{-1}A` is similar to it (:math:`P^{1/2}(P^{-1}A)P^{-1/2}`), so
    :math:`\lambda_{\max}(P^{-1}H)`, the preconditioned sharpness of Cohen et al. 2022, is
    the top eigenvalue :func:`analysis.lanczos` finds. ``op`` is any operator of the toolkit
    (:class:`analysis.HessianOperator`, GGN, Fisher); ``P`` a positive diagonal, flat.

    >>> A = PreconditionedOperator(torch.eye(2, dtype=torch.float64) * 4, torch.tensor([1.0, 4.0]))
    >>> A.matvec(torch.ones(2, dtype=torch.float64))
    tensor([4., 1.], dtype=torch.float64)
    """

    def __init__(self, op: Any, P: torch.Tensor):
        if isinstance(op, torch.Tensor):
            self.dtype, self.device, matrix = op.dtype, op.device, op
            op = type("Dense", (), {"matvec": staticmethod(lambda v: matrix @ v)})
        else:
            self.dtype, self.device = op.dtype, op.device
        self.op, self.shape = op, (P.numel(), P.numel())
        if not bool((P > 0).all()):
            raise ValueError("P must be positive; pass Adam's preconditioner (eps > 0)")
        self.scale = P.to(self.device, self.dtype).rsqrt()

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Return :math:`P^{-1/2} A P^{-1/2} v`."""
        return self.scale * self.op.matvec(self.scale * v.to(self.scale))

    __matmul__ = matvec


def stability_thresholds(
    optimizer: torch.optim.Optimizer, grad_norm: float | None = None
) -> dict[str, Any]:
    r"""The thresholds of ``optimizer`` at its current hyperparameters (see the module table).

    Reads ``lr``, ``momentum``, ``dampening``, ``nesterov``, ``betas`` and ``rho`` from the
    ``param_groups`` (which must agree on them); a :class:`saf.SAM` is recognised by its
    ``rho`` and its ``base_optimizer``.

    Returns:
        ``{"optimizer", "lr", "threshold"}``: ``threshold`` bounds :math:`\lambda_{\max}(H)`
        for SGD and :math:`\lambda_{\max}(P^{-1}H)` for Adam/AdamW (then ``"preconditioned":
        True``). SAM adds ``"sam_edge"`` (:func:`sam_edge` at ``grad_norm``, the full-batch
        gradient norm; NaN without it, with ASAM or over Adam).

    Raises:
        ValueError: another optimizer, or groups that differ in those hyperparameters.

    >>> w = torch.zeros(2, requires_grad=True)
    >>> round(stability_thresholds(torch.optim.SGD([w], lr=0.1, momentum=0.9))["threshold"], 9)
    38.0
    """
    inner = getattr(optimizer, "base_optimizer", optimizer)
    lr = _common(optimizer, "lr")
    if isinstance(inner, torch.optim.SGD):
        momentum = _common(optimizer, "momentum", 0.0)
        T = sgd_threshold(lr, momentum, dampening=_common(optimizer, "dampening", 0.0),
                          nesterov=_common(optimizer, "nesterov", False))  # fmt: skip
        out = {"optimizer": type(inner).__name__, "lr": lr, "threshold": T}
    elif isinstance(inner, _ADAM):
        T = adam_threshold(lr, _common(optimizer, "betas")[0])
        out = {"optimizer": type(inner).__name__, "lr": lr, "threshold": T, "preconditioned": True}
    else:
        raise ValueError(f"no stability threshold is known for {type(inner).__name__}; "
                         "use SGD, Adam, AdamW or SAM over them")  # fmt: skip
    if "rho" in optimizer.param_groups[0]:
        out["sam_edge"] = _sam_edge(optimizer, out, grad_norm)
    return out


def _sam_edge(optimizer, out: dict, grad_norm: float | None) -> float:
    """SAM's edge, NaN where the linearisation does not apply (ASAM, Adam) or no norm."""
    if grad_norm is None or out.get("preconditioned") or _common(optimizer, "adaptive", False):
        return math.nan
    return sam_edge(out["lr"], _common(optimizer, "rho"), grad_norm, out["threshold"])


def _common(optimizer: torch.optim.Optimizer, key: str, default: Any = None) -> Any:
    """The value of ``key`` shared by every parameter group."""
    values = {repr(g.get(key, default)): g.get(key, default) for g in optimizer.param_groups}
    if len(values) > 1:
        raise ValueError(f"param groups differ in {key} ({', '.join(values)}); "
                         "stability thresholds need one value")  # fmt: skip
    value = next(iter(values.values()))
    return float(value) if isinstance(value, torch.Tensor) else value  # a capturable lr
