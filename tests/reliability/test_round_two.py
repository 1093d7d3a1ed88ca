"""Reliability, round two: one regression test per finding of an adversarial pass (a file is
data, one writer per run, no memory bombs, a named skip instead of a traceback, command lines
that are refused before they write)."""

from __future__ import annotations

import json
import os
import pickle
import time

import numpy as np
import pytest
import torch

from analysis import safe_torch_load
from analysis.io import exclusive
from tests.reliability.conftest import TINY_TRAIN, files_under, run_cli


def _one_line(rc, err, code=2):
    lines = err.strip().splitlines()
    assert rc == code and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _edit_run_json(run, edit):
    info = json.loads((run / "run.json").read_text())
    edit(info)
    (run / "run.json").write_text(json.dumps(info))


# -- 1. run.json is data: it never names code to run ---------------------------------------


def test_run_json_naming_a_function_never_runs_it(tiny_run, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "RAN"
    (tmp_path / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef f(): pass\n")
    monkeypatch.chdir(tmp_path)
    for name in ("evilmod:f", "os:abort"):
        _edit_run_json(tiny_run, lambda d, name=name: d["data"].update(name=name))
        rc, _, err = run_cli(capsys, ["analyze", tiny_run, "--no-progress"])
        line = _one_line(rc, err)
        assert "data" in line and not marker.exists()
    assert not (tiny_run / "analysis.csv").exists()


# -- 2. one writer per run directory, and per table -------------------------------------


def test_a_second_trainer_into_a_held_run_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    with exclusive(out / ".lock", str(out)):  # the first trainer, still writing
        rc, _, err = run_cli(capsys, ["train", *TINY_TRAIN, "--epochs", "2", "--out", out])
        assert "being written by another process" in _one_line(rc, err)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing of the second's


def test_a_second_analyze_of_the_same_table_is_refused(tiny_run, tmp_path, capsys):
    out = tmp_path / "t.csv"
    with exclusive(tmp_path / ".t.csv.lock", str(out)):
        rc, _, err = run_cli(capsys, ["analyze", tiny_run, "--out", out, "--no-progress"])
        assert "being written by another process" in _one_line(rc, err)
    assert not out.exists()


# -- 3. no memory bombs --------------------------------------------------------------------


class _Bomb:
    def __reduce__(self):
        return (bytearray, (3 * 2**30,))


def test_a_checkpoint_asking_for_a_huge_bytearray_is_refused_without_allocating(tmp_path):
    path = tmp_path / "bomb.pt"
    torch.save({"w": torch.zeros(2), "x": _Bomb()}, path)
    assert path.stat().st_size < 2000
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="refused.*bytearray"):
        safe_torch_load(path)
    assert time.perf_counter() - t0 < 1.0  # no 3 GB were touched


class _HugeArray:
    def __reduce__(self):
        from numpy.core.multiarray import _reconstruct

        return (_reconstruct, (np.ndarray, (2**40,), b"b"))


def _cifar_folder(tmp_path, data, labels):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f, protocol=2)
    return folder


@pytest.mark.parametrize("case", ["huge-array", "label-999", "label-minus-1", "bad-shape"])
def test_damaged_cifar_files_are_one_line_before_anything_is_written(tmp_path, capsys, case):
    ok = np.zeros((4, 3072), dtype=np.uint8)
    data, labels = {
        "huge-array": (_HugeArray(), [0]),
        "label-999": (ok, [0, 1, 999, 2]),
        "label-minus-1": (ok, [0, -1, 1, 2]),
        "bad-shape": (np.zeros((4, 100), dtype=np.uint8), [0, 1, 2, 3]),
    }[case]
    folder = _cifar_folder(tmp_path, data, labels)
    out = tmp_path / "run"
    argv = ["train", "--data", "cifar10", "--data-dir", folder, "--epochs", "2", "--out", out]
    rc, _, err = run_cli(capsys, argv)
    line = _one_line(rc, err)
    assert "data_batch_1" in line or "test_batch" in line, line
    assert not out.exists()


# -- 4. a named skip or one line, never a traceback ----------------------------------------


def test_an_int_keyed_checkpoint_is_a_named_skip_and_the_rest_is_analysed(tiny_run, capsys):
    torch.save({0: torch.zeros(3)}, tiny_run / "checkpoints" / "epoch_0002.pt")
    rc, _, err = run_cli(capsys, ["analyze", tiny_run, "--metrics", "loss", "--no-progress"])
    assert rc == 3 and "epoch_0002.pt" in err and "Traceback" not in err, err
    assert (tiny_run / "analysis.csv").is_file()


@pytest.mark.parametrize("kind", ["meta", "sparse", "stride0"])
def test_odd_tensors_in_a_checkpoint_are_one_line_for_surface(tiny_run, tmp_path, capsys, kind):
    path = tiny_run / "checkpoints" / "epoch_0003.pt"
    sd = torch.load(path, weights_only=True)
    k = next(iter(sd))
    if kind == "meta":
        sd[k] = torch.empty(sd[k].shape, device="meta")
    elif kind == "sparse":
        sd[k] = sd[k].to_sparse()
    else:  # a huge view of one number, under an extra key
        sd["extra"] = torch.zeros(1).expand(2**40)
    torch.save(sd, path)
    out = tmp_path / "s"
    rc, _, err = run_cli(capsys, ["surface", tiny_run, "--dim", "1", "--grid", "-1:1:3",
                                  "--no-progress", "--out", out])  # fmt: skip
    assert "epoch_0003.pt" in _one_line(rc, err)
    assert not out.exists()


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.update(model=5),
        lambda d: d.update(data=5),
        lambda d: d["data"].update(name=7),
        lambda d: d["data"].update(name=None),
        lambda d: d["model"]["kwargs"].update(depth=100_000_000),
    ],
    ids=["model-5", "data-5", "name-7", "name-null", "depth-1e8"],
)
def test_a_malformed_run_json_is_one_line(tiny_run, capsys, edit):
    _edit_run_json(tiny_run, edit)
    t0 = time.perf_counter()
    rc, _, err = run_cli(capsys, ["analyze", tiny_run, "--no-progress"])
    assert "run.json" in _one_line(rc, err) or "model option" in err
    assert time.perf_counter() - t0 < 20  # no hang building a huge model
    assert not (tiny_run / "analysis.csv").exists()


@pytest.mark.parametrize("damage", ["a-list", "no-epoch", "wrong-architecture", "nan-weights"])
def test_resume_from_a_bad_state_is_one_line(tiny_run, capsys, damage):
    state = torch.load(tiny_run / "state.pt", weights_only=True)
    if damage == "a-list":
        state = [1, 2, 3]
    elif damage == "no-epoch":
        state.pop("epoch")
    elif damage == "wrong-architecture":
        state["model"] = {"weight": torch.zeros(2, 2)}
    else:
        state["model"] = {k: v * float("nan") if v.is_floating_point() else v
                          for k, v in state["model"].items()}  # fmt: skip
    torch.save(state, tiny_run / "state.pt")
    before = files_under(tiny_run)
    rc, _, err = run_cli(capsys, ["train", "--resume", tiny_run, "--epochs", "4", "--no-progress"])
    assert "state.pt" in _one_line(rc, err)
    after = files_under(tiny_run)
    after.pop(".lock", None)
    before.pop(".lock", None)
    assert after == before


# -- 5. command lines that crashed or wrote -----------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["analyze", "{run}", "--model", ".:x", "--data", "digits"],
        ["analyze", "{run}", "--model", "tests.reliability._factory:tiny_mlp", "--data",
         "builtins:list"],
        ["analyze", "{run}", "--threads", "100000"],
        ["train", "--saf-lag", "1000000000", "--out", "{out}"],
        ["figures", "--quick", "--surface-points", "1", "--out", "{out}"],
        ["figures", "--quick", "--sweep-lams", "nan", "--out", "{out}"],
        ["figures", "--quick", "--m-values", "100000000", "--out", "{out}"],
        ["analyze", "{run}", "--out", "{existing}"],
        ["surface", "{run}", "--out", ""],
    ],
)  # fmt: skip
def test_a_bad_command_line_is_one_line_and_writes_nothing(tiny_run, tmp_path, capsys, argv):
    (tmp_path / "existing").mkdir()
    places = {"{run}": str(tiny_run), "{out}": str(tmp_path / "out"),
              "{existing}": str(tmp_path / "existing")}  # fmt: skip
    before = files_under(tmp_path)
    cwd = os.getcwd()
    rc, _, err = run_cli(capsys, [places.get(a, a) for a in argv])
    _one_line(rc, err)
    assert os.getcwd() == cwd and files_under(tmp_path) == before
    assert not (tmp_path / "out").exists()


# -- 7. every odd file is named -------------------------------------------------------------


def test_symlinks_and_folders_named_like_checkpoints_are_named(tiny_run, tmp_path, capsys):
    ck = tiny_run / "checkpoints"
    (ck / "loop.pt").symlink_to(ck / "loop.pt")
    (ck / "zero.pt").symlink_to("/dev/zero")
    (ck / "dir.pt").mkdir()
    rc, _, err = run_cli(capsys, ["analyze", tiny_run, "--metrics", "loss", "--no-progress"])
    assert rc == 3 and "Traceback" not in err, err
    for name in ("loop.pt", "zero.pt", "dir.pt"):
        assert sum(name in line for line in err.splitlines()) == 1, err


def test_a_half_precision_checkpoint_is_a_one_line_note(tiny_run, capsys):
    path = tiny_run / "checkpoints" / "epoch_0003.pt"
    sd = torch.load(path, weights_only=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, path)
    rc, _, err = run_cli(capsys, ["analyze", tiny_run, "--metrics", "loss", "--no-progress"])
    assert rc == 0, err
    notes = [line for line in err.splitlines() if "epoch_0003.pt" in line]
    assert len(notes) == 1 and "float16 -> float32" in notes[0], err
