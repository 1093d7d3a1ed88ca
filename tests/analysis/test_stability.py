"""Stability thresholds on quadratics, where the edge is known: the real optimizers converge
just below it and diverge just above it."""

import math

import pytest
import torch

from analysis import lanczos
from analysis.stability import (
    PreconditionedOperator,
    adam_preconditioner,
    adam_threshold,
    sam_edge,
    sgd_threshold,
    stability_thresholds,
)
from saf import SAM


def _final_size(opt_factory, lam, steps=2000):
    """|w| after ``steps`` of the optimizer on L = lam w^2 / 2 from w = 1 (float64)."""
    w = torch.ones(1, dtype=torch.float64, requires_grad=True)
    opt = opt_factory([w])
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * lam * w**2).sum().backward()
        opt.step()
        if not w.abs().item() < 1e30:
            return math.inf
    return w.abs().item()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=0.1),
        dict(lr=0.1, momentum=0.9),
        dict(lr=0.05, momentum=0.5, dampening=0.3),
        dict(lr=0.1, momentum=0.9, nesterov=True),
    ],
)
def test_sgd_threshold_is_the_edge_of_torch_sgd(kwargs):
    T = stability_thresholds(torch.optim.SGD([torch.zeros(1, requires_grad=True)], **kwargs))
    assert T["threshold"] == sgd_threshold(
        kwargs["lr"], kwargs.get("momentum", 0.0), dampening=kwargs.get("dampening", 0.0),
        nesterov=kwargs.get("nesterov", False),
    )  # fmt: skip
    factory = lambda ps: torch.optim.SGD(ps, **kwargs)  # noqa: E731
    assert _final_size(factory, 0.98 * T["threshold"]) < 1e-6
    assert _final_size(factory, 1.02 * T["threshold"]) > 1e6


def test_momentum_thresholds_closed_forms():
    assert sgd_threshold(0.1) == pytest.approx(20.0)
    assert sgd_threshold(0.1, 0.9) == pytest.approx(38.0)  # 2 (1 + beta) / eta
    assert adam_threshold(0.001, 0.9) == pytest.approx(38_000.0)  # Cohen et al. 2022: 38/eta


def _adam_after_steps(steps=5, **kwargs):
    torch.manual_seed(0)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    A = torch.diag(torch.linspace(0.5, 50.0, 6, dtype=torch.float64))
    opt = torch.optim.Adam([w], **kwargs)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * w @ A @ w).backward()
        opt.step()
    return w, A, opt


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_preconditioner_reproduces_adams_step(amsgrad):
    """w - w' = eta P^-1 m, with P and m read after the step, is PyTorch's Adam update."""
    w, A, opt = _adam_after_steps(lr=0.01, betas=(0.9, 0.99), eps=1e-3, amsgrad=amsgrad)
    before = w.detach().clone()
    opt.zero_grad()
    (0.5 * w @ A @ w).backward()
    opt.step()
    P = adam_preconditioner(opt, [w])
    torch.testing.assert_close(before - w.detach(), 0.01 * opt.state[w]["exp_avg"] / P)


def test_adam_threshold_is_the_edge_of_frozen_preconditioner_adam():
    """EMA momentum with Adam's frozen P on a quadratic whose lambda_max(P^-1 H) sits just
    below / above the threshold (measured by Lanczos on the symmetric form)."""
    w, A, opt = _adam_after_steps(lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    P = adam_preconditioner(opt, [w])
    T = stability_thresholds(opt)
    assert T["preconditioned"] and T["threshold"] == pytest.approx(38 / 0.01)
    top = float(lanczos(PreconditionedOperator(A, P), tol=1e-12).values[0])
    exact = torch.linalg.eigvals(torch.diag(1 / P) @ A).real.max()
    assert top == pytest.approx(float(exact), rel=1e-10)

    def run(scale, steps=3000):
        H, x, m = scale * T["threshold"] / top * A, torch.ones(6, dtype=torch.float64), 0
        for _ in range(steps):
            m = 0.9 * m + 0.1 * (H @ x)
            x = x - 0.01 * m / P
        return float(x.norm())

    assert run(0.98) < 1e-6 and not run(1.02) < 1e6  # diverges (to inf or nan)


def test_sam_edge_is_where_one_sam_step_stops_shrinking_w():
    """L = lam w^2 / 2 with |g| = lam |w| held at g: SAM's step maps w to -w exactly at the
    edge (w' = w - eta lam (w + rho sign w)), shrinks |w| below it and grows it above."""
    lr, rho, g = 0.1, 0.05, 0.7
    edge = sam_edge(lr, rho, g)
    assert edge < 2 / lr and sam_edge(lr, 1e-9, g) == pytest.approx(2 / lr)

    def after(lam):
        w = torch.tensor([g / lam], dtype=torch.float64, requires_grad=True)
        opt = SAM([w], torch.optim.SGD, rho=rho, lr=lr)
        assert stability_thresholds(opt, g)["sam_edge"] == pytest.approx(edge)

        def closure():
            opt.zero_grad()
            loss = 0.5 * lam * (w**2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return abs(w.item()) / (g / lam)

    assert after(edge) == pytest.approx(1.0, abs=1e-9)
    assert after(0.999 * edge) < 1 < after(1.001 * edge)


def test_sam_reads_momentum_and_marks_asam_and_adam_edges_unknown():
    w = [torch.zeros(2, requires_grad=True)]
    sam = SAM(w, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    out = stability_thresholds(sam, 2.0)
    assert out["threshold"] == pytest.approx(38.0)
    assert out["sam_edge"] == pytest.approx(sam_edge(0.1, 0.1, 2.0, 38.0))
    assert math.isnan(stability_thresholds(sam)["sam_edge"])
    asam = SAM(w, torch.optim.SGD, rho=0.5, adaptive=True, lr=0.1)
    assert math.isnan(stability_thresholds(asam, 2.0)["sam_edge"])
    over_adam = SAM(w, torch.optim.Adam, rho=0.05, lr=1e-3)
    assert over_adam.base_optimizer and stability_thresholds(over_adam, 2.0)["preconditioned"]


def test_refusals():
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="no stability threshold is known for RMSprop"):
        stability_thresholds(torch.optim.RMSprop([w]))
    v = torch.zeros(2, requires_grad=True)
    groups = [{"params": [w], "lr": 0.1}, {"params": [v], "lr": 0.2}]
    with pytest.raises(ValueError, match="param groups differ in lr"):
        stability_thresholds(torch.optim.SGD(groups))
    with pytest.raises(ValueError, match="no Adam state"):
        adam_preconditioner(torch.optim.Adam([w]), [w])
