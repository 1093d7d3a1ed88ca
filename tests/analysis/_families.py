"""Models we did not write, one per family, with their data: a small ResNet with BatchNorm, a
Transformer classifier, a linear regressor, a model of named (dict) inputs and outputs, and
one of tuple inputs and outputs. Factories take no argument (the --model convention)."""

import torch
from torch import nn


class ResNet(nn.Module):
    """One residual block with BatchNorm on 1-channel 4x4 images."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(2)
        self.conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = torch.relu(h + self.bn2(self.conv(h)))
        return self.head(h.mean((2, 3)))


class Transformer(nn.Module):
    """A Transformer encoder layer (attention, dropout, LayerNorm, GELU) and a linear head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.1, activation="gelu",
                                                batch_first=True)  # fmt: skip
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.layer(self.embed(x)).mean(1))


class Named(nn.Module):
    """Hugging-Face style: keyword inputs, a mapping with ``logits`` out."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3, bias=False)

    def forward(self, features, extra):
        return {"logits": self.a(features) + self.b(extra), "hidden": features}


class Pair(nn.Module):
    """Two positional inputs, a tuple out (logits first)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x, scale):
        h = torch.tanh(self.a(x) * scale)
        return self.b(h), h


def _seeded(cls):
    torch.manual_seed(0)
    return cls()


def resnet():
    m = _seeded(ResNet)
    m.train()
    with torch.no_grad():  # non-trivial running statistics
        m(torch.randn(16, 1, 4, 4))
    return m.eval()


def transformer():
    return _seeded(Transformer).eval()


def regressor():
    return _seeded(lambda: nn.Linear(5, 1))


def named():
    return _seeded(Named)


def pair():
    return _seeded(Pair)


def _g(seed=1):
    return torch.Generator().manual_seed(seed)


def resnet_data():
    g = _g()
    return [(torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g))
            for n in (6, 5)]  # fmt: skip


def transformer_data():
    g = _g()
    return [(torch.randn(n, 4, 3, generator=g), torch.randint(0, 3, (n,), generator=g))
            for n in (6, 5)]  # fmt: skip


def regressor_data():
    g = _g()
    return [(torch.randn(n, 5, generator=g), torch.randn(n, 1, generator=g)) for n in (7, 6)]


def named_data():
    g = _g()
    return [
        ({"features": torch.randn(n, 4, generator=g), "extra": torch.randn(n, 2, generator=g)},
         torch.randint(0, 3, (n,), generator=g))
        for n in (6, 5)
    ]  # fmt: skip


def pair_data():
    g = _g()
    return [((torch.randn(n, 4, generator=g), torch.rand(n, 1, generator=g) + 0.5),
             torch.randint(0, 3, (n,), generator=g)) for n in (6, 5)]  # fmt: skip


FAMILIES = {
    "resnet": (resnet, resnet_data, "ce"),
    "transformer": (transformer, transformer_data, "ce"),
    "regressor": (regressor, regressor_data, "mse"),
    "named": (named, named_data, "ce"),
    "pair": (pair, pair_data, "ce"),
}
