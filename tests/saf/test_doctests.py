"""The docstring examples of the trainer modules run and give their stated answers."""

import doctest
import importlib

import pytest

MODULES = ["saf.trajectory", "saf.sam", "saf.ema", "saf.models", "saf.data"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
