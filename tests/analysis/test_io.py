"""Atomic writes and safe loading: the shared I/O promises."""

import os

import pytest
import torch

from analysis import CheckpointError, atomic_torch_save, atomic_write_text, load_state_dict


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "old")
    from analysis import atomic_open

    with pytest.raises(RuntimeError), atomic_open(p, "w") as f:
        f.write("half")
        raise RuntimeError("crash")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_load_state_dict_unwraps_and_strips_prefix(tmp_path):
    sd = {"module.w": torch.arange(3.0)}
    atomic_torch_save({"state_dict": sd, "epoch": 3}, tmp_path / "c.pt")
    out = load_state_dict(tmp_path / "c.pt", model=_W())
    assert list(out) == ["w"] and torch.equal(out["w"], sd["module.w"])
    assert list(load_state_dict(tmp_path / "c.pt")) == ["module.w"]  # no model: as stored


class _W(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_malicious_pickle_refused_and_nothing_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_state_dict(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("content", [b"", b"\x00\x01garbage"])
def test_corrupt_or_empty_named(tmp_path, content):
    p = tmp_path / "bad.pt"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_state_dict(p)


def test_atomic_write_gives_ordinary_permissions(tmp_path):
    """mkstemp's 0600 must not leak into results: files get 0666 minus the umask."""
    p = tmp_path / "table.csv"
    atomic_write_text(p, "a,b\n")
    umask = os.umask(0)
    os.umask(umask)
    assert (p.stat().st_mode & 0o777) == (0o666 & ~umask)


def test_atomic_write_sweeps_temporaries_of_killed_writers_only(tmp_path):
    target = tmp_path / "metrics.csv"
    stale = tmp_path / ".metrics.csv.abc123.tmp"  # a writer killed an hour ago
    live = tmp_path / ".metrics.csv.def456.tmp"  # a writer still at work
    other = tmp_path / ".state.pt.ghi789.tmp"  # another target's temporary: not ours
    for p in (stale, live, other):
        p.write_text("partial")
    old = os.stat(live).st_mtime - 3600
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    atomic_write_text(target, "epoch\n1\n")
    assert target.read_text() == "epoch\n1\n"
    assert not stale.exists()
    assert live.exists() and other.exists()
