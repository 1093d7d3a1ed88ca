"""Issue 23, "tracebacks where one line is promised": each case is one line, its documented
exit code, bounded memory and nothing written.

Memory is measured in a child process (``ru_maxrss``): a buffer of the size the flag asks
for would be terabytes, the refusal stays below :data:`RSS_BOUND`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from analysis import hessian_density, hessian_eigenvalues, hessian_trace, sam_sharpness
from tests.reliability.conftest import TINY_TRAIN, cli_in_child, files_under

ROOT = Path(__file__).resolve().parents[2]
RSS_BOUND = 1.5 * 2**30
"""Peak resident memory of a refused command (the imports alone take ~0.5 GiB)."""


def _child(argv, env=None, timeout=120) -> tuple[int, str, int]:
    """``python -m cli argv`` in a child: (exit code, stderr, the child's peak RSS in bytes:
    VmHWM, which exec starts afresh; ru_maxrss would carry the forking parent's peak)."""
    code = (
        "import sys\n"
        "from cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "hwm = next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:'))\n"
        "sys.stderr.write('\\nRSS=%d' % int(hwm.split()[1]))\n"
        "sys.exit(rc)\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    err, _, rss = p.stderr.rpartition("\nRSS=")
    return p.returncode, err, int(rss) * 1024


def _run(probe, tmp_path, argv) -> tuple[int, str, str]:
    """``saf argv`` in a probe child (bounded memory, a timeout): (code, "", output)."""
    rc, lines = cli_in_child(probe, tmp_path, argv)
    return rc, "", "\n".join(lines)


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_an_invalid_mplbackend_is_one_line_even_for_help():
    p = subprocess.run(
        [sys.executable, "-m", "cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "MPLBACKEND": "bogus"},
    )
    assert p.returncode == 2
    assert "MPLBACKEND='bogus'" in _one_line(p.stderr)


def test_huge_epochs_or_lag_are_one_line_in_bounded_memory(tmp_path):
    """``--epochs 1e12`` asked for a 19 TB store: refused before it is allocated (a 1 GiB
    budget here, so the case does not depend on this machine's memory)."""
    cases = [
        (["--epochs", "1000000000000"], "epochs must be at most"),
        (["--epochs", "100000", "--saf-lag", "50000", "--limit", "1400"], "SAF store"),
    ]
    for extra, message in cases:
        out = tmp_path / "run"
        argv = ["train", *TINY_TRAIN, *extra, "--out", out]
        rc, err, rss = _child(argv, env={"SAF_MEMORY_BUDGET": "1G"})
        assert rc == 2 and message in _one_line(err), err
        assert rss < RSS_BOUND and not out.exists()


def test_a_deeply_nested_run_json_is_one_line(probe, tiny_run, tmp_path):
    (tiny_run / "run.json").write_text("[" * 200_000 + "]" * 200_000)
    before = files_under(tiny_run)
    for cmd in ("analyze", "surface"):
        argv = [cmd, tiny_run, "--out", tmp_path / cmd, "--no-progress"]
        rc, _, err = _run(probe, tmp_path, argv)
        assert rc == 2 and _one_line(err) and not (tmp_path / cmd).exists(), err
    rc, _, err = _run(probe, tmp_path, ["train", "--resume", tiny_run, "--no-progress"])
    assert rc == 2 and "nested too deeply" in _one_line(err)
    assert files_under(tiny_run) == before


def test_a_fifo_named_run_json_does_not_hang(probe, tiny_run, tmp_path):
    (tiny_run / "run.json").unlink()
    os.mkfifo(tiny_run / "run.json")
    rc, _, err = _run(probe, tmp_path, ["train", "--resume", tiny_run, "--no-progress"])
    assert rc == 2 and "not a regular file" in _one_line(err)


def test_a_sketch_larger_than_memory_is_refused_in_one_line_per_checkpoint(tiny_run, tmp_path):
    out = tmp_path / "t.csv"
    argv = ["analyze", tiny_run, "--metrics", "trace", "--trace-matvecs", "1000000000"]
    rc, err, rss = _child([*argv, "--out", out, "--no-progress"])
    assert rc == 3 and rss < RSS_BOUND and "Traceback" not in err
    assert "use fewer matvecs" in err


def test_sigterm_exits_143_with_one_line_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    argv = ["-m", "cli", "train", *TINY_TRAIN, "--epochs", "400", "--out", str(out)]
    p = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((out / "checkpoints").glob("epoch_*.pt")) and time.monotonic() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143
    assert "terminated (SIGTERM)" in _one_line(err)
    assert json.loads((out / "run.json").read_text())["method"] == "saf"
    assert not [f for f in out.rglob("*") if f.suffix == ".tmp" or f.name.startswith(".tmp")]
    last = max(int(f.stem.split("_")[1]) for f in (out / "checkpoints").glob("epoch_*.pt"))
    argv = ["-m", "cli", "train", "--resume", str(out), "--epochs", str(last + 2), "--no-progress"]
    assert subprocess.run([sys.executable, *argv], cwd=ROOT, timeout=120).returncode == 0


def test_a_zero_hessian_is_zero_not_an_error():
    """A loss linear in the weights: every curvature measure is 0, SAM sharpness rho*|g|."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    data = [(x, torch.zeros(4, 2, dtype=torch.float64))]

    def linear(out, _):
        return out.sum() / out.shape[0]

    for cache in (False, True):
        r = hessian_eigenvalues(model, linear, data, k=2, cache=cache)
        assert r.converged and r.values.abs().max() == 0
    assert hessian_trace(model, linear, data).value == 0
    assert hessian_density(model, linear, data, n_iter=4, n_probes=2).nodes.abs().max() == 0
    g = torch.cat([x.sum(0).repeat(2), torch.full((2,), 4.0, dtype=torch.float64)]) / 4
    assert abs(sam_sharpness(model, linear, data, rho=0.05).value - 0.05 * float(g.norm())) < 1e-9


def test_a_grid_beyond_a_million_points_is_one_line_before_any_work(probe, tiny_run, tmp_path):
    out = tmp_path / "s"
    argv = ["surface", tiny_run, "--dim", "2", "--grid", "-1:1:10001", "--out", out]
    rc, _, err = _run(probe, tmp_path, [*argv, "--no-progress"])
    assert rc == 2 and "100,020,001 points" in _one_line(err) and not out.exists()


def test_a_surface_of_a_diverged_checkpoint_is_refused_before_writing(probe, tiny_run, tmp_path):
    """Finite but huge weights: the loss is not finite anywhere, so there is nothing to draw."""
    last = max((tiny_run / "checkpoints").glob("epoch_*.pt"))
    state = torch.load(last, weights_only=True)
    torch.save({k: v * 1e15 if v.is_floating_point() else v for k, v in state.items()}, last)
    out = tmp_path / "s"
    rc, _, err = _run(probe, tmp_path, ["surface", tiny_run, "--grid", "-1:1:3", "--out", out])
    assert rc == 2 and "not finite" in _one_line(err) and not out.exists()


def test_output_names_too_long_are_refused_before_any_work(probe, tiny_run, tmp_path):
    long = tiny_run.rename(tmp_path / ("r" * 240))
    out = tmp_path / "s"
    rc, _, err = _run(probe, tmp_path, ["surface", long, "--grid", "-1:1:3", "--out", out])
    assert rc == 2 and "file system takes" in _one_line(err) and not out.exists()


def test_caches_of_another_shape_are_recomputed_not_fatal(probe, tiny_run, tmp_path):
    out = tmp_path / "t.csv"
    argv = ["analyze", tiny_run, "--metrics", "lambda_max,loss", "--warm-start", "--out", out]
    assert _run(probe, tmp_path, [*argv, "--no-progress"])[0] == 0
    first = out.read_text()
    cache = tmp_path / ".t.csv.cache"
    for f in cache.glob("*.json"):
        f.write_text("[1, 2, 3]")
    for f in cache.glob("warm-*.pt"):
        torch.save({"source": "x", "vectors": 7}, f)
    out.unlink()
    rc, _, err = _run(probe, tmp_path, [*argv, "--no-progress"])
    assert rc == 0 and "Traceback" not in err
    assert out.read_text() == first
