"""GGN and empirical-Fisher operators against dense float64 oracles on tiny models."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev

from analysis import FisherOperator, GGNOperator, curvature_operator, lanczos
from analysis.losses import TokenCrossEntropy
from tests.analysis._models import batches, dense_hessian, flat_params, mlp


def _loader(model, names=None):
    """``f(flat, x) -> outputs`` with the named parameters set to ``flat`` (eval mode)."""
    names, theta = flat_params(model, names)
    state = dict(model.named_parameters())
    shapes = [state[n].shape for n in names]
    fixed = {n: t.detach() for n, t in list(state.items()) + list(model.named_buffers())
             if n not in names}  # fmt: skip

    def f(flat, x):
        parts = torch.split(flat, [s.numel() for s in shapes])
        params = {n: p.view(s) for n, p, s in zip(names, parts, shapes, strict=True)}
        return functional_call(model, {**fixed, **params}, (x,))

    return f, theta


def dense_ggn(model, loss_fn, data, names=None):
    """Oracle: sum_b n_b/N J_b^T H_out J_b, every piece by torch.func."""
    f, theta = _loader(model, names)
    N = sum(len(y) for _, y in data)
    model.eval()
    G = 0
    for x, y in data:
        out = f(theta, x)
        J = jacrev(f)(theta, x).reshape(out.numel(), -1)
        H = hessian(lambda o, out=out, y=y: loss_fn(o.view_as(out), y))(out.reshape(-1))
        G = G + len(y) / N * J.T @ H @ J
    return G


def dense_fisher(model, loss_fn, data):
    """Oracle: (1/N) sum_i g_i g_i^T with each sample's gradient on its own."""
    f, theta = _loader(model)
    model.eval()
    gs = [
        grad(lambda t, xi=xi, yi=yi: loss_fn(f(t, xi[None]), yi[None]))(theta)
        for x, y in data
        for xi, yi in zip(x, y, strict=True)
    ]
    G = torch.stack(gs)
    return G.T @ G / len(gs)


@pytest.mark.parametrize("bn", [False, True])
def test_ggn_equals_dense_oracle(bn):
    model, data = mlp(bn=bn), batches()
    G = GGNOperator(model, nn.CrossEntropyLoss(), data)
    torch.testing.assert_close(G.to_dense(), dense_ggn(model, nn.CrossEntropyLoss(), data),
                               rtol=1e-10, atol=1e-12)  # fmt: skip


def test_ggn_of_a_parameter_subset():
    model, data, names = mlp(), batches(), ["2.weight"]
    G = GGNOperator(model, nn.CrossEntropyLoss(), data, names)
    oracle = dense_ggn(model, nn.CrossEntropyLoss(), data, names)
    torch.testing.assert_close(G.to_dense(), oracle, rtol=1e-10, atol=1e-12)


def test_ggn_is_the_hessian_of_a_linear_model_with_mse():
    torch.manual_seed(0)
    model = nn.Linear(4, 2).double()
    data = [(x, torch.randn(len(x), 2, dtype=torch.float64)) for x, _ in batches()]
    G = GGNOperator(model, nn.MSELoss(), data).to_dense()
    torch.testing.assert_close(G, dense_hessian(model, nn.MSELoss(), data), rtol=1e-10, atol=1e-12)


def test_fisher_equals_dense_oracle_and_has_rank_at_most_n():
    model, data = mlp(), batches(sizes=(2, 1))
    F = FisherOperator(model, nn.CrossEntropyLoss(), data).to_dense()
    torch.testing.assert_close(F, dense_fisher(model, nn.CrossEntropyLoss(), data),
                               rtol=1e-10, atol=1e-12)  # fmt: skip
    evals = torch.linalg.eigvalsh(F)
    assert evals.min() > -1e-12 and int((evals > 1e-10 * evals.max()).sum()) == 3


def test_fisher_of_an_unnamed_loss_via_vmap():
    model, data = mlp(), batches()

    def loss(out, y):  # cross-entropy written out: no reduction="none" to call
        return -(out.log_softmax(1).gather(1, y[:, None])).mean()

    F = FisherOperator(model, loss, data).to_dense()
    torch.testing.assert_close(F, dense_fisher(model, nn.CrossEntropyLoss(), data),
                               rtol=1e-10, atol=1e-12)  # fmt: skip


@pytest.mark.parametrize("curvature", ["ggn", "fisher"])
def test_solvers_take_the_new_operators_and_the_model_is_untouched(curvature):
    model, data = mlp(bn=True), batches()
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    op = curvature_operator(curvature, model, nn.CrossEntropyLoss(), data, cache="auto")
    exact = torch.linalg.eigvalsh(op.to_dense()).flip(0)[:2]
    r = lanczos(op, k=2, tol=1e-10)
    torch.testing.assert_close(r.values, exact, rtol=1e-8, atol=1e-12)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())


def test_refusals():
    model, data = mlp(), batches()
    with pytest.raises(ValueError, match="curvature must be one of"):
        curvature_operator("kfac", model, nn.CrossEntropyLoss(), data)
    with pytest.raises(ValueError, match="keeps no graphs"):
        GGNOperator(model, nn.CrossEntropyLoss(), data, cache=True)
    with pytest.raises(ValueError, match="per-sample loss"):
        FisherOperator(model, TokenCrossEntropy(), data)


def test_saf_analyze_curvature_ggn_matches_the_operator(tmp_path):
    """`saf analyze --curvature ggn`: lambda_max of the GGN of each checkpoint."""
    import pandas as pd

    from analysis.io import load_state_dict
    from cli import main
    from saf.data import data_batches
    from saf.runs import model_from_run
    from tests.analysis.test_cli_analyze import _run_dir

    run = _run_dir(tmp_path, epochs=(0,))
    args = ["analyze", str(run), "--metrics", "lambda_max", "--n-samples", "40", "--batch-size",
            "20", "--tol", "1e-8", "--curvature", "ggn", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    got = pd.read_csv(run / "analysis.csv").set_index("metric").value["lambda_max"]
    model = model_from_run(run)
    model.load_state_dict(load_state_dict(run / "checkpoints" / "epoch_0000.pt"))
    data = data_batches("digits", limit=40, batch_size=20)
    G = GGNOperator(model, nn.CrossEntropyLoss(), data)
    assert got == pytest.approx(float(lanczos(G, tol=1e-10).values[0]), rel=1e-6)
    H = curvature_operator("hessian", model, nn.CrossEntropyLoss(), data)
    assert abs(got - float(lanczos(H, tol=1e-10).values[0])) > 1e-6 * got  # not the Hessian
