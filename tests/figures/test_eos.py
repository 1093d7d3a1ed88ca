"""The edge-of-stability study (``figures.eos``, ``saf eos``) against exact answers."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from cli import main
from figures.eos import (
    EosRun,
    EosSettings,
    digits_subset,
    run_summary,
    square_loss,
    tanh_mlp,
    train_run,
)

TINY = EosSettings(n_samples=20, width=4, runs=(EosRun(0.1, 2),), every=1)


def _gd_final_loss(lr: float, X: torch.Tensor, Y: torch.Tensor, steps: int = 300) -> float:
    model = nn.Linear(X.shape[1], Y.shape[1], bias=False).double()
    nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        square_loss(model(X), Y).backward()
        opt.step()
    return float(square_loss(model(X), Y).detach())


def test_square_loss_threshold_on_a_linear_model():
    # f = W x with 1/2 |f - y|^2 averaged over N: H = X^T X / N (per output), so full-batch
    # GD converges for lr < 2 / lambda_max and diverges for lr > 2 / lambda_max.
    X, _ = digits_subset(50, "mse")
    X = X.double()
    Y = torch.randn(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lam = float(torch.linalg.eigvalsh(X.T @ X / len(X))[-1])
    converged = _gd_final_loss(0.95 * 2 / lam, X, Y)
    assert converged < square_loss(torch.zeros_like(Y), Y)
    assert not _gd_final_loss(1.05 * 2 / lam, X, Y) < 1e6


def test_measured_lambda_max_is_the_dense_hessians_top_eigenvalue():
    df = train_run(TINY.runs[0], TINY)
    assert list(df["step"]) == [0, 1, 2] and (df["threshold"] == 20).all()
    x, y = (t.double() for t in digits_subset(TINY.n_samples, "mse"))
    model = tanh_mlp(TINY.width, TINY.seed).double()
    names = [n for n, _ in model.named_parameters()]
    for step in range(3):  # the oracle: float64 dense Hessian, GD replayed by hand
        w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        H = hessian(lambda v: square_loss(functional_call(model, _unflat(v, model, names), x),
                                          y))(w)  # fmt: skip
        lam = float(torch.linalg.eigvalsh(H)[-1])
        assert df["lambda_1"][step] == pytest.approx(lam, rel=2e-3)
        model.zero_grad()
        square_loss(model(x), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= TINY.runs[0].lr * p.grad
    again = train_run(TINY.runs[0], TINY)
    assert df.drop(columns="seconds").equals(again.drop(columns="seconds"))  # deterministic


def _unflat(v, model, names):
    out, i = {}, 0
    for n, p in zip(names, model.parameters(), strict=True):
        out[n] = v[i : i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out


def test_run_summary_on_a_known_trajectory():
    lam = [10.0, 30.0, 45.0, 52.0, 49.0, 51.0]  # 2/lr = 50: 90% first at step 20
    df = pd.DataFrame({"step": range(0, 60, 10), "lambda_1": lam, "threshold": 50.0,
                       "sam_edge": math.nan, "lr": 0.04, "loss": [5, 4, 3, 3.5, 2, 1.0],
                       "run": "gd", "optimizer": "gd", "loss_fn": "mse", "rho": 0.0,
                       "planned_steps": 50})  # fmt: skip
    s = run_summary(df)
    assert s["step_at_edge"] == 20 and not s["diverged"]
    assert s["median_ratio_after"] == pytest.approx(1.0)  # median of .9, 1.04, .98, 1.02
    assert s["max_ratio_after"] == pytest.approx(1.04) and s["share_above_after"] == 0.5
    assert s["loss_rises_after"] == 1 and s["verdict"] == "at the edge"
    flat = run_summary(df.assign(lambda_1=10.0))
    assert flat["step_at_edge"] is None and flat["verdict"] == "below the edge"
    rising = run_summary(df.assign(lambda_1=[10.0, 11, 12, 13, 14, 15]))
    assert (
        rising["lambda_trend_end"] == pytest.approx(10.0)
        and rising["verdict"] == "still sharpening"
    )


def test_quick_command_end_to_end(tmp_path, capsys):
    assert main(["eos", "--out", str(tmp_path), "--quick", "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
    df = pd.read_csv(tmp_path / "eos.csv")
    assert set(df["optimizer"]) == {"gd", "sam"} and set(df["loss_fn"]) == {"mse", "ce"}
    sam = df[df["optimizer"] == "sam"]
    assert (sam["sam_edge"] < sam["threshold"]).all()  # SAM's edge lies below 2/lr
    assert (tmp_path / "figures" / "edge_of_stability.png").stat().st_size > 10_000
    summary = pd.read_csv(tmp_path / "tables" / "eos_summary.csv")
    text = (tmp_path / "findings.md").read_text()
    assert all(f"**{run}**" in text for run in summary["run"])


def test_refusals_are_one_line_and_write_nothing(tmp_path, capsys):
    file = tmp_path / "a-file"
    file.write_text("")
    assert main(["eos", "--out", str(file), "--quick"]) == 2
    assert main(["eos", "--out", str(tmp_path / "new"), "--device", "nowhere"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("saf eos: error:") for line in err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
