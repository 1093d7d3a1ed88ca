"""Property-based fuzz of every subcommand: flags and values, run.json and checkpoint contents.

Whatever the input, `saf` exits 0, 2 or 3, never prints a traceback, and writes nothing
when it exits 2. The flags are read off the real parser, so a new option is fuzzed too. Cheap
base arguments come last (argparse keeps the last value), so a case that is valid runs in a
fraction of a second; `saf figures` is stopped after its validation (the study itself is
covered by tests/figures)."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import cli
import cli._figures
from tests.reliability.conftest import files_under, run_cli
from tests.reliability.test_round_three_files import HOSTILE, hostile

VALUES = ["", "0", "1", "-1", "2", "7", "0.5", "nan", "inf", "-inf", "1e9", "1e-300", "abc",
          "x:y", ".:x", "os:getcwd", "builtins:list", "tests.reliability._factory:tiny_mlp",
          "digits", "mnist1d", "cifar10", "ce", "mse", "bce", "nll", "float64", "train", "test",
          "eval", "worst", "average", "random", "pca", "hessian", "interpolate", "filter",
          "none", "biasbn", "-1:1:3", "1:-1:3", "-1:1:1", "epoch_(\\d+)", "(", "state_dict",
          "ema", "{}", '{"width": 8}', '{"width": 0}', "[1]", "\x00", "é" * 3,
          "/dev/null", "1000000000", "1e12", "lambda_1000000000", "lambda_5,trace"]  # fmt: skip
SKIP = {"--help", "--out", "--resume", "--device", "--progress", "--no-progress", "--plots",
        "--no-plots", "--data-dir", "--threads"}  # fmt: skip
BASE = {
    "train": ["--model", "mlp", "--limit", "32", "--batch-size", "16", "--epochs", "2",
              "--no-progress"],
    "analyze": ["--metrics", "loss", "--n-samples", "32", "--no-progress"],
    "surface": ["--dim", "1", "--grid", "-1:1:3", "--grid-y", "-1:1:3", "--n-samples", "32",
                "--no-plots", "--no-progress"],
    "figures": ["--no-progress"],
}  # fmt: skip


def _options(command: str) -> list[tuple[str, bool]]:
    """``(flag, takes a value)`` of a subcommand, from the real parser."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    out = []
    for action in sub._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag not in SKIP:
                out.append((flag, action.nargs != 0))
    return out


OPTIONS = {c: _options(c) for c in BASE}


def _argv(data, command: str) -> list[str]:
    flags = data.draw(st.lists(st.sampled_from(OPTIONS[command]), min_size=1, max_size=3))
    argv = []
    for flag, takes in flags:
        argv += [flag, data.draw(st.sampled_from(VALUES))] if takes else [flag]
    return argv


@pytest.fixture
def stub_pipeline(monkeypatch):
    """`saf figures` validates everything, then stops here instead of running the study."""
    monkeypatch.setattr(cli._figures, "run_pipeline", lambda *a, **k: "index.html")


def _check(capsys, argv, watched, out):
    before = {str(p): files_under(p) for p in watched}
    rc, _, err = run_cli(capsys, argv)
    assert rc in (0, 2, 3), (argv, rc, err)
    assert "Traceback" not in err, (argv, err)
    if rc == 2:
        assert len(err.strip().splitlines()) == 1, (argv, err)
        if "training diverged" not in err:  # divergence keeps the last good checkpoint
            assert not out.exists(), (argv, err)
        assert {str(p): files_under(p) for p in watched} == before, argv
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()


SETTINGS = settings(max_examples=75, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip


@pytest.mark.parametrize("command", list(BASE))
@SETTINGS
@given(data=st.data())
def test_any_command_line_exits_0_2_or_3_without_a_traceback(
    command, data, tiny_run, tmp_path, capsys, stub_pipeline
):
    out = tmp_path / "out"
    target = [] if command in ("train", "figures") else [str(tiny_run)]
    argv = [command, *target, *_argv(data, command), *BASE[command], "--out", str(out)]
    _check(capsys, argv, [tiny_run], out)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(
    path=st.sampled_from([("model", "name"), ("model", "kwargs"), ("data", "name"),
                          ("data", "num_classes"), ("data", "in_shape"), ("model",),
                          ("data",), ("format",)]),
    value=st.one_of(st.none(), st.integers(-10, 10**9), st.floats(allow_nan=True),
                    st.text(max_size=12), st.lists(st.integers(-2, 70), max_size=4),
                    st.dictionaries(st.sampled_from(["width", "depth", "x"]),
                                    st.integers(-2, 10**8), max_size=2)),
)  # fmt: skip
def test_any_run_json_is_analysed_or_refused_in_one_line(tiny_run, tmp_path, capsys, path, value):
    original = json.loads((tiny_run / "run.json").read_text())
    info = copy.deepcopy(original)
    node = info
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    (tiny_run / "run.json").write_text(json.dumps(info))
    out = tmp_path / "t.csv"
    try:
        _check(capsys, ["analyze", str(tiny_run), *BASE["analyze"], "--out", str(out)],
               [tiny_run / "checkpoints"], out)  # fmt: skip
    finally:
        (tiny_run / "run.json").write_text(json.dumps(original))


SHAPES = [*HOSTILE, "non-utf8-name", "cr-name"]
"""Hostile files of issue 23 (legacy and compressed pickles, zip headers that disagree,
sizes beyond the file, a FIFO) and checkpoint names that are not one line of UTF-8."""


def _shape(kind: str, victim) -> object:
    """Put the shape ``kind`` in place of (or beside) ``victim``; the extra file, if any."""
    if kind not in ("non-utf8-name", "cr-name"):
        hostile(kind, victim)
        return None
    name = os.fsdecode(b"epoch_0002\xff.pt") if kind == "non-utf8-name" else "epoch_0002\r.pt"
    shutil.copyfile(victim, victim.with_name(name))
    return victim.with_name(name)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(
    content=st.one_of(
        st.sampled_from([("shape", k) for k in SHAPES]),
        st.binary(max_size=64),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers()),
                        st.one_of(st.integers(), st.text(max_size=4), st.none(),
                                  st.just(torch.zeros(2)),
                                  st.just(torch.ones(3, dtype=torch.int8))),
                        max_size=4),
        st.lists(st.integers(), max_size=3),
    )
)  # fmt: skip
@example(content=("shape", "legacy-pickle"))
@example(content=("shape", "misnamed-local-header"))
@example(content=("shape", "deflated-pickle-1GiB"))
@example(content=("shape", "deflated-storage-1.5GiB"))
@example(content=("shape", "stored-storage-over-the-file"))
@example(content=("shape", "fifo"))
@example(content=("shape", "non-utf8-name"))
@example(content=("shape", "cr-name"))
def test_any_checkpoint_content_is_analysed_or_named(tiny_run, tmp_path, capsys, content):
    victim = tiny_run / "checkpoints" / "epoch_0002.pt"
    original, extra = victim.read_bytes(), None
    if isinstance(content, tuple) and content[0] == "shape":
        extra = _shape(content[1], victim)
    elif isinstance(content, bytes):
        victim.write_bytes(content)
    else:
        torch.save(content, victim)
    out = tmp_path / "t.csv"
    try:
        _check(capsys, ["analyze", str(tiny_run), *BASE["analyze"], "--out", str(out)],
               [tiny_run / "run.json"], out)  # fmt: skip
    finally:
        victim.unlink()
        victim.write_bytes(original)
        if extra is not None:
            extra.unlink()
