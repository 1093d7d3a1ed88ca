"""The docstring examples of landscape are correct."""

import doctest

import pytest

import landscape._directions
import landscape._surface


@pytest.mark.parametrize("module", [landscape._directions, landscape._surface])
def test_doctests(module):
    result = doctest.testmod(module, extraglobs={"torch": __import__("torch")})
    assert result.attempted > 0 and result.failed == 0
