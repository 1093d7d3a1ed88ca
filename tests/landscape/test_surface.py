"""Surfaces: closed-form quadratic slice, interpolation endpoints, state safety, resume, ranks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import landscape as L
from analysis import fold_batchnorm


class LinReg(nn.Module):
    def __init__(self, p: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(p, dtype=torch.float64))

    def forward(self, x):
        return x @ self.w


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(8, 4),
    )
    m.train()
    with torch.no_grad():
        for _ in range(3):  # non-trivial running statistics
            m(torch.randn(16, 3, 8, 8) * 2 + 1)
    return m


def _images(n_batches=2, bs=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(bs + i, 3, 8, 8, generator=g), torch.randint(0, 4, (bs + i,), generator=g))
        for i in range(n_batches)
    ]


def test_quadratic_slice_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    model = LinReg(6)
    data = [
        (torch.randn(n, 6, dtype=torch.float64, generator=g), torch.randn(n, dtype=torch.float64))
        for n in (5, 7, 3)
    ]
    d1 = {"w": torch.randn(6, dtype=torch.float64, generator=g)}
    d2 = {"w": torch.randn(6, dtype=torch.float64, generator=g)}
    xs, ys = np.linspace(-1, 1, 5), np.linspace(-2, 0.5, 4)
    s = L.surface_2d(model, F.mse_loss, data, (d1, d2), xs, ys, progress=False)
    X = torch.cat([x for x, _ in data])
    y = torch.cat([t for _, t in data])
    r0, u, v = X @ model.w.detach() - y, X @ d1["w"], X @ d2["w"]
    m = lambda t: float(t.mean())  # noqa: E731
    a, b = np.meshgrid(xs, ys, indexing="ij")
    oracle = (
        m(r0**2)
        + 2 * a * m(r0 * u)
        + 2 * b * m(r0 * v)
        + a**2 * m(u * u)
        + 2 * a * b * m(u * v)
        + b**2 * m(v * v)
    )
    np.testing.assert_allclose(s.loss, oracle, rtol=1e-12)
    assert s.loss.shape == (5, 4) and np.isnan(s.accuracy).all() and s.complete


def test_model_state_bit_identical_and_mode_restored():
    model = _cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = [L.random_direction(model, seed=s, ignore=None) for s in (1, 2)]
    L.surface_2d(model, F.cross_entropy, _images(), d, [-1, 0.5], [0, 1], progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_center_point_is_eval_mode_loss_and_accuracy():
    model, data = _cnn(), _images()
    d = L.random_direction(model, seed=1)
    s = L.surface_1d(model, F.cross_entropy, data, d, [0.0], progress=False)
    model.eval()
    with torch.no_grad():
        n = sum(len(y) for _, y in data)
        loss = sum(float(F.cross_entropy(model(x), y)) * len(y) for x, y in data) / n
        acc = sum(float((model(x).argmax(1) == y).sum()) for x, y in data) / n
    np.testing.assert_allclose(s.loss[0], loss, rtol=1e-5)
    assert s.accuracy[0] == pytest.approx(acc)


def test_fast_path_folds_batchnorm_and_matches_plain():
    model = _cnn()
    folded, n = fold_batchnorm(model)
    assert n == 2
    d = [L.random_direction(model, seed=s, ignore=None) for s in (1, 2)]
    grid = np.linspace(-1, 1, 3)
    fast = L.surface_2d(model, F.cross_entropy, _images(), d, grid, grid, progress=False)
    plain = L.surface_2d(
        model, F.cross_entropy, _images(), d, grid, grid, progress=False, fast=False
    )
    np.testing.assert_allclose(fast.loss, plain.loss, rtol=1e-5)
    np.testing.assert_array_equal(fast.accuracy, plain.accuracy)


def _fast_and_plain(model, dirs, data=None):
    grid = np.linspace(-1, 1, 3)
    data = data or _images()
    kw = dict(progress=False)
    fast = L.surface_2d(model, F.cross_entropy, data, dirs, grid, grid, **kw)
    plain = L.surface_2d(model, F.cross_entropy, data, dirs, grid, grid, fast=False, **kw)
    return fast, plain


def _n_prefolded(model, dirs):
    from analysis.fold import prefold_batchnorm

    base = {k: v.detach() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    keys = {k for d in dirs for k, v in d.items() if bool(v.any())}
    return prefold_batchnorm(model, base, dirs, keys)[3]


def test_batchnorm_left_alone_by_the_directions_is_folded_once_and_matches_plain():
    model = _cnn()
    with torch.no_grad():  # a non-trivial affine BatchNorm
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2.0)
                m.bias.normal_()
    dirs = [L.random_direction(model, seed=s) for s in (1, 2)]  # ignore="biasbn"
    assert _n_prefolded(model, dirs) == 2
    fast, plain = _fast_and_plain(model, dirs)
    np.testing.assert_allclose(fast.loss, plain.loss, rtol=1e-5)
    np.testing.assert_array_equal(fast.accuracy, plain.accuracy)
    # A perturbed convolution bias is rescaled with its filter, BatchNorm still left alone.
    dirs = [L.random_direction(model, seed=s, ignore=None) for s in (3, 4)]
    for d in dirs:
        for k in ("1.weight", "1.bias", "4.weight", "4.bias"):
            d[k] = torch.zeros_like(d[k])
    assert bool(dirs[0]["3.bias"].any()) and _n_prefolded(model, dirs) == 2
    fast, plain = _fast_and_plain(model, dirs)
    np.testing.assert_allclose(fast.loss, plain.loss, rtol=1e-5)


def test_perturbed_batchnorm_or_tied_weights_are_not_folded_once():
    model = _cnn()
    with_stats = [L.random_direction(model, seed=s, include_buffers=True) for s in (1, 2)]
    for d in with_stats:  # only the running statistics of the BatchNorm move
        d["1.running_var"] = 0.5 * model[1].running_var
        d["4.running_mean"] = torch.ones_like(model[4].running_mean)
    assert _n_prefolded(model, with_stats) == 0  # so each point folds anew
    fast, plain = _fast_and_plain(model, with_stats)
    np.testing.assert_allclose(fast.loss, plain.loss, rtol=1e-5)

    class Tied(nn.Module):  # one convolution used twice: its weight cannot be rescaled once
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn1, self.bn2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
            self.head = nn.Linear(3, 4)

        def forward(self, x):
            h = torch.relu(self.bn1(self.conv(x)))
            h = torch.relu(self.bn2(self.conv(h)))
            return self.head(h.mean((2, 3)))

    torch.manual_seed(0)
    tied = Tied().eval()
    with torch.no_grad():
        for bn in (tied.bn1, tied.bn2):
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 2.0)
    dirs = [L.random_direction(tied, seed=s) for s in (1, 2)]
    assert _n_prefolded(tied, dirs) == 0
    fast, plain = _fast_and_plain(tied, dirs)
    np.testing.assert_allclose(fast.loss, plain.loss, rtol=1e-5)


def test_a_submodule_the_forward_never_calls_is_fine():
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.spare = nn.Linear(5, 5)  # in every direction, absent from the traced graph
            self.head = nn.Linear(4, 4)

        def forward(self, x):
            return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))

    torch.manual_seed(0)
    model = WithSpare().eval()
    dirs = [L.random_direction(model, seed=s) for s in (1, 2)]
    assert "spare.weight" in dirs[0]
    fast, plain = _fast_and_plain(model, dirs)
    np.testing.assert_allclose(fast.loss, plain.loss, rtol=1e-5)


def test_interpolation_endpoints_equal_checkpoint_losses():
    m0, m1 = _cnn(0), _cnn(1)
    s0, s1 = m0.state_dict(), m1.state_dict()
    (d,) = L.interpolation_directions(s0, s1)
    data = _images()
    s = L.surface_1d(m0, F.cross_entropy, data, d, [0.0, 0.5, 1.0], origin=s0, progress=False)
    n = sum(len(y) for _, y in data)
    for m, loss in ((m0, s.loss[0]), (m1, s.loss[2])):
        m.eval()
        with torch.no_grad():
            ref = sum(float(F.cross_entropy(m(x), y)) * len(y) for x, y in data) / n
        np.testing.assert_allclose(loss, ref, rtol=1e-5)
    assert s.loss[0] != pytest.approx(s.loss[2])


class _Interrupt(Exception):
    pass


def _counting_loss(limit=None):
    calls = {"n": 0}

    def loss(out, y):  # counts whole-batch calls (one per point; not the per-sample ones)
        calls["n"] += out.shape[0] > 1
        if limit is not None and calls["n"] > limit:
            raise _Interrupt
        return F.cross_entropy(out, y)

    return loss, calls


def test_resume_after_interrupt_equals_uninterrupted(tmp_path):
    model, data = _cnn(), _images(n_batches=1)
    d = [L.random_direction(model, seed=s) for s in (1, 2)]
    xs, ys = np.linspace(-1, 1, 4), np.linspace(-1, 1, 3)
    full = L.surface_2d(model, F.cross_entropy, data, d, xs, ys, progress=False)
    path = tmp_path / "s.npz"
    loss, _ = _counting_loss(limit=7)
    with pytest.raises(_Interrupt):
        L.surface_2d(model, loss, data, d, xs, ys, path=path, save_every=3, progress=False)
    partial = L.Surface.load(path)
    assert not partial.complete and partial.done.sum() == 6
    loss, calls = _counting_loss()
    resumed = L.surface_2d(model, loss, data, d, xs, ys, path=path, save_every=3, progress=False)
    assert calls["n"] == 12 - 6  # only the missing points
    np.testing.assert_array_equal(resumed.loss, full.loss)
    np.testing.assert_array_equal(resumed.accuracy, full.accuracy)
    np.testing.assert_array_equal(resumed.loss_se, full.loss_se)
    assert L.Surface.load(path).complete
    # a rerun of a complete surface evaluates nothing; other settings start afresh
    loss, calls = _counting_loss()
    L.surface_2d(model, loss, data, d, xs, ys, path=path, progress=False)
    assert calls["n"] == 0
    L.surface_2d(model, loss, data, d[::-1], xs, ys, path=path, progress=False)
    assert calls["n"] == 12


def _direct_se(model, loss_fn, data, direction, alpha):
    """s / sqrt(N) over the per-sample losses, each sample scored alone at o + alpha d."""
    moved = {k: v.detach() + alpha * direction.get(k, 0) for k, v in model.state_dict().items()}
    with torch.no_grad():
        per = torch.cat(
            [
                torch.stack(
                    [
                        loss_fn(
                            torch.func.functional_call(model, moved, (x[i : i + 1],)), y[i : i + 1]
                        )
                        for i in range(len(y))
                    ]
                )
                for x, y in data
            ]
        ).double()
    return float(per.std(unbiased=True) / len(per) ** 0.5), float(per.mean())


@pytest.mark.parametrize("kind", ["classes", "regression"])
def test_loss_se_equals_the_direct_standard_error(kind, tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    if kind == "classes":
        model, loss_fn = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)), F.cross_entropy
        data = [
            (torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in (7, 9)
        ]
    else:  # two outputs per sample: each sample's loss is the mean over its outputs
        model, loss_fn = nn.Linear(5, 2), F.mse_loss
        data = [(torch.randn(n, 5, generator=g), torch.randn(n, 2, generator=g)) for n in (7, 9)]
    model = model.double()
    data = [(x.double(), y.double() if y.is_floating_point() else y) for x, y in data]
    d = L.random_direction(model, seed=1, ignore=None)
    alphas = [-1.0, 0.0, 0.5]
    s = L.surface_1d(model, loss_fn, data, d, alphas, progress=False, path=tmp_path / "s.npz")
    for i, a in enumerate(alphas):
        se, mean = _direct_se(model, loss_fn, data, d, a)
        assert s.loss[i] == pytest.approx(mean, rel=1e-12)
        assert s.loss_se[i] == pytest.approx(se, rel=1e-9)
    np.testing.assert_array_equal(L.Surface.load(tmp_path / "s.npz").loss_se, s.loss_se)


def test_loss_se_is_nan_for_a_loss_that_is_not_a_mean_over_samples(tmp_path):
    model, data = (
        LinReg(3),
        [(torch.randn(6, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64))],
    )
    rmse = lambda out, y: (out - y).pow(2).mean().sqrt()  # noqa: E731
    s = L.surface_1d(
        model, rmse, data, {"w": torch.ones(3, dtype=torch.float64)}, [0.0, 1.0], progress=False
    )
    assert np.isfinite(s.loss).all() and np.isnan(s.loss_se).all()
    # a file written before loss_se existed loads with NaN
    with np.load(s.save(tmp_path / "new.npz")) as z:
        np.savez(tmp_path / "old.npz", **{k: z[k] for k in z.files if k != "loss_se"})
    assert np.isnan(L.Surface.load(tmp_path / "old.npz").loss_se).all()


def test_save_load_roundtrip(tmp_path):
    s = L.Surface([[0.0, 1.0]], np.array([1.0, np.inf]), np.array([0.5, np.nan]), None, {"a": 1})
    s.save(tmp_path / "x.npz")
    t = L.Surface.load(tmp_path / "x.npz")
    np.testing.assert_array_equal(t.loss, s.loss)
    assert t.metadata["a"] == 1 and t.complete and (tmp_path / "x.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_bad_inputs_raise_value_error():
    model = LinReg(2)
    d = {"w": torch.ones(2, dtype=torch.float64)}
    data = [(torch.ones(1, 2, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))]
    with pytest.raises(ValueError, match="one-shot"):
        L.surface_1d(model, F.mse_loss, iter(data), d, [0.0], progress=False)
    with pytest.raises(ValueError, match="finite"):
        L.surface_1d(model, F.mse_loss, data, d, [0.0, float("nan")], progress=False)
    with pytest.raises(ValueError, match="shapes"):
        L.surface_1d(model, F.mse_loss, data, {"w": torch.ones(3)}, [0.0], progress=False)


def _rank_worker(rank, world, store_path, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        model, data = _cnn(), _images()
        d = [L.random_direction(model, seed=s) for s in (1, 2)]
        grid = np.linspace(-1, 1, 3)
        s = L.surface_2d(
            model, F.cross_entropy, data, d, grid, grid, path=f"{out_dir}/dist.npz", progress=False
        )
        np.save(f"{out_dir}/rank{rank}.npy", s.loss)
        np.save(f"{out_dir}/se{rank}.npy", s.loss_se)
        np.save(f"{out_dir}/count{rank}.npy", s.metadata["evaluated_points"])
    finally:
        dist.destroy_process_group()


def test_distributed_gloo_two_ranks_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same kernels as the workers: results are then bit-identical
    try:
        mp.spawn(_rank_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
        model, data = _cnn(), _images()
        d = [L.random_direction(model, seed=s) for s in (1, 2)]
        grid = np.linspace(-1, 1, 3)
        single = L.surface_2d(model, F.cross_entropy, data, d, grid, grid, progress=False)
    finally:
        torch.set_num_threads(threads)
    gathered = L.Surface.load(tmp_path / "dist.npz")
    np.testing.assert_array_equal(gathered.loss, single.loss)
    np.testing.assert_array_equal(gathered.loss_se, single.loss_se)
    for r in (0, 1):
        np.testing.assert_array_equal(np.load(tmp_path / f"rank{r}.npy"), gathered.loss)
        np.testing.assert_array_equal(np.load(tmp_path / f"se{r}.npy"), gathered.loss_se)
    assert not list(tmp_path.glob("dist.npz.rank*"))


class _WithNonPersistent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("shift", torch.full((2,), 0.5), persistent=False)

    def forward(self, x):
        return self.lin(x) + self.shift


def test_non_persistent_buffers_are_used():
    model = _WithNonPersistent()
    data = [(torch.randn(5, 3), torch.randn(5, 2))]
    d = {"lin.weight": torch.ones(2, 3)}
    s = L.surface_1d(model, F.mse_loss, data, d, [0.0, 1.0], progress=False)
    with torch.no_grad():
        ref0 = float(F.mse_loss(model(data[0][0]), data[0][1]))
        model.lin.weight.add_(1.0)
        ref1 = float(F.mse_loss(model(data[0][0]), data[0][1]))
    np.testing.assert_allclose(s.loss, [ref0, ref1], rtol=1e-6)


class _SharedPreActivation(torch.nn.Module):
    """conv -> BN whose output feeds both a ReLU and a skip: the ReLU must not run in place."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(2)

    def forward(self, x):
        h = self.bn(self.conv(x))
        return torch.relu(h) + h


def test_fast_path_relu_in_place_only_when_nothing_else_reads_the_input():
    model = _SharedPreActivation().eval()
    torch.nn.init.normal_(model.bn.running_mean)
    folded, n = fold_batchnorm(model)
    assert n == 1 and "relu_(" not in folded.code
    x = torch.randn(3, 2, 5, 5)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-6)


def _sorted_classes(n=600, bs=25):
    """Three classes, sorted by class: a prefix of the given order holds one class only."""
    g = torch.Generator().manual_seed(4)
    y = torch.arange(3).repeat_interleave(n // 3)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64) + y[:, None].double()
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, n, bs)]


def test_target_se_meets_the_target_at_every_point_on_balanced_prefixes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    data, target = _sorted_classes(), 0.02
    d = L.random_direction(model, seed=2)
    grid = np.linspace(-1, 1, 9)
    full = L.surface_1d(model, F.cross_entropy, data, d, grid, progress=False)
    cheap = L.surface_1d(model, F.cross_entropy, data, d, grid, progress=False, target_se=target)
    n = sum(len(y) for _, y in data)
    assert ((cheap.loss_se <= target) | (cheap.samples == n)).all()
    assert (cheap.samples < n).any() and (full.samples == n).all()
    # each estimate lies within a few of its standard errors of the full-data loss: a
    # prefix of the sorted data (one class) would be far off
    assert (np.abs(cheap.loss - full.loss) <= 4 * cheap.loss_se + 1e-12).all()
    # a target no subset meets: every point uses all the data, and equals the plain surface
    exact = L.surface_1d(model, F.cross_entropy, data, d, grid, progress=False, target_se=1e-9)
    np.testing.assert_allclose(exact.loss, full.loss, rtol=1e-12)
    assert (exact.samples == n).all()


def test_target_se_refuses_what_it_cannot_do():
    model, data = (
        LinReg(3),
        [(torch.randn(6, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64))],
    )
    d = {"w": torch.ones(3, dtype=torch.float64)}
    rmse = lambda out, y: (out - y).pow(2).mean().sqrt()  # noqa: E731
    with pytest.raises(ValueError, match="per-sample"):
        L.surface_1d(model, rmse, data, d, [0.0], progress=False, target_se=0.1)
    with pytest.raises(ValueError, match="target_se"):
        L.surface_1d(model, F.mse_loss, data, d, [0.0], progress=False, target_se=-1.0)
