"""Issue 6, item 2: `saf surface` (2D) and `saf analyze` killed with SIGKILL at >= 10 seeded
random points (many inside an atomic write). After every kill the files on disk are whole;
the rerun computes only what is missing (the surface's own ``evaluated_points`` report; a
counter on the analysis computations), and the result equals an uninterrupted run's."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import analysis._checkpoints as ac
from landscape import Surface
from tests.reliability._launcher import kill_at
from tests.reliability.conftest import run_cli

KILLS = 10
SLOW_IO = 0.005  # each fsync of a killed run lasts 5 ms: kills land inside writes too


def kill_repeatedly(launcher, argv, folders, log, kills, seed, check) -> dict:
    """Launch ``argv`` and SIGKILL it at seeded random points until ``kills`` kills landed
    (``check()`` after each); returns counts. Every other kill lands inside an atomic write
    (held open between fsync and ``os.replace``), the others at a random time after the
    first writes. Stops early if a launch finishes."""
    rng, report = random.Random(seed), {"kills": 0, "in_write": 0, "finished": False}
    while report["kills"] < kills:
        k, delay = rng.randint(1, 2), rng.choice([0.0, rng.uniform(0.0, 0.02)])
        held = report["kills"] % 2 == 0
        landed, status, stray = kill_at(launcher, argv, log, folders, k, delay, held, SLOW_IO)
        if not landed:
            assert status == 0, log.read_text()
            report["finished"] = True
            return report
        assert status == -9, log.read_text()
        assert stray or not held, "a kill inside a write left no temporary file"
        report["kills"] += 1
        report["in_write"] += stray
        check()
    return report


# --- 2D surface -----------------------------------------------------------------------------


def _surface_file(out: Path) -> Path | None:
    files = sorted(out.glob("*_2d.npz"))
    return files[0] if files else None


def test_surface_2d_survives_sigkill(launcher, tiny_run_master, tmp_path):
    grid = ["--dim", "2", "--grid", "-1:1:13", "--n-samples", "128", "--batch-size", "128"]
    args = ["surface", tiny_run_master, *grid, "--no-plots", "--no-progress"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert launcher.run([*args, "--out", ref], tmp_path / "ref.log") == 0
    progress = [0]

    def check():  # a partial surface on disk is whole, and never loses points
        f = _surface_file(out)
        if f is not None:
            s = Surface.load(f)
            assert int(s.done.sum()) >= progress[0]
            progress[0] = int(s.done.sum())

    log = tmp_path / "out.log"
    report = kill_repeatedly(launcher, [*args, "--out", out], [out], log, KILLS, 61, check)
    print(report)
    assert report["kills"] >= KILLS and report["in_write"] >= 3, report
    assert 0 < progress[0] < 169, progress  # some points were saved, some still missing
    before = int(Surface.load(_surface_file(out)).done.sum())
    assert launcher.run([*args, "--out", out], log) == 0  # the rerun, to the end
    final, want = Surface.load(_surface_file(out)), Surface.load(_surface_file(ref))
    assert final.metadata["evaluated_points"] == 169 - before  # only the missing points
    assert final.complete and np.array_equal(final.loss, want.loss)
    assert np.array_equal(final.accuracy, want.accuracy)


# --- saf analyze ----------------------------------------------------------------------------

METRICS = ["--metrics", "loss,lambda_max,trace,sam_sharpness", "--trace-matvecs", "9"]
METRICS += ["--tol", "1e-3", "--n-samples", "64", "--batch-size", "32", "--threads", "1"]
GROUPS = [["loss", "accuracy"], ["lambda_max"], ["trace"], ["sam_sharpness"]]


def _groups_cached(cache: Path) -> int:
    n = 0
    for f in cache.glob("*.json"):
        done = json.loads(f.read_text())
        n += sum(all(m in done for m in g) for g in GROUPS)
    return n


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_analyze_survives_sigkill(launcher, tiny_run_master, tmp_path, monkeypatch, capsys,
                                  one_thread):  # fmt: skip
    ref = Path(shutil.copytree(tiny_run_master, tmp_path / "ref"))
    run = Path(shutil.copytree(tiny_run_master, tmp_path / "run"))
    args = ["analyze", "--no-progress", *METRICS]
    assert launcher.run([*args[:1], ref, *args[1:]], tmp_path / "ref.log") == 0
    cache = run / ".analysis.csv.cache"
    progress = [0]

    def check():  # every cache file on disk is whole JSON; cached work never shrinks
        for f in cache.glob("*.json"):
            json.loads(f.read_text())
        assert _groups_cached(cache) >= progress[0]
        progress[0] = _groups_cached(cache)

    argv = [*args[:1], run, *args[1:]]
    report = kill_repeatedly(launcher, argv, [cache, run], tmp_path / "run.log", KILLS, 62, check)
    print(report)
    assert report["kills"] >= KILLS and report["in_write"] >= 3, report
    assert 0 < progress[0] < 16, progress
    computed, orig = [], ac._compute
    monkeypatch.setattr(ac, "_compute", lambda key, *a: computed.append(key) or orig(key, *a))
    rc, _, err = run_cli(capsys, argv)  # the rerun, in-process to count the computations
    assert rc == 0, err
    assert len(computed) == 16 - progress[0]  # only what was missing
    a, b = pd.read_csv(ref / "analysis.csv"), pd.read_csv(run / "analysis.csv")
    assert a.equals(b), (a, b)
