"""Tiny float64 models, data and dense Hessian oracles shared by the analysis tests."""

import torch
from torch import nn
from torch.func import functional_call, hessian


def mlp(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(4, 5)] + ([nn.BatchNorm1d(5)] if bn else []) + [nn.Tanh(), nn.Linear(5, 3)]
    model = nn.Sequential(*layers).double()
    if bn:  # non-trivial running statistics
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def batches(sizes=(7, 5, 8), seed=1, d=4, classes=3):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, d, generator=g, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=g),
        )
        for n in sizes
    ]


def flat_params(model, names=None):
    names = names or [n for n, _ in model.named_parameters()]
    state = dict(model.named_parameters())
    return names, torch.cat([state[n].detach().reshape(-1) for n in names])


def dense_hessian(model, loss_fn, data, names=None):
    """Oracle: torch.func.hessian of the size-weighted mean loss over all batches (eval mode)."""
    names, theta = flat_params(model, names)
    shapes = [p.shape for n, p in model.named_parameters() if n in names]
    numels = [s.numel() for s in shapes]
    fixed = {
        n: t.detach()
        for n, t in list(model.named_parameters()) + list(model.named_buffers())
        if n not in names
    }
    N = sum(len(y) for _, y in data)

    def total(flat):
        params = {
            n: p.view(s) for n, p, s in zip(names, torch.split(flat, numels), shapes, strict=True)
        }
        return sum(
            len(y) / N * loss_fn(functional_call(model, {**fixed, **params}, (x,)), y)
            for x, y in data
        )

    was = model.training
    model.eval()
    H = hessian(total)(theta)
    model.train(was)
    return H
