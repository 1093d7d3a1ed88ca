"""m-sharpness against closed forms on a quadratic (linear model + MSE), float64."""

import math

import pytest
import torch
from torch import nn

from analysis import m_sharpness, sam_sharpness
from tests.analysis._models import batches, mlp

MSE = nn.MSELoss()


@pytest.fixture
def linear():
    g = torch.Generator().manual_seed(7)
    X = torch.randn(24, 5, generator=g, dtype=torch.float64)
    y = torch.randn(24, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(5, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 5, generator=g, dtype=torch.float64))
    return model, X, y


def _quad(model, X, y):
    """Gradient and Hessian of mean((Xw - y)^2) at the model's w."""
    w = model.weight.detach().reshape(-1)
    r = X @ w - y.reshape(-1)
    return 2 * X.T @ r / len(X), 2 * X.T @ X / len(X)


def _closed_form(model, X, y, m, delta_fn):
    vals = []
    for i in range(0, len(X), m):
        g, H = _quad(model, X[i : i + m], y[i : i + m])
        d = delta_fn(g)
        vals.append(float(g @ d + 0.5 * d @ H @ d))
    mean = sum(vals) / len(vals)
    n = len(vals)
    se = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1) / n) if n > 1 else math.nan
    return mean, se


@pytest.mark.parametrize("m", [4, 8, 24])
def test_one_step_worst_case_equals_closed_form(linear, m):
    model, X, y = linear
    data = [(X[:10], y[:10]), (X[10:], y[10:])]  # re-cut into batches of m
    rho = 0.3
    r = m_sharpness(model, MSE, data, rho=rho, m=m)
    mean, se = _closed_form(model, X, y, m, lambda g: rho * g / g.norm())
    assert r.n_batches == 24 // m
    assert r.value == pytest.approx(mean, rel=1e-10)
    if m < 24:
        assert r.stderr == pytest.approx(se, rel=1e-8)


def test_adaptive_and_linf_one_step(linear):
    model, X, y = linear
    w = model.weight.detach().reshape(-1).abs()
    r = m_sharpness(model, MSE, [(X, y)], rho=0.2, m=6, adaptive=True)
    ref, _ = _closed_form(model, X, y, 6, lambda g: 0.2 * w**2 * g / (w * g).norm())
    assert r.value == pytest.approx(ref, rel=1e-10)
    r = m_sharpness(model, MSE, [(X, y)], rho=0.2, m=6, norm="linf")
    ref, _ = _closed_form(model, X, y, 6, lambda g: 0.2 * g.sign())
    assert r.value == pytest.approx(ref, rel=1e-10)


def test_more_ascent_steps_approach_the_exact_maximum(linear):
    """On a quadratic the ball maximum solves a trust-region problem; compare to a dense search."""
    model, X, y = linear
    rho = 1.0
    g, H = _quad(model, X[:8], y[:8])
    # exact max over ||d|| <= rho of g.d + d.H.d/2 via the secular equation (H is PSD: boundary)
    lam, U = torch.linalg.eigh(H)
    c = U.T @ g
    lo, hi = float(lam[-1]) + 1e-12, float(lam[-1]) + 1e6
    for _ in range(200):  # ||(mu - H)^{-1} g|| = rho, mu > lam_max
        mu = (lo + hi) / 2
        lo, hi = (mu, hi) if float((c / (mu - lam)).norm()) > rho else (lo, mu)
    d = U @ (c / (mu - lam))
    exact = float(g @ d + 0.5 * d @ H @ d)
    one = m_sharpness(model, MSE, [(X[:8], y[:8])], rho=rho, steps=1).value
    many = m_sharpness(model, MSE, [(X[:8], y[:8])], rho=rho, steps=100, step_size=0.5).value
    assert one <= many + 1e-12 <= exact + 1e-9
    assert many == pytest.approx(exact, rel=1e-4)
    assert exact - one > 1e-3  # the test can tell one step from many
    default = m_sharpness(model, MSE, [(X[:8], y[:8])], rho=rho, steps=10).value
    assert one <= default <= exact + 1e-9


def test_average_case_converges_to_half_rho_squared_trace(linear):
    model, X, y = linear
    rho, draws = 0.1, 4000
    r = m_sharpness(model, MSE, [(X, y)], rho=rho, m=24, kind="average", n_draws=draws, seed=3)
    g, H = _quad(model, X, y)
    exact = 0.5 * rho**2 * float(H.trace())
    sd = math.sqrt(rho**2 * float(g @ g) + 0.5 * rho**4 * float((H**2).sum()))
    assert abs(r.value - exact) < 4 * sd / math.sqrt(draws)
    few = m_sharpness(model, MSE, [(X, y)], rho=rho, m=24, kind="average", n_draws=4, seed=3)
    assert abs(few.value - exact) > abs(r.value - exact)


def test_average_case_linf_draws_uniformly_in_the_box(linear):
    """Uniform noise on [-rho, rho]^d has variance rho^2/3 per coordinate: E = rho^2 tr(H)/6."""
    model, X, y = linear
    rho, draws = 0.1, 4000
    kw = dict(rho=rho, m=24, kind="average", n_draws=draws, seed=3)
    r = m_sharpness(model, MSE, [(X, y)], norm="linf", **kw)
    g, H = _quad(model, X, y)
    exact = rho**2 * float(H.trace()) / 6
    sd = math.sqrt(rho**2 / 3 * float(g @ g) + 0.5 * rho**4 * float((H**2).sum()))
    assert abs(r.value - exact) < 4 * sd / math.sqrt(draws)
    gaussian = m_sharpness(model, MSE, [(X, y)], norm="l2", **kw).value
    assert abs(gaussian - 3 * exact) < 4 * 3 * sd / math.sqrt(draws)


def test_bn_eval_and_weights_restored_bitwise():
    model, data = mlp(bn=True).train(), batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = m_sharpness(model, nn.CrossEntropyLoss(), data, rho=0.05, m=5, steps=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training
    ref = m_sharpness(model.eval(), nn.CrossEntropyLoss(), data, rho=0.05, m=5, steps=3)
    assert r.value == ref.value and r.n_batches == 4


def test_sam_sharpness_uses_the_given_batches():
    model, data = mlp(), batches((7, 5, 8))
    r = sam_sharpness(model, nn.CrossEntropyLoss(), data)
    assert r.n_batches == 3
    assert r.value == m_sharpness(model, nn.CrossEntropyLoss(), data, 0.05, None).value


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rho": 0}, "rho"),
        ({"m": 0}, "m must"),
        ({"kind": "best"}, "kind"),
        ({"norm": "l1"}, "norm"),
        ({"steps": 0}, "steps"),
        ({"m": 100}, "no batch"),
    ],
)
def test_validation(kwargs, match):
    args = {"rho": 0.05, "m": 4} | kwargs
    with pytest.raises(ValueError, match=match):
        m_sharpness(mlp(), nn.CrossEntropyLoss(), batches((7, 5, 8)), **args)
