"""Every family of model against a dense float64 oracle, through the API and the command line."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from analysis import atomic_torch_save, hessian_eigenvalues, hessian_trace, loss_function
from analysis.batches import Call, batch_size, to
from cli import main
from tests.analysis._families import FAMILIES


def _double(batches):
    return [to(b, dtype=torch.float64) for b in batches]


def dense_hessian(model, loss_fn, data):
    """Oracle: the dense Hessian of the size-weighted mean loss (``torch.autograd.functional``;
    under ``torch.func`` the Transformer's Hessian disagrees with finite differences, see
    :func:`test_the_transformer_oracle_agrees_with_finite_differences`)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
    buffers = dict(model.named_buffers())
    n_total = sum(batch_size(b) for b in data)

    def total(flat):
        parts = torch.split(flat, [s.numel() for s in shapes])
        params = {n: p.view(s) for n, p, s in zip(names, parts, shapes, strict=True)}
        return sum(
            batch_size(b) / n_total * loss_fn(Call()(model, b, {**buffers, **params}), b[1])
            for b in data
        )

    with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
        return torch.autograd.functional.hessian(total, theta)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lambda_max_and_trace_match_the_dense_oracle(family):
    factory, data_fn, loss = FAMILIES[family]
    model, data, loss_fn = factory().double(), _double(data_fn()), loss_function(loss)
    H = dense_hessian(model, loss_fn, data)
    ev = torch.linalg.eigvalsh(H)
    r = hessian_eigenvalues(model, loss_fn, data, tol=1e-10)
    assert float(r.values[0]) == pytest.approx(float(ev[-1]), rel=1e-7)
    t = hessian_trace(model, loss_fn, data, n_matvecs=3 * H.shape[0])  # Hutch++: exact here
    assert t.value == pytest.approx(float(H.trace()), rel=1e-8, abs=1e-10)


def test_the_transformer_oracle_agrees_with_finite_differences():
    factory, data_fn, loss = FAMILIES["transformer"]
    model, data, loss_fn = factory().double(), _double(data_fn()), loss_function(loss)
    H = dense_hessian(model, loss_fn, data)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
    n_total = sum(batch_size(b) for b in data)

    def grad(flat):
        flat = flat.detach().requires_grad_(True)
        parts = torch.split(flat, [s.numel() for s in shapes])
        params = {n: p.view(s) for n, p, s in zip(names, parts, shapes, strict=True)}
        loss = sum(batch_size(b) / n_total * loss_fn(Call()(model, b, params), b[1]) for b in data)
        return torch.autograd.grad(loss, flat)[0]

    v = torch.randn(len(theta), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fd = (grad(theta + 1e-5 * v) - grad(theta - 1e-5 * v)) / 2e-5
    torch.testing.assert_close(H @ v, fd, rtol=1e-6, atol=1e-7)


def test_the_linear_regressor_hessian_is_two_xtx_over_n():
    factory, data_fn, _ = FAMILIES["regressor"]
    model, data = factory().double(), _double(data_fn())
    X = torch.cat([torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) for x, _ in data])
    closed = torch.linalg.eigvalsh(2 * X.T @ X / len(X))
    r = hessian_eigenvalues(model, F.mse_loss, data, k=2, tol=1e-12)
    torch.testing.assert_close(r.values, closed.flip(0)[:2], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_analyze_and_surface_from_the_command_line(family, tmp_path, capsys):
    """Two checkpoints of the family in a folder of their own; `saf analyze` gives the
    oracle's lambda_max, and the centre of `saf surface` is the model's own loss."""
    factory, data_fn, loss = FAMILIES[family]
    folder = tmp_path / "ckpts"
    model = factory()
    for e in (1, 2):
        atomic_torch_save({"model_state_dict": model.state_dict(), "epoch": e},
                          folder / f"{family}-epoch={e}.pt")  # fmt: skip
    mod = "tests.analysis._families"
    own = ["--model", f"{mod}:{family}", "--data", f"{mod}:{family}_data", "--loss", loss]
    out = tmp_path / "t.csv"
    rc = main(["analyze", str(folder), *own, "--metrics", "loss,lambda_max", "--dtype",
               "float64", "--tol", "1e-10", "--out", str(out), "--no-progress"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    table = json.loads(__import__("pandas").read_csv(out).to_json(orient="records"))
    lam = [r["value"] for r in table if r["metric"] == "lambda_max"]
    H = dense_hessian(factory().double(), loss_function(loss), _double(data_fn()))
    assert lam[0] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-6)
    rc = main(["surface", str(folder), *own, "--dim", "1", "--grid", "-1:1:3", "--no-plots",
               "--no-progress", "--out", str(tmp_path / "s")])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = next(iter(json.loads(captured.out.strip().splitlines()[-1]).values()))
    data = data_fn()
    n = sum(batch_size(b) for b in data)
    with torch.no_grad():
        own_loss = sum(batch_size(b) / n * float(loss_function(loss)(Call()(model, b), b[1]))
                       for b in data)  # fmt: skip
    assert summary["centre_loss"] == pytest.approx(own_loss, rel=1e-5)


def test_a_loss_that_does_not_fit_is_one_line_before_any_work(tmp_path, capsys):
    """Cross-entropy on a regressor's one-column output: refused, nothing written."""
    factory, _, _ = FAMILIES["regressor"]
    folder = tmp_path / "ckpts"
    atomic_torch_save(factory().state_dict(), folder / "epoch_1.pt")
    own = ["--model", "tests.analysis._families:regressor",
           "--data", "tests.analysis._families:regressor_data"]  # fmt: skip
    for cmd in (["analyze", str(folder), *own, "--out", str(tmp_path / "t.csv")],
                ["surface", str(folder), *own, "--out", str(tmp_path / "s")]):  # fmt: skip
        assert main([*cmd, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cross-entropy needs class scores" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpts"]
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_1.pt"]
