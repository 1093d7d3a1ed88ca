"""Issue 6, item 1: `saf train` killed with SIGKILL at >= 10 random points (many of them
inside an atomic write) always resumes with `saf train --resume RUN_DIR`; on CPU the final
weights equal an uninterrupted run's bitwise, and at every kill point every file that
`saf analyze` reads (run.json, metrics.csv, checkpoints, state.pt) is complete."""

from __future__ import annotations

import contextlib
import io
import random
from pathlib import Path

import pandas as pd
import pytest
import torch

from analysis import load_state_dict, safe_torch_load
from cli import main
from saf import METRIC_COLUMNS, list_checkpoints, model_from_run, read_metrics, read_run
from tests.reliability._launcher import kill_at

TINY = ["--method", "saf", "--model", "mlp", "--model-kwargs", '{"width": 16}', "--limit", "64"]
TINY += ["--batch-size", "16", "--saf-start", "1", "--saf-lag", "1", "--no-progress"]
TINY += ["--threads", "1"]
SLOW_IO = 0.005  # each fsync of a killed run lasts 5 ms: kills land inside writes too
DETERMINISTIC = [c for c in METRIC_COLUMNS if c not in ("seconds", "images_per_s")]


def assert_complete(run_dir: Path) -> None:
    """Every file a reader of the run directory opens is whole and consistent."""
    if not (run_dir / "run.json").exists():
        assert not list_checkpoints(run_dir) and not (run_dir / "state.pt").exists()
        return
    model = model_from_run(read_run(run_dir))
    ckpts = list_checkpoints(run_dir)
    for _, path in ckpts:
        model.load_state_dict(load_state_dict(path), strict=True)
    metrics = read_metrics(run_dir)
    assert list(metrics.columns) == list(METRIC_COLUMNS)
    assert metrics["epoch"].tolist() == list(range(1, len(metrics) + 1))
    assert all(e in dict(ckpts) for e in metrics["epoch"])
    if (run_dir / "state.pt").exists():
        state = safe_torch_load(run_dir / "state.pt")
        assert state["epoch"] in dict(ckpts) and len(state["metrics"]) == state["epoch"]


def assert_analyze_reads(run_dir: Path, k: int) -> None:
    """`saf analyze` on the killed run skips nothing: no file it reads is half-written."""
    if not list_checkpoints(run_dir):
        return
    out = run_dir.parent / f"analysis-{k}.csv"
    argv = ["analyze", str(run_dir), "--metrics", "loss", "--n-samples", "32", "--out", str(out)]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main([*argv, "--no-progress"]) == 0, err.getvalue()
    table = pd.read_csv(out)
    assert len(table) == len(list_checkpoints(run_dir)) and (table.status == "ok").all()


def assert_same_run(a: Path, b: Path) -> None:
    ca, cb = list_checkpoints(a), list_checkpoints(b)
    assert [e for e, _ in ca] == [e for e, _ in cb]
    for (_, pa), (_, pb) in zip(ca, cb, strict=True):
        wa, wb = load_state_dict(pa), load_state_dict(pb)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), pa.name
    ma, mb = read_metrics(a)[DETERMINISTIC], read_metrics(b)[DETERMINISTIC]
    assert ma.equals(mb)


def train_with_kills(launcher, run_dir: Path, epochs: int, kills: int, seed: int) -> dict:
    """Start, SIGKILL at seeded random points, resume; repeat, then resume to the end."""
    rng, log = random.Random(seed), run_dir.parent / f"{run_dir.name}.log"
    folders = (run_dir, run_dir / "checkpoints")
    fresh = ["train", *TINY, "--epochs", str(epochs), "--out", run_dir]
    report = {"kills": 0, "in_write": 0, "launches": 0}
    while True:
        argv = fresh if not (run_dir / "run.json").exists() else ["train", "--resume", run_dir]
        report["launches"] += 1
        if report["kills"] < kills:
            # a kill point: inside the k-th atomic write (every other kill: the write is
            # held open between fsync and os.replace), or a random few milliseconds after
            # the k-th write began (inside it, or inside the training computation)
            k, delay = rng.randint(1, 4), rng.choice([0.0, rng.uniform(0.0, 0.03)])
            held = report["kills"] % 2 == 0
            landed, status, stray = kill_at(launcher, argv, log, folders, k, delay, held, SLOW_IO)
            if landed:
                assert status == -9, log.read_text()
                assert stray or not held, "a kill inside a write left no temporary file"
                report["kills"] += 1
                report["in_write"] += stray
                assert_complete(run_dir)
                assert_analyze_reads(run_dir, report["kills"])
                if report["kills"] == 3:  # a torn write from another writer: stray temp files
                    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
                    torn = b"PK\x03\x04" + bytes(95)  # the start of a zip (torch.save) file
                    (run_dir / "checkpoints" / ".epoch_0002.pt.torn.tmp").write_bytes(torn)
                    (run_dir / ".state.pt.torn.tmp").write_bytes(b"\x80\x02garbage")
                continue
        else:
            status = launcher.run(argv, log)
        assert status == 0, log.read_text()
        return report


def _check(launcher, tmp_path, epochs, kills, seed):
    ref = tmp_path / "ref"
    assert (
        launcher.run(["train", *TINY, "--epochs", epochs, "--out", ref], tmp_path / "ref.log") == 0
    )
    killed = tmp_path / "killed"
    report = train_with_kills(launcher, killed, epochs, kills, seed)
    assert report["kills"] >= kills, report
    assert report["in_write"] >= 3, report  # kills that left a half-written temporary file
    assert_complete(killed)
    assert_same_run(ref, killed)
    return report


def test_train_survives_sigkill_bitwise(launcher, tmp_path):
    report = _check(launcher, tmp_path, epochs=12, kills=10, seed=6)
    print(report)


@pytest.mark.slow
def test_train_survives_many_sigkills_bitwise(launcher, tmp_path):
    _check(launcher, tmp_path, epochs=30, kills=40, seed=7)
