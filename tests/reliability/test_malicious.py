"""Issue 6, item 3: a checkpoint whose loading would create a file (a pickle whose
``__reduce__`` calls ``os.system`` or ``builtins.open``) placed in a run directory is
refused by `saf analyze`, `saf surface` and `saf train --resume` with a message naming the
file, and the file is never created. Also: no module loads pickles unsafely."""

from __future__ import annotations

import builtins
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from tests.reliability.conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]


class _System:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Open:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def _write_evil(path: Path, kind: str, marker: Path) -> None:
    """A checkpoint that creates ``marker`` when unpickled without weights_only."""
    if kind == "system":
        torch.save({"model": _System(marker)}, path)
    elif kind == "open":
        torch.save(_Open(marker), path)
    elif kind == "inside-state-dict":  # real tensors plus one poisoned entry
        sd = torch.load(path.with_name("epoch_0001.pt"), weights_only=True)
        torch.save({**sd, "extra": _System(marker)}, path)
    elif kind == "legacy-pickle":  # the pre-zip torch format: a bare pickle stream
        with open(path, "wb") as f:
            pickle.dump({"fc.weight": _Open(marker)}, f, protocol=2)
    else:
        raise ValueError(kind)


KINDS = ["system", "open", "inside-state-dict", "legacy-pickle"]


def test_payloads_really_run_when_loaded_unsafely(tiny_run, tmp_path):
    """The oracle: each payload does create its file under a plain (unsafe) load."""
    for kind in KINDS:
        marker = tmp_path / f"pwned-{kind}"
        path = tiny_run / "checkpoints" / "epoch_0002.pt"
        _write_evil(path, kind, marker)
        if kind == "legacy-pickle":
            with open(path, "rb") as f:
                pickle.load(f)
        else:
            torch.load(path, weights_only=False)
        assert marker.exists(), kind


@pytest.mark.parametrize("kind", KINDS)
def test_analyze_refuses_malicious_checkpoint_and_analyses_the_rest(
    tiny_run, tmp_path, capsys, kind
):
    marker = tmp_path / "PWNED"
    _write_evil(tiny_run / "checkpoints" / "epoch_0002.pt", kind, marker)
    rc, out, err = run_cli(capsys, ["analyze", tiny_run, "--metrics", "loss", "--no-progress"])
    assert not marker.exists()
    assert rc == 3, err  # EXIT_SKIPPED: done, something was skipped
    named = [ln for ln in err.splitlines() if "epoch_0002.pt" in ln]
    assert len(named) == 1 and "refused" in named[0] and "Traceback" not in err, err
    import pandas as pd

    table = pd.read_csv(tiny_run / "analysis.csv")
    ok = table[table.status == "ok"]
    assert sorted(set(ok.checkpoint)) == ["epoch_0000.pt", "epoch_0001.pt", "epoch_0003.pt"]


@pytest.mark.parametrize("kind", KINDS)
def test_surface_refuses_malicious_checkpoint(tiny_run, tmp_path, capsys, kind):
    marker, out = tmp_path / "PWNED", tmp_path / "surf"
    evil = tiny_run / "checkpoints" / "epoch_0003.pt"  # the last one: the default target
    _write_evil(evil, kind, marker)
    quick = ["--dim", "1", "--grid", "-1:1:3", "--no-plots", "--no-progress", "--out", out]
    for target in (tiny_run, evil):
        rc, _, err = run_cli(capsys, ["surface", target, *quick])
        assert not marker.exists()
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert str(evil) in lines[0] and "refused" in lines[0], err
        assert not out.exists()


@pytest.mark.parametrize("victim", ["state.pt", "checkpoints/epoch_0002.pt"])
def test_train_resume_refuses_malicious_state(tiny_run, tmp_path, capsys, victim):
    """A run cut after epoch 2 whose state.pt (or checkpoint) was replaced by a payload. The
    checkpoint is read on resume only by a state.pt without weights (the older format)."""
    marker = tmp_path / "PWNED"
    state = torch.load(tiny_run / "state.pt", weights_only=True)
    (tiny_run / "checkpoints" / "epoch_0003.pt").unlink()
    if victim == "state.pt":
        torch.save({**state, "epoch": 2, "optimizer": _System(marker)}, tiny_run / victim)
    else:
        older = {k: v for k, v in state.items() if k != "model"}
        torch.save({**older, "epoch": 2, "metrics": state["metrics"][:2]}, tiny_run / "state.pt")
        _write_evil(tiny_run / victim, "open", marker)
    rc, _, err = run_cli(capsys, ["train", "--resume", tiny_run, "--no-progress"])
    assert not marker.exists()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert victim in lines[0] and "refused" in lines[0], err


def test_train_refuses_malicious_cifar_file(tmp_path, capsys):
    """The CIFAR python files are pickles too: a payload in one is refused, never run."""
    marker, folder = tmp_path / "PWNED", tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": _System(marker), b"labels": [0]}, f, protocol=4)
    out = tmp_path / "run"
    argv = ["train", "--data", "cifar10", "--data-dir", tmp_path, "--epochs", "2", "--out", out]
    rc, _, err = run_cli(capsys, [*argv, "--no-progress"])
    assert not marker.exists()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "data_batch_1" in lines[0] and not out.exists(), err


UNSAFE = [
    (
        re.compile(r"torch\.load\((?![^)]*weights_only=True)"),
        "torch.load without weights_only=True",
    ),
    (re.compile(r"weights_only\s*=\s*False"), "weights_only=False"),
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"allow_pickle\s*=\s*True"), "np.load(allow_pickle=True)"),
    (re.compile(r"(?<![.\w])(?:eval|exec)\("), "eval/exec"),
]


def test_no_module_loads_pickles_unsafely():
    """Static guard over every shipped module: no unsafe deserialisation call."""
    found = []
    for pkg in ("saf", "analysis", "landscape", "figures"):
        for path in (ROOT / pkg).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                found += [f"{path.relative_to(ROOT)}:{n}: {what}" for rx, what in UNSAFE
                          if rx.search(code)]  # fmt: skip
    assert not found, found
