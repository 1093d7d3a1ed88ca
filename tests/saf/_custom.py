"""A model and a data set of a user's own, named on the command line as MODULE:FUNCTION."""

import torch
from torch import nn


def make_net(num_classes: int, in_shape: tuple) -> nn.Module:
    """A small MLP that takes the shape it is given."""
    n = 1
    for d in in_shape:
        n *= d
    return nn.Sequential(nn.Flatten(), nn.Linear(n, 16), nn.ReLU(), nn.Linear(16, num_classes))


def blobs(split: str) -> torch.utils.data.Dataset:
    """Three Gaussian blobs in 5 dimensions: a map-style data set of (x, y) items."""
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    y = torch.arange(96) % 3
    x = torch.randn(96, 5, generator=g) + 2.0 * torch.nn.functional.one_hot(y, 5).float()
    return torch.utils.data.TensorDataset(x, y)
