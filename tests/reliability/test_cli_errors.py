"""Issue 6, item 5: malformed command lines over every subcommand. Each case gives exactly
one line on stderr, exit code 2, no traceback, and writes nothing: the output path is not
created and the run directory is left byte-for-byte as it was.

Placeholders: {RUN} a finished tiny run, {CKPT} one of its checkpoints, {OUT} a fresh
output path, {FILE} a regular file (so {FILE}/out cannot be created, even by root),
{MISSING} a path that does not exist, {EMPTY} an empty folder.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.reliability.conftest import files_under, run_cli

TRAIN = [
    ["--epochs", "-1"],
    ["--epochs", "0"],
    ["--epochs", "nan"],
    ["--epochs", "1.5"],
    ["--lr", "nan"],
    ["--lr", "-0.1"],
    ["--lr", "inf"],
    ["--lr", "0"],
    ["--batch-size", "0"],
    ["--batch-size", "-64"],
    ["--momentum", "1"],
    ["--momentum", "nan"],
    ["--weight-decay", "-1e-4"],
    ["--rho", "nan"],
    ["--saf-lambda", "inf"],
    ["--limit", "1"],
    ["--limit", "-5"],
    ["--seed", "-3"],
    ["--threads", "0"],
    ["--ema-decay", "1"],
    ["--warmup-epochs", "-1"],
    ["--device", "tpu"],
    ["--device", "cuda:7"],
    ["--data", "mnist"],
    ["--model", "vgg"],
    ["--model-kwargs", "{bad json"],
    ["--model-kwargs", "[1, 2]"],
    ["--model-kwargs", '{"width": -3}'],
    ["--model-kwargs", '{"width": 0}'],
    ["--model-kwargs", '{"width": "wide"}'],
    ["--model-kwargs", '{"nope": 1}'],
    ["--data-dir", "{MISSING}"],
    ["--resume", "{MISSING}"],
    ["--resume", "{EMPTY}"],
    ["--resume", "{FILE}"],
    ["--bogus-option"],
    ["stray-positional"],
]
TRAIN_OUT = [["--out", "{FILE}/out"], ["--out", "/proc/1/no-such-dir/out"], ["--out", "{FILE}"]]

SURFACE = [
    ["--grid", "-1:1:0"],
    ["--grid", "-1:1:1"],
    ["--grid", "a:b:c"],
    ["--grid", "1:-1:5"],
    ["--grid", "0:0:5"],
    ["--grid", "nan:1:5"],
    ["--grid", "-1:inf:5"],
    ["--grid", "-1:1"],
    ["--grid", "-1:1:5:7"],
    ["--grid", "-1:1:-5"],
    ["--grid", "-1:1:2.5"],
    ["--grid", ""],
    ["--grid-y", "1:0:3"],
    ["--dim", "3"],
    ["--dim", "0"],
    ["--dim", "nan"],
    ["--n-samples", "-5"],
    ["--n-samples", "0"],
    ["--n-samples", "nan"],
    ["--batch-size", "0"],
    ["--epoch", "-1"],
    ["--epoch", "99"],
    ["--seed", "-1"],
    ["--seed", "nan"],
    ["--device", "cuda:3"],
    ["--directions", "sideways"],
    ["--norm", "weird"],
    ["--compare", "{MISSING}"],
    ["--compare", "{EMPTY}"],
    ["--directions", "interpolate", "--dim", "2", "--compare", "{RUN}"],
    ["--data-dir", "{MISSING}"],
]
SURFACE_TARGET = [["{MISSING}"], ["{EMPTY}"], ["{FILE}"], ["{CKPT}", "--epoch", "1"]]
SURFACE_OUT = [["--out", "{FILE}/out"], ["--out", "/proc/1/no-such-dir/out"], ["--out", "{FILE}"]]

ANALYZE = [
    ["--metrics", "bogus"],
    ["--metrics", ""],
    ["--metrics", "lambda_0"],
    ["--metrics", "lambda_max,,nope"],
    ["--every", "0"],
    ["--every", "-1"],
    ["--every", "nan"],
    ["--tol", "nan"],
    ["--tol", "-1"],
    ["--rho", "-0.05"],
    ["--rho", "inf"],
    ["--m", "0"],
    ["--steps", "0"],
    ["--trace-matvecs", "-3"],
    ["--batch-size", "nan"],
    ["--n-samples", "0"],
    ["--dtype", "float16"],
    ["--kind", "best"],
    ["--device", "cuda"],
    ["--model", "no.such.module:make"],
    ["--model", "not-a-spec"],
    ["--model", "math:no_such_function"],
    ["--model", "math:pi"],
    ["--data", "mnist"],
    ["--data", "no.such.module:batches"],
    ["--data-dir", "{MISSING}"],
]
ANALYZE_TARGET = [["{MISSING}"], ["{EMPTY}"], ["{FILE}"]]
ANALYZE_OUT = [["--out", "{FILE}/out/a.csv"], ["--out", "/proc/1/no-such-dir/a.csv"]]

FIGURES = [
    ["--seeds", "0"],
    ["--seeds", "-2"],
    ["--epochs", "nan"],
    ["--epochs", "0"],
    ["--methods", "sgd"],
    ["--methods", "sgd,adam"],
    ["--m-values", "a,b"],
    ["--m-values", "0,4"],
    ["--data", "cifar10"],
    ["--data", "digits", "--data-dir", "{EMPTY}"],
    ["--data", "cifar10", "--data-dir", "{MISSING}"],
    ["--data", "cifar100", "--data-dir", "{EMPTY}"],
    ["--surface-span", "-1"],
    ["--surface-span", "nan"],
    ["--surface-points", "0"],
    ["--lr", "-1"],
    ["--batch-size", "0"],
    ["--device", "cuda:1"],
    ["--model", "vgg"],
]
FIGURES_OUT = [["--out", "{FILE}/out"], ["--out", "/proc/1/no-such-dir/out"], ["--out", "{FILE}"]]


def _cases():
    out = "{OUT}"
    for a in TRAIN:
        yield "train", ["train", *a] if "--resume" in a else ["train", *a, "--out", out]
    for a in TRAIN_OUT:
        yield "train", ["train", "--epochs", "1", *a]
    quiet = ["--no-plots", "--no-progress"]
    for a in SURFACE:
        yield "surface", ["surface", "{RUN}", *a, *quiet, "--out", out]
    for a in SURFACE_TARGET:
        yield "surface", ["surface", *a, *quiet, "--out", out]
    for a in SURFACE_OUT:
        yield "surface", ["surface", "{RUN}", "--dim", "1", "--grid", "-1:1:3", *quiet, *a]
    for a in ANALYZE:
        yield "analyze", ["analyze", "{RUN}", *a, "--no-progress", "--out", f"{out}/a.csv"]
    for a in ANALYZE_TARGET:
        yield "analyze", ["analyze", *a, "--no-progress", "--out", f"{out}/a.csv"]
    for a in ANALYZE_OUT:
        yield "analyze", ["analyze", "{RUN}", "--metrics", "loss", "--no-progress", *a]
    for a in FIGURES:
        yield "figures", ["figures", "--quick", *a, "--no-progress", "--out", out]
    for a in FIGURES_OUT:
        yield "figures", ["figures", "--quick", "--epochs", "1", "--no-progress", *a]
    yield "saf", []
    yield "saf", ["frobnicate"]
    yield "saf", ["--bogus"]


CASES = list(_cases())


def _fill(argv, paths):
    for key, value in paths.items():
        argv = [a.replace("{" + key + "}", value) for a in argv]
    return argv


@pytest.fixture
def places(tiny_run, tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    return {
        "RUN": str(tiny_run),
        "CKPT": str(tiny_run / "checkpoints" / "epoch_0001.pt"),
        "OUT": str(tmp_path / "out"),
        "FILE": str(tmp_path / "afile"),
        "MISSING": str(tmp_path / "missing"),
        "EMPTY": str(tmp_path / "empty"),
    }


def assert_refused(capsys, argv, places) -> str:
    """Exit 2, one line on stderr, no traceback, nothing written anywhere."""
    root = Path(places["RUN"]).parent
    before = files_under(root)
    rc, _, err = run_cli(capsys, argv)
    lines = err.strip().splitlines()
    assert rc == 2, (argv, rc, err)
    assert len(lines) == 1 and "Traceback" not in err, (argv, err)
    assert lines[0].startswith("saf"), err
    after = files_under(root)
    assert after == before, (argv, sorted(set(after) ^ set(before)))
    for name in ("missing", "out"):  # no output folder created, not even an empty one
        assert not (root / name).exists(), argv
    return lines[0]


@pytest.mark.parametrize(
    ("command", "argv"), CASES, ids=[f"{c}:{' '.join(a[1:])}"[:80] for c, a in CASES]
)
def test_malformed_command_line(capsys, places, command, argv):
    assert_refused(capsys, _fill(argv, places), places)


GRID_TEXT = st.text(alphabet="-+0123456789.:eainf ", max_size=12)


@settings(max_examples=150, deadline=None)
@given(text=GRID_TEXT)
def test_grid_spec_accepts_only_increasing_finite_grids(text):
    """Any string either parses to >= 2 finite increasing points, or is refused by argparse."""
    import argparse

    from cli._surface import grid_spec

    try:
        g = grid_spec(text)
    except argparse.ArgumentTypeError as e:
        assert text in str(e) or repr(text) in str(e)
        return
    a, b, n = text.split(":")
    assert len(g) == int(n) >= 2 and np.all(np.isfinite(g)) and np.all(np.diff(g) > 0)
    assert g[0] == float(a) and math.isclose(g[-1], float(b))


@settings(max_examples=40, deadline=None)
@given(
    option=st.sampled_from(
        [
            ("train", "--lr"),
            ("train", "--epochs"),
            ("train", "--batch-size"),
            ("train", "--saf-tau"),
            ("surface", "--n-samples"),
            ("analyze", "--tol"),
            ("analyze", "--every"),
            ("figures", "--seeds"),
        ]  # fmt: skip
    ),
    value=st.sampled_from(["-1", "0", "nan", "-inf", "inf", "1e999", "", "x", "0x10", "1,5"]),
)
def test_bad_numbers_over_subcommands(tmp_path_factory, tiny_run_master, option, value):
    """Negative, zero, NaN, infinite, empty or non-numeric values: exit 2, one line."""
    import contextlib
    import io

    from cli import main

    command, flag = option
    out = tmp_path_factory.mktemp("h") / "out"
    pos = [str(tiny_run_master)] if command in ("surface", "analyze") else []
    argv = [command, *pos, f"{flag}={value}", "--out", str(out / "x.csv"), "--no-progress"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    lines = err.getvalue().strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err.getvalue(), (argv, lines)
    assert not out.exists()
