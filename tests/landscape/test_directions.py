"""Directions: filter-normalization invariants, interpolation, PCA against known planes."""

import numpy as np
import pytest
import torch
from torch import nn

import landscape as L


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=True),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    )


def test_filter_norm_matches_each_filter_and_zeroes_biasbn():
    model = _cnn()
    d = L.random_direction(model, norm="filter", ignore="biasbn", seed=3)
    for name, w in model.named_parameters():
        if w.dim() <= 1:
            assert torch.count_nonzero(d[name]) == 0, name
        else:
            dn = d[name].flatten(1).norm(dim=1)
            wn = w.detach().flatten(1).norm(dim=1)
            torch.testing.assert_close(dn, wn, rtol=1e-5, atol=0)
    assert set(d) == {n for n, _ in model.named_parameters()}  # buffers untouched by default


def test_ignore_none_sets_1d_to_w_and_buffers_optional():
    model = _cnn()
    model[1].running_mean.fill_(0.5)
    d = L.random_direction(model, ignore=None, seed=0, include_buffers=True)
    assert torch.equal(d["0.bias"], model[0].bias.detach())
    assert torch.equal(d["1.weight"], model[1].weight.detach())
    assert torch.equal(d["1.running_mean"], model[1].running_mean)
    assert "1.num_batches_tracked" not in d


def test_direction_is_gaussian_before_normalization_and_seeded():
    lin = nn.Linear(1000, 3)
    raw = L.random_direction(lin, norm="none", seed=7)["weight"]
    assert abs(float(raw.mean())) < 0.05 and abs(float(raw.std()) - 1) < 0.05
    assert abs(float((raw**4).mean()) - 3) < 0.3  # Gaussian kurtosis, uniform would be 1.8
    assert torch.equal(raw, L.random_direction(lin, norm="none", seed=7)["weight"])
    assert not torch.equal(raw, L.random_direction(lin, norm="none", seed=8)["weight"])


def test_layer_and_model_norms():
    model = _cnn()
    w = L.model_weights(model)
    dl = L.random_direction(model, norm="layer", seed=1)
    for k in ("0.weight", "4.weight"):
        torch.testing.assert_close(dl[k].norm(), w[k].norm(), rtol=1e-5, atol=0)
    dm = L.random_direction(model, norm="model", seed=1)
    big = [k for k in w if w[k].dim() > 1]
    total = lambda t: torch.sqrt(sum((t[k] ** 2).sum() for k in big))  # noqa: E731
    torch.testing.assert_close(total(dm), total(w), rtol=1e-5, atol=0)


def test_zero_filter_gives_zero_not_nan():
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight[0] = 0
    d = L.random_direction(lin, seed=0)
    assert torch.isfinite(d["weight"]).all() and torch.count_nonzero(d["weight"][0]) == 0


def test_bad_norm_raises():
    with pytest.raises(ValueError, match="norm"):
        L.random_direction(nn.Linear(2, 2), norm="filters")
    with pytest.raises(ValueError, match="ignore"):
        L.random_direction(nn.Linear(2, 2), ignore="bn")


def test_interpolation_directions_reach_each_checkpoint():
    a, b, c = ({"w": torch.randn(3, 2), "n": torch.tensor(4)} for _ in range(3))
    d1, d2 = L.interpolation_directions(a, b, c)
    torch.testing.assert_close(a["w"] + d1["w"], b["w"])
    torch.testing.assert_close(a["w"] + d2["w"], c["w"])
    assert "n" not in d1  # integer buffers are not interpolated
    with pytest.raises(ValueError, match="2 or 3"):
        L.interpolation_directions(a)


def test_pca_recovers_known_plane_and_exact_projections():
    g = torch.Generator().manual_seed(0)
    P = 50
    basis, _ = torch.linalg.qr(torch.randn(P, 2, dtype=torch.float64, generator=g))
    origin = torch.randn(P, dtype=torch.float64, generator=g)
    ab = torch.randn(8, 2, dtype=torch.float64, generator=g) * torch.tensor([3.0, 1.0])
    ab[-1] = 0  # the last checkpoint is the origin
    traj = [{"w": (origin + basis @ c).reshape(5, 10)} for c in ab]
    res = L.pca_directions(traj, keys=["w"])
    V = torch.stack([d["w"].reshape(-1) for d in res.directions], 1)
    # Same plane: projector onto span(V) equals projector onto span(basis).
    torch.testing.assert_close(V @ V.T, basis @ basis.T, atol=1e-10, rtol=0)
    torch.testing.assert_close(V.T @ V, torch.eye(2, dtype=torch.float64), atol=1e-12, rtol=0)
    # Exact least-squares coordinates: solve the normal equations as an oracle.
    A = torch.stack([t["w"].reshape(-1) - origin for t in traj])
    oracle = torch.linalg.lstsq(V, A.T).solution.T
    np.testing.assert_allclose(res.coords, oracle.numpy(), atol=1e-10)
    np.testing.assert_allclose(res.residuals, 0, atol=1e-6)
    np.testing.assert_allclose(res.explained_variance_ratio.sum(), 1.0, atol=1e-12)
    assert res.explained_variance_ratio[0] > res.explained_variance_ratio[1]


def test_pca_off_plane_residuals_and_variance():
    g = torch.Generator().manual_seed(1)
    traj = [{"w": torch.randn(20, dtype=torch.float64, generator=g)} for _ in range(6)]
    res = L.pca_directions(traj, keys=["w"])
    deltas = torch.stack([t["w"] - traj[-1]["w"] for t in traj])
    s = torch.linalg.svdvals(deltas)
    np.testing.assert_allclose(res.explained_variance_ratio, (s[:2] ** 2 / (s**2).sum()).numpy())
    V = torch.stack([d["w"] for d in res.directions], 1)
    resid = (deltas.T - V @ (V.T @ deltas.T)).norm(dim=0)
    np.testing.assert_allclose(res.residuals, resid.numpy(), atol=1e-8)
    assert res.residuals[:-1].min() > 0.1


def test_pca_needs_enough_checkpoints():
    with pytest.raises(ValueError, match="at least 3"):
        L.pca_directions([{"w": torch.zeros(3)}] * 2, keys=["w"])


def test_hessian_directions_match_dense_eigenvectors():
    # Linear model with MSE: H = 2 X^T X / N (closed form); compare up to sign.
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 5, dtype=torch.float64, generator=g) * torch.arange(1, 6)
    model = nn.Linear(5, 1, bias=False).double()
    data = [
        (X[:25], torch.zeros(25, 1, dtype=torch.float64)),
        (X[25:], torch.zeros(15, 1, dtype=torch.float64)),
    ]
    dirs, evals = L.hessian_directions(model, nn.MSELoss(), data, k=2, tol=1e-10)
    w, V = torch.linalg.eigh(2 * X.T @ X / 40)
    np.testing.assert_allclose(evals, w.flip(0)[:2].numpy(), rtol=1e-8)
    for d, v in zip(dirs, V.flip(1).T[:2], strict=True):
        cos = float(d["weight"].reshape(-1) @ v)
        assert abs(abs(cos) - 1) < 1e-8
