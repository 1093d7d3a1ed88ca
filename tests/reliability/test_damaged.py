"""Issue 6, items 4 and 6 (analysis half): damaged inputs. Checkpoints that are corrupt,
truncated, empty, of the wrong architecture or of the wrong dtype; a run.json with missing
or unknown keys; a damaged metrics.csv. Each gives a clear message naming the file, the
rest is processed, and the exit code is EXIT_SKIPPED (3). A checkpoint with NaN or Inf
weights gives NaN rows, not a crash."""

from __future__ import annotations

import json
import math
import random

import pandas as pd
import pytest
import torch

from cli._common import EXIT_SKIPPED
from saf.models import build_model
from tests.reliability.conftest import run_cli

GOOD = ["epoch_0000.pt", "epoch_0001.pt", "epoch_0003.pt"]


def _damage(path, kind):
    blob = path.read_bytes()
    sd = torch.load(path, weights_only=True)
    if kind == "corrupt":
        rng = random.Random(0)
        path.write_bytes(bytes(rng.randrange(256) for _ in range(len(blob))))
    elif kind == "corrupt-inside-zip":  # valid zip header, garbage after it
        path.write_bytes(blob[:200] + bytes(len(blob) - 200))
    elif kind == "truncated":
        path.write_bytes(blob[: len(blob) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "wrong-architecture":  # same model family, other width
        torch.save(build_model("mlp", 10, (1, 8, 8), width=8).state_dict(), path)
    elif kind == "other-model":  # other keys altogether
        torch.save(build_model("resnet_small", 10, (1, 8, 8), width=4).state_dict(), path)
    elif kind == "int-dtype":
        torch.save({k: v.round().to(torch.int64) for k, v in sd.items()}, path)
    elif kind == "complex-dtype":
        torch.save({k: v.to(torch.complex64) for k, v in sd.items()}, path)
    elif kind == "not-a-state-dict":
        torch.save([1, 2, 3], path)
    elif kind == "directory":
        path.unlink()
        path.mkdir()
    else:
        raise ValueError(kind)


KINDS = [
    "corrupt",
    "corrupt-inside-zip",
    "truncated",
    "empty",
    "wrong-architecture",
    "other-model",
    "int-dtype",
    "complex-dtype",
    "not-a-state-dict",
]


def _analyze(capsys, run, *extra):
    argv = ["analyze", run, "--metrics", "loss,accuracy", "--no-progress", *extra]
    return run_cli(capsys, argv)


def _table(run):
    return pd.read_csv(run / "analysis.csv")


@pytest.mark.parametrize("kind", KINDS)
def test_analyze_skips_damaged_checkpoint_names_it_and_does_the_rest(tiny_run, capsys, kind):
    _damage(tiny_run / "checkpoints" / "epoch_0002.pt", kind)
    rc, _, err = _analyze(capsys, tiny_run)
    assert rc == EXIT_SKIPPED, err
    assert "Traceback" not in err and "Warning" not in err, err
    named = [ln for ln in err.strip().splitlines() if "epoch_0002.pt" in ln]
    assert len(named) == 1 and len(err.strip().splitlines()) == 1, err
    t = _table(tiny_run)
    assert sorted(set(t[t.status == "ok"].checkpoint)) == GOOD
    bad = t[t.checkpoint == "epoch_0002.pt"]
    assert len(bad) == 2 and bad.value.isna().all() and (bad.status != "ok").all()


def test_analyze_several_damaged_files_and_a_stray_temp_file(tiny_run, capsys):
    ck = tiny_run / "checkpoints"
    _damage(ck / "epoch_0001.pt", "truncated")
    _damage(ck / "epoch_0002.pt", "empty")
    (ck / "epoch_0009.safetensors").write_bytes(b"\x00" * 10)
    (ck / ".epoch_0004.pt.x1y2.tmp").write_bytes(b"half a file")  # a torn atomic write
    rc, _, err = _analyze(capsys, tiny_run)
    assert rc == EXIT_SKIPPED and "Traceback" not in err, err
    for name in ("epoch_0001.pt", "epoch_0002.pt", "epoch_0009.safetensors"):
        assert sum(name in ln for ln in err.splitlines()) == 1, err
    assert "tmp" not in err
    t = _table(tiny_run)
    assert sorted(set(t[t.status == "ok"].checkpoint)) == ["epoch_0000.pt", "epoch_0003.pt"]


def test_analyze_all_good_exits_zero(tiny_run, capsys):
    """The control: the same run undamaged gives exit 0 and no message."""
    rc, _, err = _analyze(capsys, tiny_run)
    assert rc == 0 and err.strip() == "", err
    assert sorted(set(_table(tiny_run).checkpoint)) == sorted([*GOOD, "epoch_0002.pt"])


@pytest.mark.parametrize("value", [math.nan, -math.inf])
def test_analyze_nonfinite_weights_gives_nan_rows(tiny_run, capsys, value):
    path = tiny_run / "checkpoints" / "epoch_0002.pt"
    sd = torch.load(path, weights_only=True)
    next(iter(sd.values())).view(-1)[3] = value
    torch.save(sd, path)
    rc, _, err = run_cli(
        capsys,
        ["analyze", tiny_run, "--metrics", "loss,lambda_max,trace", "--trace-matvecs", "6",
         "--tol", "1e-2", "--n-samples", "32", "--no-progress"],
    )  # fmt: skip
    assert rc in (0, EXIT_SKIPPED) and "Traceback" not in err, err
    t = _table(tiny_run)
    bad = t[t.checkpoint == "epoch_0002.pt"]
    assert len(bad) == 3 and bad.value.isna().all() and "nonfinite" in bad.status.iloc[0]
    good = t[t.checkpoint != "epoch_0002.pt"]
    assert (good.status == "ok").all() and good.value.map(math.isfinite).all()


def _edit_run_json(run, edit):
    path = run / "run.json"
    info = json.loads(path.read_text())
    edit(info)
    path.write_text(json.dumps(info))


@pytest.mark.parametrize("key", ["method", "seed", "hparams"])
def test_analyze_run_json_missing_unneeded_key(tiny_run, capsys, key):
    """A key analysis does not need is missing: named, the checkpoints analysed, exit 3."""
    _edit_run_json(tiny_run, lambda d: d.pop(key))
    rc, _, err = _analyze(capsys, tiny_run)
    assert rc == EXIT_SKIPPED and "Traceback" not in err, err
    assert str(tiny_run / "run.json") in err and key in err, err
    assert sorted(set(_table(tiny_run).checkpoint)) == sorted([*GOOD, "epoch_0002.pt"])


@pytest.mark.parametrize("key", ["model", "data"])
def test_analyze_run_json_missing_needed_key(tiny_run, capsys, key):
    """Without the model or data description nothing can be built: one line naming run.json,
    exit 2; with --model/--data given instead, the checkpoints are analysed (exit 3)."""
    _edit_run_json(tiny_run, lambda d: d.pop(key))
    rc, _, err = _analyze(capsys, tiny_run)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert str(tiny_run / "run.json") in err and key in err, err
    assert not (tiny_run / "analysis.csv").exists()
    extra = ["--model", "tests.reliability._factory:tiny_mlp", "--data", "digits"]
    rc, _, err = _analyze(capsys, tiny_run, *extra, "--n-samples", "64")
    assert rc == EXIT_SKIPPED and str(tiny_run / "run.json") in err and "Traceback" not in err
    assert sorted(set(_table(tiny_run).checkpoint)) == sorted([*GOOD, "epoch_0002.pt"])


def test_analyze_run_json_unknown_keys(tiny_run, capsys):
    _edit_run_json(tiny_run, lambda d: d.update(surprise=1, extra_field={"a": 2}))
    rc, _, err = _analyze(capsys, tiny_run)
    assert rc == EXIT_SKIPPED and "Traceback" not in err, err
    line = [ln for ln in err.splitlines() if "run.json" in ln]
    assert len(line) == 1 and "surprise" in line[0] and "extra_field" in line[0], err
    assert sorted(set(_table(tiny_run).checkpoint)) == sorted([*GOOD, "epoch_0002.pt"])


@pytest.mark.parametrize("damage", ["not json {", "", "[1, 2]", '{"format": "saf-run/1"}'])
def test_analyze_run_json_unreadable(tiny_run, capsys, damage):
    (tiny_run / "run.json").write_text(damage)
    rc, _, err = _analyze(capsys, tiny_run)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "run.json" in err or str(tiny_run) in err
    assert not (tiny_run / "analysis.csv").exists()


@pytest.mark.parametrize("kind", [*KINDS, "nan-weights"])
@pytest.mark.filterwarnings("error")  # a warning would be a second line on stderr
def test_surface_refuses_damaged_checkpoint_with_one_line(tiny_run, tmp_path, capsys, kind):
    """`saf surface` reads one checkpoint: a damaged one is refused before anything is
    written (exit 2, one line naming it); NaN weights have no surface to compute."""
    path, out = tiny_run / "checkpoints" / "epoch_0003.pt", tmp_path / "surf"
    if kind == "nan-weights":
        sd = torch.load(path, weights_only=True)
        next(iter(sd.values())).view(-1)[0] = math.nan
        torch.save(sd, path)
    else:
        _damage(path, kind)
    quick = ["--dim", "1", "--grid", "-1:1:3", "--no-progress", "--out", out]
    rc, _, err = run_cli(capsys, ["surface", tiny_run, *quick])
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert str(path) in lines[0], err
    assert not out.exists()


def _metrics_damage(path, kind):
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    damaged = {
        "binary": bytes(range(256)) * 4,
        "empty": b"",
        "truncated-mid-row": text[: len(text) - 25].encode(),
        "missing-column": "".join(ln.split(",", 1)[1] for ln in lines).encode(),
        "non-numeric": text.replace(lines[2].split(",")[1], "oops", 1).encode(),
        "duplicated-epoch": (text + lines[-1]).encode(),
    }[kind]
    path.write_bytes(damaged)


@pytest.mark.parametrize(
    "kind",
    ["binary", "empty", "truncated-mid-row", "missing-column", "non-numeric", "duplicated-epoch"],
)
def test_damaged_metrics_csv_is_named_and_rebuilt_from_state(tiny_run, capfd, kind):
    """Readers of metrics.csv (the figure pipeline's curves and tables) get the rows kept in
    state.pt, with one line naming the damaged file; no state.pt: a ValueError naming it."""
    from saf import read_metrics

    want = read_metrics(tiny_run)
    capfd.readouterr()
    path = tiny_run / "metrics.csv"
    _metrics_damage(path, kind)
    got = read_metrics(tiny_run)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "damaged" in err[0], err
    cols = ["epoch", "train_ce", "traj_loss", "train_acc", "test_loss", "test_acc", "lr"]
    assert got[cols].equals(want[cols])
    (tiny_run / "state.pt").unlink()
    with pytest.raises(ValueError, match=str(path)):
        read_metrics(tiny_run)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.pop("config"),
        lambda d: d["config"].pop("lr"),  # a default would silently resume another run
        lambda d: d["config"].update(bogus=1),
        lambda d: d.pop("model"),
        lambda d: d.update(format="other/9"),
    ],
    ids=["no-config", "config-missing-lr", "config-unknown-key", "no-model", "other-format"],
)
def test_resume_and_surface_refuse_damaged_run_json(tiny_run, tmp_path, capsys, request, edit):
    """`saf train --resume` and `saf surface` need the whole description: one line naming
    run.json, exit 2, nothing written."""
    from tests.reliability.conftest import files_under

    (tiny_run / "state.pt").write_bytes(b"")  # even a resume that would fail later
    _edit_run_json(tiny_run, edit)
    before = files_under(tiny_run)
    out = tmp_path / "surf"
    quick = ["--dim", "1", "--grid", "-1:1:3", "--no-progress", "--out", out]
    commands = [["train", "--resume", tiny_run, "--no-progress"], ["surface", tiny_run, *quick]]
    if "config" in request.node.callspec.id:  # a surface needs no training config
        commands = commands[:1]
    for argv in commands:
        rc, _, err = run_cli(capsys, argv)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (argv, err)
        assert "run.json" in lines[0] or str(tiny_run) in lines[0], err
    assert files_under(tiny_run) == before and not out.exists()
