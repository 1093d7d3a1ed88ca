r"""m-sharpness: worst-case (SAM-style ascent) and average-case, plain or adaptive.

For disjoint batches :math:`B` of :math:`m` samples,

.. math:: S_{\text{worst}} = \mathbb{E}_B \max_{\|T^{-1}\delta\| \le \rho}
          L_B(w + \delta) - L_B(w), \qquad
          S_{\text{avg}} = \mathbb{E}_B \mathbb{E}_{\delta = T u}
          L_B(w + \delta) - L_B(w),

with :math:`T = \mathrm{diag}(|w|)` when adaptive (ASAM's scaling) and
:math:`T = I` otherwise; in the average case :math:`u \sim \mathcal N(0, \rho^2 I)`
(``norm="l2"``) or :math:`u \sim \mathcal U[-\rho, \rho]^d` (``norm="linf"``, as in
Andriushchenko et al.'s code). References: Foret et al., "Sharpness-Aware
Minimization", ICLR 2021 (m-sharpness); Kwon et al., "ASAM", ICML 2021;
Andriushchenko et al., "A modern look at the relationship between sharpness
and generalization", ICML 2023.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from analysis._functional import LossFn, ParamSpace, ParamSpec
from analysis.batches import Call, batch_size, concat, model_mode, split, take
from analysis.distributed import gather_floats, rank_world
from analysis.rng import generator


@dataclass
class SharpnessResult:
    """Mean sharpness over batches, its standard error, and the per-batch values."""

    value: float
    stderr: float
    n_batches: int
    values: list[float]


def m_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable,
    rho: float = 0.05,
    m: int | None = None,
    steps: int = 1,
    kind: str = "worst",
    adaptive: bool = False,
    norm: str = "l2",
    *,
    step_size: float | None = None,
    n_draws: int = 1,
    seed: int = 0,
    params: ParamSpec = None,
    dtype: torch.dtype | None = None,
    device=None,
    distributed: bool = False,
    progress: bool = False,
    forward_fn: Callable | None = None,
    output_fn: Callable | None = None,
) -> SharpnessResult:
    r"""m-sharpness of ``model`` on ``data`` (see the module docstring for the formulas).

    Worst case: ``steps`` of normalized gradient ascent on :math:`u = T^{-1}\delta`,
    :math:`u \leftarrow \Pi_{\|u\|\le\rho}(u + \alpha\, Tg/\|Tg\|)` (``"l2"``) or
    :math:`u \leftarrow \mathrm{clip}_\rho(u + \alpha\,\mathrm{sign}(Tg))` (``"linf"``),
    starting at :math:`\delta = 0`; the batch value is the largest
    :math:`L_B(w+\delta)-L_B(w)` over the iterates. ``steps=1`` with the default
    :math:`\alpha=\rho` is SAM's one-step estimate
    :math:`\hat\delta = \rho\, T^2 g / \|Tg\|`, the quantity of the SAF paper's Fig. 4b
    (:math:`\rho = 0.05`).

    Average case: ``n_draws`` draws :math:`\delta = \rho\, T z` per batch, with
    :math:`z \sim \mathcal N(0, I)` for ``"l2"`` (``rho`` is a per-coordinate standard
    deviation) or :math:`z \sim \mathcal U[-1, 1]^d` for ``"linf"`` (uniform in the
    :math:`\ell_\infty` ball of radius ``rho``).

    BatchNorm is in eval mode throughout, and the model's weights are never
    written (``functional_call``), so they are bitwise unchanged afterwards.

    Args:
        model, loss_fn, params, dtype, device: as in :class:`HessianOperator`.
        data: iterable of ``(inputs, targets)`` batches; re-cut into disjoint
            batches of ``m`` samples (an incomplete last batch is dropped);
            ``m=None`` keeps the given batches.
        rho: radius of the ball (worst) or standard deviation (average).
        m: samples per batch.
        steps: ascent steps (worst case).
        kind: ``"worst"`` or ``"average"``.
        adaptive: scale the ball by :math:`|w|` elementwise.
        norm: ``"l2"`` or ``"linf"``: the ball of the ascent (worst case) or the noise,
            Gaussian or uniform in the box (average case).
        step_size: :math:`\alpha` (default :math:`\rho` for one step, :math:`2\rho/\text{steps}`
            otherwise).
        n_draws: noise draws per batch (average case).
        seed: seed of the noise draws (batch ``i`` has its own stream,
            :func:`analysis.rng.generator`).
        distributed: shard batches over ``torch.distributed`` ranks; every rank
            gets the full result.
        progress: show a tqdm bar on stderr.
        forward_fn, output_fn: hooks for models outside the batch convention
            (:class:`analysis.batches.Call`).

    Returns:
        :class:`SharpnessResult` with the mean over batches and its standard error.
    """
    _validate(rho, m, steps, kind, norm, n_draws)
    alpha = step_size if step_size is not None else (rho if steps == 1 else 2 * rho / steps)
    space = ParamSpace(model, params, dtype, device, Call(forward_fn, output_fn))
    T = space.theta.abs() if adaptive else torch.ones_like(space.theta)
    vals = []
    rank, world = rank_world(distributed)
    with model_mode(model, "eval"):
        for i, batch in enumerate(
            tqdm(_rebatch(data, m), desc="m-sharpness", disable=not progress, leave=False)
        ):
            if i % world != rank:
                continue
            b = space.batch(batch)
            if kind == "worst":
                vals.append(_worst(space, loss_fn, b, T, rho, alpha, steps, norm))
            else:
                vals.append(_average(space, loss_fn, b, T, rho, n_draws, norm, seed, i))
    vals = gather_floats(vals, distributed)
    if not vals:
        raise ValueError("data has no batch of m samples; pass more data or a smaller m")
    mean = math.fsum(vals) / len(vals)
    var = math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else math.nan
    return SharpnessResult(mean, math.sqrt(var / len(vals)), len(vals), vals)


def _worst(space, loss_fn, b, T, rho, alpha, steps, norm) -> float:
    theta = space.theta
    loss0, g = _loss_grad(space, loss_fn, b, theta)
    u, best = torch.zeros_like(theta), -math.inf
    for s in range(steps):
        if s > 0:
            g = _loss_grad(space, loss_fn, b, theta + T * u)[1]
        tg = T * g
        if norm == "l2":
            u = u + alpha * tg / tg.norm().clamp_min(1e-30)
            u = u * min(1.0, rho / max(float(u.norm()), 1e-30))
        else:
            u = (u + alpha * tg.sign()).clamp(-rho, rho)
        with torch.no_grad():
            best = max(best, float(space.loss(theta + T * u, loss_fn, b)) - loss0)
    return best


def _average(space, loss_fn, b, T, rho, n_draws, norm, seed, i) -> float:
    theta = space.theta
    gen = generator(seed, "m_sharpness", i)  # batch i's own stream
    with torch.no_grad():
        loss0 = float(space.loss(theta, loss_fn, b))
        total = 0.0
        for _ in range(n_draws):
            if norm == "l2":
                z = torch.randn(theta.numel(), generator=gen, dtype=torch.float64)
            else:
                z = torch.rand(theta.numel(), generator=gen, dtype=torch.float64) * 2 - 1
            delta = rho * T * z.to(theta.device, theta.dtype)
            total += float(space.loss(theta + delta, loss_fn, b)) - loss0
    return total / n_draws


def _loss_grad(space, loss_fn, b, point) -> tuple[float, torch.Tensor]:
    point = point.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = space.loss(point, loss_fn, b)
        (g,) = torch.autograd.grad(loss, point)
    return float(loss.detach()), g


def _rebatch(data: Iterable, m: int | None) -> Iterator[tuple]:
    """Disjoint batches of exactly ``m`` samples, in order; an incomplete tail is dropped.
    Inputs and targets may be tensors, tuples or mappings (:mod:`analysis.batches`)."""
    if m is None:
        yield from data
        return
    xs, ys, count = [], [], 0
    for batch in data:
        x, y = split(batch)
        xs.append(x)
        ys.append(y)
        count += batch_size(batch)
        if count >= m:
            X, Y = concat(xs), concat(ys)
            for start in range(0, count - m + 1, m):
                rows = slice(start, start + m)
                yield take(X, rows), take(Y, rows)
            rest = slice(count - count % m, count)
            xs, ys, count = [take(X, rest)], [take(Y, rest)], count % m


def _validate(rho, m, steps, kind, norm, n_draws) -> None:
    if not (rho > 0 and math.isfinite(rho)):
        raise ValueError(f"rho must be a finite number > 0, got {rho}")
    if m is not None and m < 1:
        raise ValueError(f"m must be >= 1 (samples per batch) or None, got {m}")
    if steps < 1 or n_draws < 1:
        raise ValueError(f"steps and n_draws must be >= 1, got {steps}, {n_draws}")
    if kind not in ("worst", "average"):
        raise ValueError(f"kind must be 'worst' or 'average', got {kind!r}")
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")


def sam_sharpness(
    model: nn.Module, loss_fn: LossFn, data: Iterable, rho: float = 0.05, **kwargs
) -> SharpnessResult:
    r"""SAM's one-step sharpness :math:`L_B(w+\hat\epsilon)-L_B(w)` per given batch, averaged.

    :math:`\hat\epsilon = \rho\, g/\|g\|` (SAF paper, Fig. 4b, :math:`\rho=0.05`).
    """
    return m_sharpness(model, loss_fn, data, rho, None, 1, "worst", **kwargs)
