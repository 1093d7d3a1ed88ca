"""SAM/ASAM against hand computations; BN frozen on the second pass; state round trips; EMA."""

import copy

import pytest
import torch

from saf import EMA, SAM, Stepper, build_model, scaled_ema_decay
from saf.sam import disable_running_stats

A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)


def _quad_sam(w0, rho, lr, adaptive=False, momentum=0.0, steps=1):
    w = torch.nn.Parameter(w0.clone())
    opt = SAM([w], torch.optim.SGD, rho=rho, adaptive=adaptive, lr=lr, momentum=momentum)

    def closure():
        opt.zero_grad()
        loss = 0.5 * w @ A @ w
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return w.detach()


def test_sam_step_on_quadratic_equals_hand_computation():
    w0, rho, lr = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.1, 0.05
    g = A @ w0
    eps = rho * g / g.norm()
    expect = w0 - lr * (A @ (w0 + eps))
    torch.testing.assert_close(_quad_sam(w0, rho, lr), expect, rtol=1e-14, atol=1e-14)


def test_asam_step_on_quadratic_equals_hand_computation():
    w0, rho, lr = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.5, 0.05
    g = A @ w0
    eps = rho * w0**2 * g / (w0.abs() * g).norm()  # T_w^2 g / ||T_w g||, T_w = |w|
    expect = w0 - lr * (A @ (w0 + eps))
    got = _quad_sam(w0, rho, lr, adaptive=True)
    torch.testing.assert_close(got, expect, rtol=1e-14, atol=1e-14)


def test_asam_with_eta_on_weights_only_equals_hand_computation():
    """The ASAM paper's convention: T = |w| + eta on the weights, T = 1 on the bias."""
    w0, b0, rho, lr, eta = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.5, 0.5, 0.05, 0.01
    w = torch.nn.Parameter(w0.clone())
    b = torch.nn.Parameter(torch.tensor([b0], dtype=torch.float64))
    groups = [{"params": [w], "adaptive": True, "eta": eta}, {"params": [b], "adaptive": False}]
    opt = SAM(groups, torch.optim.SGD, rho=rho, lr=lr)

    def loss_at(w, b):
        return 0.5 * w @ A @ w + 0.5 * (b**2).sum() * 3.0

    def closure():
        opt.zero_grad()
        loss = loss_at(w, b)
        loss.backward()
        return loss

    opt.step(closure)
    gw, gb = A @ w0, torch.tensor([3.0 * b0], dtype=torch.float64)
    tw = w0.abs() + eta
    norm = torch.cat([tw * gw, gb]).norm()
    ew, eb = rho * tw**2 * gw / norm, rho * gb / norm
    torch.testing.assert_close(w.detach(), w0 - lr * (A @ (w0 + ew)), rtol=1e-14, atol=1e-14)
    expect_b = torch.tensor([b0]) - lr * 3.0 * (torch.tensor([b0]) + eb)
    torch.testing.assert_close(b.detach(), expect_b.double(), rtol=1e-14, atol=1e-14)


def test_sam_two_steps_with_momentum():
    w0, rho, lr, mu = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.1, 0.05, 0.9
    w, buf = w0.clone(), None
    for _ in range(2):
        g = A @ w
        gp = A @ (w + rho * g / g.norm())
        buf = gp if buf is None else mu * buf + gp
        w = w - lr * buf
    torch.testing.assert_close(_quad_sam(w0, rho, lr, momentum=mu, steps=2), w)


def test_sam_rho_zero_is_sgd_bitwise():
    w0 = torch.tensor([0.3, -0.7], dtype=torch.float64)
    w = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([w], lr=0.05, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        (0.5 * w @ A @ w).backward()
        opt.step()
    assert torch.equal(_quad_sam(w0, 0.0, 0.05, momentum=0.9, steps=3), w.detach())


def _bn_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3)
    )


def test_sam_second_pass_leaves_batchnorm_running_stats_alone():
    net, x, y = _bn_net(), torch.randn(16, 4), torch.randint(0, 3, (16,))
    ref = copy.deepcopy(net)
    ref(x)  # one ordinary training forward: the expected running stats
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, model=net)
    Stepper("sam", net, opt)(x, y, torch.arange(16), 0)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(net[1], name), getattr(ref[1], name)), name
    with disable_running_stats(net):
        pass
    assert net[1].track_running_stats


def test_sam_state_dict_keeps_momentum_and_resumes_bitwise():
    net, x, y = _bn_net(), torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    step = Stepper("sam", net, opt)
    step(x, y, torch.arange(16), 0)
    sd = opt.state_dict()
    assert any("momentum_buffer" in s for s in sd["state"].values())
    net2 = copy.deepcopy(net)
    opt2 = SAM(net2.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt2.load_state_dict(copy.deepcopy(sd))
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, 1, gamma=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    for _ in range(2):
        step(x, y, torch.arange(16), 0)
        Stepper("sam", net2, opt2)(x, y, torch.arange(16), 0)
        sched.step()
        sched2.step()
    for p, q in zip(net.state_dict().values(), net2.state_dict().values(), strict=True):
        assert torch.equal(p, q)
    assert opt2.base_optimizer.param_groups[0]["lr"] == 0.025  # scheduler drives the base


def test_sam_validates():
    with pytest.raises(ValueError, match="rho"):
        SAM([torch.nn.Parameter(torch.zeros(1))], torch.optim.SGD, rho=-1, lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        SAM([torch.nn.Parameter(torch.zeros(1))], torch.optim.SGD, lr=0.1).step()


def test_ema_update_equals_formula_for_params_and_buffers():
    net, beta = _bn_net(), 0.9
    ema = EMA(net, beta)
    v = {k: t.clone().double() for k, t in net.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):
        net(torch.randn(8, 4)).sum().backward()
        opt.step()
        ema.update(net)
        for k, t in net.state_dict().items():
            v[k] = beta * v[k] + (1 - beta) * t.double() if t.is_floating_point() else t.double()
    for k, t in ema.module.state_dict().items():
        torch.testing.assert_close(t.double(), v[k], rtol=1e-6, atol=1e-7)
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert not ema.module.training


def test_ema_of_a_wrapped_model_averages_the_wrapped_modules_tensors():
    """The trainer steps the DDP wrapper (keys ``module.*``); the EMA must unwrap it."""
    net, beta = _bn_net(), 0.5
    wrapped = torch.nn.DataParallel(net)  # same key prefix as DDP, no process group needed
    ema = EMA(wrapped, beta)
    assert ema.module.state_dict().keys() == net.state_dict().keys()
    before = {k: t.clone() for k, t in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(wrapped)
    for k, p in net.named_parameters():
        torch.testing.assert_close(ema.module.state_dict()[k], beta * before[k] + (1 - beta) * p)


def test_ema_leaves_the_student_alone():
    """The teacher is a copy: building, updating and calling it leave the student's storage,
    values and train flag alone; the teacher runs in eval mode."""
    net = build_model("resnet_small", 10, (1, 8, 8))
    before = {k: (t.data_ptr(), t.clone()) for k, t in net.state_dict(keep_vars=True).items()}
    ema = EMA(net, 0.5)
    ema.update(net)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(ema(x), ema.module.eval()(x)) and not ema(x).requires_grad
    assert net.training and not ema.module.training
    for k, t in net.state_dict(keep_vars=True).items():
        assert t.data_ptr() == before[k][0] and torch.equal(t, before[k][1])


def test_ema_decay_scaling_and_validation():
    assert scaled_ema_decay(391, 200) == 0.9998  # the paper's CIFAR run: the paper's value
    assert scaled_ema_decay(5005, 90) == 0.9998  # ImageNet: capped at the paper's value
    assert 1 / (1 - scaled_ema_decay(12, 40)) == pytest.approx(0.064 * 40 * 12)
    assert scaled_ema_decay(1, 1) == 0.0  # horizon floored at one step
    with pytest.raises(ValueError):
        EMA(_bn_net(), 1.0)


def test_sam_norm_spans_all_param_groups():
    """Two groups (one coordinate each) perturb like one group: eps = rho g / ||g||."""
    w0, rho, lr = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.1, 0.05
    a, b = (torch.nn.Parameter(w0[i : i + 1].clone()) for i in range(2))
    opt = SAM([{"params": [a]}, {"params": [b]}], torch.optim.SGD, rho=rho, lr=lr)

    def closure():
        opt.zero_grad()
        w = torch.cat([a, b])
        loss = 0.5 * w @ A @ w
        loss.backward()
        return loss

    opt.step(closure)
    got = torch.cat([a, b]).detach()
    torch.testing.assert_close(got, _quad_sam(w0, rho, lr), rtol=1e-14, atol=1e-14)
