"""Shared fixtures: one tiny trained run directory (copied per test), and CLI helpers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cli import main
from tests.reliability._launcher import Launcher
from tests.reliability._probe import Probe

BOUND_MIB = 256
"""Peak memory growth a refused or bounded command may show in a probe child (MiB; each
memory bomb of the tests asks for 1 GiB or more)."""

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


@pytest.fixture(scope="session")
def probe(tmp_path_factory):
    """One pre-warmed process that runs each snippet in a forked child (peak growth, timeout)."""
    p = Probe(tmp_path_factory.mktemp("probe"))
    yield p
    p.close()


def cli_in_child(probe, tmp_path, argv, timeout=60) -> tuple[int, list[str]]:
    """``saf argv`` in a probe child: (exit code, output lines); its peak memory growth is
    below :data:`BOUND_MIB`, it ends within ``timeout`` and prints no traceback."""
    code = f"import cli\nrc = cli.main({[str(a) for a in argv]!r})"
    rc, out, grew = probe.run(code, tmp_path / "log", timeout)
    assert grew < BOUND_MIB, (argv, grew, out)
    assert "Traceback" not in out, out
    return rc, out.strip().splitlines()
