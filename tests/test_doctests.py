"""Every docstring example of the shipped packages runs and gives its stated answer."""

import doctest
import importlib
import pkgutil

import pytest

PACKAGES = ("analysis", "landscape", "saf", "figures", "cli")


def _modules() -> list[str]:
    names = []
    for pkg in PACKAGES:
        path = importlib.import_module(pkg).__path__
        names += [pkg] + [
            f"{pkg}.{m.name}" for m in pkgutil.iter_modules(path) if m.name != "__main__"
        ]
    return names


MODULES = _modules()
OPTIONAL = {"saf.lightning": "lightning", "saf.huggingface": "transformers"}
"""Integration modules and the optional framework each needs (the 'frameworks' extra)."""


def _import(name: str):
    if name in OPTIONAL:
        pytest.importorskip(OPTIONAL[name], reason=f"{name} needs the optional {OPTIONAL[name]}")
    return importlib.import_module(name)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(
        _import(name),
        optionflags=doctest.ELLIPSIS,
        extraglobs={"torch": importlib.import_module("torch")},
    )
    assert result.failed == 0


def test_the_examples_are_many():
    """Each module with a formula has an example; a loader that found none would pass above."""
    finder = doctest.DocTestFinder()
    names = [n for n in MODULES if n not in OPTIONAL]
    total = sum(len(t.examples) for n in names for t in finder.find(importlib.import_module(n)))
    assert total >= 40
