"""Issue 6, item 6 (training half): a loss that becomes NaN or Inf stops `saf train` with
one line naming the last good checkpoint (exit 2); the checkpoints before it are kept,
finite and loadable, nothing after it is written, and no temporary file is left."""

from __future__ import annotations

import math

import pytest
import torch

import saf.methods
from analysis import load_state_dict, safe_torch_load
from cli import main
from saf import list_checkpoints, read_metrics

TINY = ["--model", "mlp", "--model-kwargs", '{"width": 16}', "--limit", "64"]
TINY += ["--batch-size", "32", "--saf-start", "1", "--saf-lag", "1", "--no-progress"]


def _finite(path) -> bool:
    return all(torch.isfinite(v).all() for v in load_state_dict(path).values())


def _assert_stopped_at(out, err: str, last: int) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and "diverged" in lines[0], err
    assert [e for e, _ in list_checkpoints(out)] == list(range(last + 1))
    assert str(list_checkpoints(out)[-1][1]) in lines[0]  # names the last good checkpoint
    assert all(_finite(p) for _, p in list_checkpoints(out))
    assert safe_torch_load(out / "state.pt")["epoch"] == last
    metrics = read_metrics(out)
    assert len(metrics) == last and all(map(math.isfinite, metrics["train_loss"]))
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize(
    ("method", "value"), [("saf", math.nan), ("sam", math.inf), ("mesa", math.nan)]
)
def test_loss_turning_nonfinite_mid_run_keeps_last_good_checkpoint(
    tmp_path, capsys, monkeypatch, method, value
):
    """A weight is poisoned in the middle of epoch 3: epochs 0..2 stay, epoch 3 never lands."""
    orig = saf.methods.Stepper.__call__

    def poisoned(self, x, y, idx, epoch, weight=1.0):
        if epoch == 2:
            with torch.no_grad():
                next(self.model.parameters()).view(-1)[0] = value
        return orig(self, x, y, idx, epoch, weight)

    monkeypatch.setattr(saf.methods.Stepper, "__call__", poisoned)
    out = tmp_path / method
    assert main(["train", "--method", method, *TINY, "--epochs", "5", "--out", str(out)]) == 2
    _assert_stopped_at(out, capsys.readouterr().err, last=2)
    # resuming meets the same divergence again, and still keeps everything
    assert main(["train", "--resume", str(out), "--no-progress"]) == 2
    _assert_stopped_at(out, capsys.readouterr().err, last=2)


def test_huge_learning_rate_diverges_cleanly(tmp_path, capsys):
    """A real divergence (no patching): SAF with lr 1e12 overflows; exit 2, one line."""
    out = tmp_path / "lr"
    rc = main(
        ["train", "--method", "saf", *TINY, "--lr", "1e12", "--epochs", "4", "--out", str(out)]
    )
    assert rc == 2
    err = capsys.readouterr().err
    last = safe_torch_load(out / "state.pt")["epoch"]
    assert last < 4
    _assert_stopped_at(out, err, last)
