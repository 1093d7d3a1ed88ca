"""A model factory for ``saf analyze --model tests.reliability._factory:tiny_mlp``."""

from saf.models import build_model


def tiny_mlp():
    """The architecture of the tiny test run (mlp, width 16, digits)."""
    return build_model("mlp", 10, (1, 8, 8), width=16)
