"""SharpnessMonitor: invisible to the training run (bitwise), exact against eigsh at every
measured step, warm starts that save products, and a CSV that matches its rows."""

import csv
import random

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from analysis import GGNOperator, adam_preconditioner
from analysis.monitor import SharpnessMonitor
from saf import SAM
from tests.analysis._models import batches, dense_hessian


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.2), nn.Linear(6, 3)
    ).double()


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01),
    "sam": lambda ps: SAM(ps, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9),
}
MEASURED = {
    "sgd": ("lambda_max", "trace", "sam_sharpness"),
    "adamw": ("lambda_max", "preconditioned"),
    "sam": ("lambda_max",),
}


def _train(kind, monitor_kwargs=None, steps=7):
    """A loop that draws its data and dropout masks from the global generators; with
    ``monitor_kwargs`` a monitor is called after every step (and checks the grads)."""
    torch.manual_seed(1)
    model, loss_fn = _net(), nn.CrossEntropyLoss()
    opt = OPTIMIZERS[kind](model.parameters())
    monitor = None
    if monitor_kwargs is not None:  # a shuffling loader: reading it draws from torch's RNG
        X, Y = (torch.cat(t) for t in zip(*batches(), strict=True))
        probe = DataLoader(TensorDataset(X, Y), batch_size=7, shuffle=True)
        monitor = SharpnessMonitor(model, loss_fn, probe, optimizer=opt, **monitor_kwargs)
    model.train()
    for step in range(1, steps + 1):
        x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        if kind == "sam":
            opt.first_step(zero_grad=True)
            loss_fn(model(x), y).backward()
            opt.second_step()
        else:
            opt.step()
        if monitor is not None:
            grads = [p.grad.clone() for p in model.parameters()]
            monitor(step, epoch=0)
            assert all(
                torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True)
            )
            assert model.training and all(m.training for m in model.modules())
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1])
    return model, opt, rng, monitor


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_the_monitored_run_is_bitwise_the_unmonitored_run(kind, tmp_path):
    plain = _train(kind)
    kwargs = dict(every=2, measures=MEASURED[kind], k=2, csv=tmp_path / "m.csv",
                  trace_matvecs=6)  # fmt: skip
    watched = _train(kind, kwargs)
    for a, b in [(plain[0].state_dict(), watched[0].state_dict())]:
        assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = plain[1].state_dict()["state"], watched[1].state_dict()["state"]
    assert all(torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k]))
               for i in sa for k in sa[i])  # fmt: skip
    assert torch.equal(plain[2][0], watched[2][0]) and plain[2][1] == watched[2][1]
    assert np.array_equal(plain[2][2], watched[2][2])
    monitor = watched[3]
    assert [r["step"] for r in monitor.rows] == [2, 4, 6]
    with open(tmp_path / "m.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert float(rows[-1]["lambda_1"]) == monitor.rows[-1]["lambda_1"]
    assert list(tmp_path.iterdir()) == [tmp_path / "m.csv"]  # no temporary file left


def test_lambda_max_equals_eigsh_at_every_measured_step():
    """Top-2 Hessian eigenvalues of a BatchNorm model in eval mode, against scipy's eigsh on
    the dense float64 Hessian, at each of the measured steps of an SGD run."""
    torch.manual_seed(0)
    model, loss_fn, data = _net(), nn.CrossEntropyLoss(), batches()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    monitor = SharpnessMonitor(model, loss_fn, data, every=3, k=2, tol=1e-10, optimizer=opt)
    measured = 0
    for step in range(1, 10):
        model.train()
        opt.zero_grad()
        x, y = data[step % 3]
        loss_fn(model(x), y).backward()
        opt.step()
        row = monitor(step)
        if row is None:
            continue
        measured += 1
        H = dense_hessian(model, loss_fn, data).numpy()
        exact = np.sort(scipy.sparse.linalg.eigsh(H, k=2, which="LA")[0])[::-1]
        assert [row["lambda_1"], row["lambda_2"]] == pytest.approx(exact, rel=1e-8)
        assert row["threshold"] == pytest.approx(2 / 0.2) and row["lr"] == 0.2
    assert measured == 3


def test_warm_start_takes_fewer_products_than_cold():
    """At the same weights, the warm measurement converges in fewer products."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    data = batches(sizes=(32, 32), d=10, classes=4)
    counts = {}
    for warm in (True, False):
        monitor = SharpnessMonitor(model, nn.CrossEntropyLoss(), data, every=1, warm=warm)
        counts[warm] = [monitor(s)["lambda_matvecs"] for s in range(3)]
    assert counts[False] == [counts[False][0]] * 3  # cold: the same solve every time
    assert counts[True][0] == counts[False][0] and max(counts[True][1:]) < counts[False][0]


def test_a_warm_product_budget_gives_lower_bounds_that_converge_to_eigsh():
    """``warm_max_iter=2``: each warm measurement uses two products and, at fixed weights, is
    a lower bound on the dense Hessian's top eigenvalue that climbs to it from a rough cold
    start (restarted Lanczos across measurements)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    data = batches(sizes=(32, 32), d=10, classes=4)
    loss_fn = nn.CrossEntropyLoss()
    exact = scipy.sparse.linalg.eigsh(dense_hessian(model, loss_fn, data).numpy(), k=1)[0][0]
    monitor = SharpnessMonitor(model, loss_fn, data, every=1, tol=1e-10, max_iter=4,
                               warm_max_iter=2)  # fmt: skip
    rows = [monitor(s) for s in range(12)]  # max_iter=4: a rough cold start to refine
    assert rows[0]["lambda_matvecs"] == 4 and all(r["lambda_matvecs"] == 2 for r in rows[1:])
    values = [r["lambda_1"] for r in rows]
    assert all(v <= exact * (1 + 1e-12) for v in values) and values[0] < 0.7 * exact
    # the warm start's 10% random part bounds what two products per restart can reach
    assert values[-1] == pytest.approx(exact, rel=1e-3)


def test_ggn_curvature_and_adam_preconditioned_sharpness():
    model, loss_fn, data = _net(), nn.CrossEntropyLoss(), batches()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for x, y in data:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    measures = ("lambda_max", "preconditioned")
    monitor = SharpnessMonitor(model, loss_fn, data, every=1, measures=measures, optimizer=opt,
                               curvature="ggn", tol=1e-10)  # fmt: skip
    row = monitor(1)
    G = GGNOperator(model, loss_fn, data).to_dense()
    assert row["lambda_1"] == pytest.approx(float(torch.linalg.eigvalsh(G)[-1]), rel=1e-8)
    P = adam_preconditioner(opt, list(model.parameters()))
    exact = torch.linalg.eigvals(torch.diag(1 / P) @ G).real.max()
    assert row["preconditioned_sharpness"] == pytest.approx(float(exact), rel=1e-8)
    assert row["threshold"] == pytest.approx(38 / 0.01)


def test_random_products_leave_the_generators_as_they_were():
    """Train-mode products with dropout draw masks from torch's generator: put back after."""
    model, data = _net(), batches()
    monitor = SharpnessMonitor(model, nn.CrossEntropyLoss(), data, mode="train", max_iter=5)
    before = torch.get_rng_state()
    with pytest.warns(UserWarning, match="dropout"):
        monitor(50)
    assert torch.equal(before, torch.get_rng_state())


def test_refusals():
    model, data = _net(), batches()
    with pytest.raises(ValueError, match="measures must be some of"):
        SharpnessMonitor(model, nn.CrossEntropyLoss(), data, measures=("hessian",))
    with pytest.raises(ValueError, match="needs optimizer= an Adam"):
        SharpnessMonitor(model, nn.CrossEntropyLoss(), data, measures=("preconditioned",))
    with pytest.raises(ValueError, match="every and k"):
        SharpnessMonitor(model, nn.CrossEntropyLoss(), data, every=0)


def test_benchmark_quick_mode(tmp_path):
    """``benchmarks/monitor.py --quick`` runs and reports warm and cold products."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "monitor.py"
    spec = importlib.util.spec_from_file_location("bench_monitor", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--json", str(tmp_path / "m.json")]) == 0
    res = json.loads((tmp_path / "m.json").read_text())
    assert res["first_cold_matvecs"] > 0 and len(res["warm_matvecs"]) == 2
    assert res["cold_at_last_step"]["lambda_1"] == pytest.approx(
        res["measurements"][-1]["lambda_1"], rel=1e-2
    )
