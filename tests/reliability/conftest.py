"""Shared fixtures: one tiny trained run directory (copied per test), and CLI helpers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cli import main
from tests.reliability._launcher import Launcher

TINY_TRAIN = ["--method", "saf", "--model", "mlp", "--model-kwargs", '{"width": 16}']
TINY_TRAIN += ["--limit", "64", "--batch-size", "32", "--saf-start", "1", "--saf-lag", "1"]
TINY_TRAIN += ["--no-progress"]


@pytest.fixture(scope="session")
def launcher(tmp_path_factory):
    """One pre-warmed process that forks a killable child per `saf` command."""
    lau = Launcher(tmp_path_factory.mktemp("launcher"))
    yield lau
    lau.close()


@pytest.fixture(scope="session")
def tiny_run_master(tmp_path_factory) -> Path:
    """A finished 3-epoch run (checkpoints epoch_0000 .. epoch_0003); never modified."""
    out = tmp_path_factory.mktemp("master") / "run"
    assert main(["train", *TINY_TRAIN, "--epochs", "3", "--out", str(out)]) == 0
    return out


@pytest.fixture
def tiny_run(tiny_run_master, tmp_path) -> Path:
    """A private copy of the tiny run, free to damage."""
    return Path(shutil.copytree(tiny_run_master, tmp_path / "run"))


def files_under(path: Path) -> dict[str, bytes]:
    """Every file below ``path`` with its content (to prove nothing was written)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def run_cli(capsys, argv) -> tuple[int, str, str]:
    """``cli.main(argv)`` in-process: (exit code, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err
