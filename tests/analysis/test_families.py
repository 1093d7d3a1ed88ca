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


def test_surface_interpolate_pca_and_hessian_on_foreign_checkpoints(tmp_path, capsys):
    """Three checkpoints of a regressor of one's own: the line between two files (its ends are
    the two models' own losses), the PCA plane of the folder, a Hessian direction."""
    factory, data_fn, _ = FAMILIES["regressor"]
    folder = tmp_path / "ckpts"
    models = []
    for e in (1, 2, 3):
        models.append(factory())
        g = torch.Generator().manual_seed(e)
        with torch.no_grad():
            for p in models[-1].parameters():
                p.add_(torch.randn(p.shape, generator=g))
        atomic_torch_save({"state_dict": models[-1].state_dict()}, folder / f"ep{e}.pt")
    own = ["--model", "tests.analysis._families:regressor", "--data",
           "tests.analysis._families:regressor_data", "--loss", "mse", "--no-plots",
           "--no-progress"]  # fmt: skip
    data = data_fn()
    n = sum(batch_size(b) for b in data)

    def own_loss(m):
        with torch.no_grad():
            return sum(batch_size(b) / n * float(F.mse_loss(m(b[0]), b[1])) for b in data)

    cases = [
        ["--directions", "interpolate", "--dim", "1", "--grid", "0:1:2",
         "--compare", str(folder / "ep3.pt"), str(folder / "ep1.pt")],
        ["--directions", "pca", "--dim", "2", "--grid", "-1:1:3", str(folder)],
        ["--directions", "hessian", "--dim", "1", "--grid", "-1:1:3", str(folder)],
    ]  # fmt: skip
    for extra in cases:
        target = extra.pop()
        rc = main(["surface", target, *own, *extra, "--out", str(tmp_path / extra[1])])
        captured = capsys.readouterr()
        assert rc == 0, captured.err
        (summary,) = json.loads(captured.out.strip().splitlines()[-1]).values()
        if extra[1] == "interpolate":  # grid 0, 1: ep1 (the target) and ep3 (the end point)
            s = __import__("landscape").Surface.load(next((tmp_path / "interpolate").glob("*.npz")))
            assert s.loss[0] == pytest.approx(own_loss(models[0]), rel=1e-5)
            assert s.loss[1] == pytest.approx(own_loss(models[2]), rel=1e-5)
        else:  # centred on the last checkpoint of the folder
            assert summary["centre_loss"] == pytest.approx(own_loss(models[2]), rel=1e-5)
    assert list((tmp_path / "pca").glob("*_pca.json"))


def test_a_checkpoint_that_fails_at_run_time_is_a_named_skip(tmp_path, capsys, monkeypatch):
    """The model's forward raises for one checkpoint (here: a weight marked as poisoned):
    that file is named and skipped, the others are analysed, exit 3, no traceback."""
    import tests.analysis._families as fam

    class Fragile(torch.nn.Linear):
        def forward(self, x):
            if float(self.bias.detach()[0]) == 123.0:
                raise RuntimeError("this checkpoint breaks the forward")
            return super().forward(x)

    monkeypatch.setattr(fam, "fragile", lambda: Fragile(5, 1), raising=False)
    folder = tmp_path / "ckpts"
    for e, b in ((1, 0.5), (2, 123.0), (3, 0.25)):
        m = Fragile(5, 1)
        with torch.no_grad():
            m.bias.fill_(b)
        atomic_torch_save(m.state_dict(), folder / f"epoch_{e}.pt")
    own = ["--model", "tests.analysis._families:fragile", "--data",
           "tests.analysis._families:regressor_data", "--loss", "mse"]  # fmt: skip
    rc = main(["analyze", str(folder), *own, "--metrics", "loss,trace", "--trace-matvecs", "6",
               "--out", str(tmp_path / "t.csv"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 3 and "Traceback" not in err, err
    named = [line for line in err.strip().splitlines() if "epoch_2.pt" in line]
    assert len(named) == 1 and "breaks the forward" in named[0], err
    table = __import__("pandas").read_csv(tmp_path / "t.csv")
    assert (table[table.epoch != 2].status == "ok").all()
