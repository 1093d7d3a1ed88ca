"""Imports point one way: ``cli`` -> ``figures`` -> {``landscape``, ``saf``} -> ``analysis``.

Every import of every shipped module is read from its syntax tree, the ones inside
functions too. Rules:

* a package imports only the packages below it (:data:`ALLOWED`);
* another package's private module or name (``_x``) is never imported: what two
  packages share has a public home in the bottom layer;
* our own modules are imported at module level only (a function-level import hides a
  cycle), and the module graph has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "analysis": set(),
    "landscape": {"analysis"},
    "saf": {"analysis"},
    "figures": {"analysis", "landscape", "saf"},
    "cli": {"analysis", "landscape", "saf", "figures"},
    "benchmarks": {"analysis", "landscape", "saf", "figures", "cli"},
}
PACKAGES = tuple(ALLOWED)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(tree: ast.AST, module: str, is_package: bool):
    """``(line, imported module, imported names, inside a function)`` of a syntax tree."""
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inner = {id(n) for f in funcs for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, [], id(node) in inner
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join([*pkg, base] if base else pkg)
            yield node.lineno, base, [a.name for a in node.names], id(node) in inner


def sources(root: Path = ROOT) -> dict[str, tuple[Path, str]]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            out[module_name(path, root)] = (path, path.read_text())
    return out


def violations(files: dict[str, tuple[Path, str]]) -> list[str]:
    """Every broken rule of the module docstring, one line each."""
    found, graph = [], {}
    for mod, (path, text) in files.items():
        own = mod.split(".")[0]
        edges = graph.setdefault(mod, set())
        for line, target, names, in_function in imports(
            ast.parse(text), mod, path.name == "__init__.py"
        ):
            top = target.split(".")[0]
            if top not in PACKAGES:
                continue
            where = f"{path.relative_to(path.parents[1])}:{line}"
            if top != own and top not in ALLOWED[own]:
                found.append(f"{where}: {own} may not import {top}")
            path_private = any(p.startswith("_") for p in target.split(".")[1:])
            name_private = [n for n in names if n.startswith("_")]
            if top != own and (path_private or name_private):
                name = target if path_private else f"{target}.{name_private[0]}"
                found.append(f"{where}: private {name}")
            if in_function:
                found.append(f"{where}: import of {target} inside a function")
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in files]
            edges.update(subs or ([target] if target in files else []))
    found += [f"import cycle: {' -> '.join(c)}" for c in _cycles(graph)]
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    seen, stack, out = set(), [], []

    def visit(m):
        if m in stack:
            out.append(stack[stack.index(m) :] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            visit(n)
        stack.pop()

    for m in sorted(graph):
        visit(m)
    return out


def test_imports_point_one_way_with_no_cycle_and_no_private_import():
    assert violations(sources()) == []


@pytest.mark.parametrize(
    "module, text, expected",
    [
        ("analysis.x", "import saf\n", "analysis may not import saf"),
        ("saf.x", "from landscape import surface\n", "saf may not import landscape"),
        ("landscape.x", "from analysis._io import load\n", "private analysis._io"),
        ("figures.x", "from saf import _distributed\n", "private saf._distributed"),
        ("saf.x", "def f():\n    from analysis import io\n", "inside a function"),
        ("saf.a", "from saf import b\n", "import cycle: saf.a -> saf.b -> saf.a"),
    ],
)
def test_the_checker_finds_each_broken_rule(tmp_path, module, text, expected):
    """The rule test can fail: a forbidden import in a small fake tree is reported."""
    files = {}
    for name, body in [(module, text), ("saf.b", "from saf import a\n")]:
        path = tmp_path.joinpath(*name.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
        files[name] = (path, body)
    files["saf"] = (tmp_path / "saf" / "__init__.py", "")
    if module != "saf.a":
        files.pop("saf.b")
    assert any(expected in v for v in violations(files)), violations(files)
