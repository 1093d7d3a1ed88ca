"""The docstring examples of the analysis package are tests too."""

import doctest
import importlib

import pytest

MODULES = ["_checkpoints", "_eigen", "_functional", "_hvp", "_lanczos", "_power", "_trace"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"analysis.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
