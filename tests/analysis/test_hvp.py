"""HessianOperator against the dense torch.func.hessian oracle (float64)."""

import gc

import pytest
import torch
from torch import nn

from analysis import HessianOperator, hessian_operator, params_without_norm_and_bias
from tests.analysis._models import batches, dense_hessian, mlp

CE = nn.CrossEntropyLoss()


def test_operator_equals_dense_oracle_with_unequal_batches():
    model, data = mlp(), batches((7, 5, 8))
    H = hessian_operator(model, CE, data)
    assert H.shape == (H.n_params, H.n_params) and H.n_samples == 20
    torch.testing.assert_close(H.to_dense(), dense_hessian(model, CE, data), rtol=1e-10, atol=1e-12)
    assert H.n_matvecs == H.n_params


def test_batching_does_not_change_the_operator():
    model, data = mlp(), batches((20,))
    split = [(data[0][0][i : i + 3], data[0][1][i : i + 3]) for i in range(0, 20, 3)]
    v = torch.randn(HessianOperator(model, CE, data).n_params, dtype=torch.float64)
    a = HessianOperator(model, CE, data).matvec(v)
    b = HessianOperator(model, CE, split).matvec(v)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_cached_graphs_give_the_same_products():
    model, data = mlp(bn=True), batches()
    plain = HessianOperator(model, CE, data, cache=False)
    cached = HessianOperator(model, CE, data, cache=True)
    for seed in range(3):
        v = torch.randn(
            plain.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
        )
        torch.testing.assert_close(cached.matvec(v), plain.matvec(v), rtol=1e-10, atol=1e-12)


def test_a_dropped_cached_operator_frees_its_graph():
    # ops that save their output (tanh, log_softmax) must not keep it in a reference cycle
    model, data = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double(), batches()
    gc.collect()
    before = _graph_tensors()
    for _ in range(3):
        H = HessianOperator(model, CE, data, cache=True)
        H.matvec(torch.ones(H.n_params, dtype=torch.float64))
        del H
    gc.collect()
    assert _graph_tensors() == before


def _graph_tensors() -> int:
    return sum(1 for t in gc.get_objects() if torch.is_tensor(t) and t.grad_fn is not None)


def test_auto_cache_falls_back_when_over_budget():
    model, data = mlp(), batches()
    H = HessianOperator(model, CE, data, cache="auto", cache_budget=10)
    v = torch.ones(H.n_params, dtype=torch.float64)
    torch.testing.assert_close(H.matvec(v), dense_hessian(model, CE, data) @ v)
    assert not H.cached
    big = HessianOperator(model, CE, data, cache="auto")
    big.matvec(v)
    assert big.cached and big.cache_bytes > 0


def test_eval_mode_by_default_and_model_untouched():
    model, data = mlp(bn=True), batches()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    H = HessianOperator(model, CE, data)
    torch.testing.assert_close(H.to_dense(), dense_hessian(model, CE, data), rtol=1e-10, atol=1e-12)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_train_mode_uses_batch_statistics_and_leaves_buffers():
    model, data = mlp(bn=True).eval(), batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    v = torch.randn(HessianOperator(model, CE, data).n_params, dtype=torch.float64)
    train = HessianOperator(model, CE, data, mode="train").matvec(v)
    evalm = HessianOperator(model, CE, data, mode="eval").matvec(v)
    assert not torch.allclose(train, evalm)
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())
    assert not model.training
    # oracle: central differences of plain autograd gradients of a train-mode copy
    # (torch.func.hessian and jacrev(jacrev) are wrong through batch-statistics BN in torch 2.13)
    import copy

    def grad_at(eps):
        ref = copy.deepcopy(model).train()
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(
                torch.nn.utils.parameters_to_vector(ref.parameters()) + eps * v, ref.parameters()
            )
        sum(len(y) / 20 * CE(ref(x), y) for x, y in data).backward()
        return torch.cat([p.grad.reshape(-1) for p in ref.parameters()])

    fd = (grad_at(1e-5) - grad_at(-1e-5)) / 2e-5
    torch.testing.assert_close(train, fd, rtol=1e-6, atol=1e-8)


def test_param_selection_is_the_oracle_submatrix():
    model, data = mlp(bn=True), batches()
    names = params_without_norm_and_bias(model)
    assert names == ["0.weight", "3.weight"]
    H = HessianOperator(model, CE, data, params=names)
    torch.testing.assert_close(
        H.to_dense(), dense_hessian(model, CE, data, names), rtol=1e-10, atol=1e-12
    )
    by_pred = HessianOperator(model, CE, data, params=lambda n, p: p.ndim > 1)
    assert by_pred.n_params == H.n_params


def test_float64_option_on_a_float32_model():
    model = mlp().float()
    data = [(x.float(), y) for x, y in batches()]
    H = HessianOperator(model, CE, data, dtype=torch.float64)
    assert H.dtype == torch.float64
    torch.testing.assert_close(
        H.to_dense(), dense_hessian(mlp(), CE, batches()), rtol=1e-5, atol=1e-6
    )
    assert next(model.parameters()).dtype == torch.float32


def test_generator_data_is_read_once_and_reused():
    model, data = mlp(), batches()
    H = HessianOperator(model, CE, (b for b in data))
    v = torch.ones(H.n_params, dtype=torch.float64)
    torch.testing.assert_close(H.matvec(v), H.matvec(v))
    torch.testing.assert_close(H.matvec(v), dense_hessian(model, CE, data) @ v)


def test_loss_and_gradient_and_scipy_interop():
    model, data = mlp(), batches()
    H = HessianOperator(model, CE, data)
    loss, g = H.loss_and_gradient()
    X = torch.cat([x for x, _ in data])
    Y = torch.cat([y for _, y in data])
    model.zero_grad()
    ref = CE(model(X), Y)
    ref.backward()
    assert loss == pytest.approx(float(ref), rel=1e-12)
    torch.testing.assert_close(g, torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    import numpy as np

    x = np.ones(H.n_params)
    np.testing.assert_allclose(
        H.to_scipy() @ x,
        (dense_hessian(model, CE, data) @ torch.ones(H.n_params, dtype=torch.float64)).numpy(),
        rtol=1e-10,
    )


def test_loss_and_gradient_come_from_the_kept_graph_with_no_pass_of_their_own():
    """With ``cache``, the loss and gradient are the graph's (one forward per batch in all,
    products included) and equal the one-big-batch backward."""
    model, data = mlp(), batches()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    H = HessianOperator(model, CE, data, cache=True)
    loss, g = H.loss_and_gradient()
    v = torch.randn(H.n_params, dtype=H.dtype)
    Hv = H @ v
    assert H.cached and len(calls) == len(data)
    X, Y = torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])
    model.zero_grad()
    ref = CE(model(X), Y)
    ref.backward()
    assert loss == pytest.approx(float(ref), rel=1e-12)
    torch.testing.assert_close(g, torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(Hv, dense_hessian(model, CE, data).to(Hv.dtype) @ v)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "test"}, "mode"),
        ({"cache": "yes"}, "cache"),
        ({"params": ["nope"]}, "nope"),
        ({"params": lambda n, p: False}, "no trainable"),
    ],
)
def test_bad_arguments_raise_valueerror(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HessianOperator(mlp(), CE, batches(), **kwargs)


def test_bad_vector_and_empty_data():
    H = HessianOperator(mlp(), CE, batches())
    with pytest.raises(ValueError, match="length"):
        H.matvec(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="no samples"):
        HessianOperator(mlp(), CE, [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_memory_does_not_grow_with_batches():
    model, data = mlp(), batches((16,) * 4)
    v = torch.randn(HessianOperator(model, CE, data).n_params, dtype=torch.float64)
    cpu = HessianOperator(model, CE, data).matvec(v)
    gpu = HessianOperator(model.cuda(), CE, data, device="cuda")
    torch.testing.assert_close(gpu.matvec(v).cpu(), cpu)
    peaks = []
    for n in (2, 20):
        H = HessianOperator(model, CE, batches((16,) * n), device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        H.matvec(v.cuda())
        peaks.append(torch.cuda.max_memory_allocated() - base)
    assert peaks[1] <= peaks[0] * 1.5


def test_train_mode_with_dropout_warns_that_the_operator_is_random():
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 3)).double()
    with pytest.warns(UserWarning, match="random"):
        HessianOperator(model, CE, batches(), mode="train")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eval mode, or no dropout: no warning
        HessianOperator(model, CE, batches())
        HessianOperator(mlp(), CE, batches(), mode="train")


def test_cache_estimate_counts_what_the_graph_adds_not_the_weights():
    """A wide layer on two samples: 16 MB of weights, a few KB of activations. The weights
    (and the data) are held anyway, so only the activations count against the budget."""
    model = nn.Sequential(nn.Linear(2000, 2000), nn.Tanh(), nn.Linear(2000, 3))
    data = [(torch.randn(2, 2000), torch.tensor([0, 2]))]
    H = HessianOperator(model, CE, data, cache=True)
    H.matvec(torch.randn(H.n_params))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert H.cached and 0 < H.cache_bytes < weights / 100


class _ConvBN(nn.Module):
    """conv→BN→ReLU twice, a training-only branch, global pooling, linear (float64)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
            nn.Conv2d(3, 2, 3, bias=False), nn.BatchNorm2d(2), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        x = self.body(x)
        if self.training:  # traced as eval: the operator's mode
            x = x * 2
        return self.head(x.mean((2, 3)))


def _conv_bn_model():
    torch.manual_seed(0)
    model = _ConvBN().double()
    with torch.no_grad():  # running statistics and affine parameters away from 0 / 1
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(10, 1, 5, 5, generator=g, dtype=torch.float64)
    return model, [(X[:6], torch.arange(6) % 3), (X[6:], torch.arange(4) % 3)]


def test_batchnorm_folded_products_equal_the_dense_oracle():
    model, data = _conv_bn_model()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    H = HessianOperator(model, CE, data)
    assert H.folded == 2
    dense = dense_hessian(model, CE, data)
    torch.testing.assert_close(H.to_dense(), dense, rtol=1e-10, atol=1e-12)
    cached = HessianOperator(model, CE, data, cache=True)
    v = torch.randn(H.n_params, dtype=torch.float64)
    torch.testing.assert_close(cached.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())


def test_no_fold_in_train_mode_with_a_hook_or_when_asked():
    model, data = _conv_bn_model()
    assert HessianOperator(model, CE, data, fold=False).folded == 0
    assert HessianOperator(model, CE, data, mode="train").folded == 0
    hooked = HessianOperator(model, CE, data, forward_fn=lambda m, b: m(b[0]))
    assert hooked.folded == 0
    v = torch.randn(hooked.n_params, dtype=torch.float64)
    folded = HessianOperator(model, CE, data).matvec(v)
    torch.testing.assert_close(hooked.matvec(v), folded, rtol=1e-10, atol=1e-12)
