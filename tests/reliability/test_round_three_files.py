"""Reliability, round three (issue 23): a file cannot choose its memory, and no file makes a
command hang or lose data. Each case runs in a forked child of a pre-warmed process
(:mod:`tests.reliability._probe`) that reports the child's peak memory growth, and each
asserts: growth below :data:`BOUND_MIB`, no hang (a timeout), nothing overwritten or
half-written, and one line with the documented exit code."""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.io import exclusive
from tests.reliability.conftest import BOUND_MIB, TINY_TRAIN, cli_in_child, files_under

QUICK = ["--metrics", "loss", "--no-progress"]
SURFACE = ["--dim", "1", "--grid", "-1:1:3", "--n-samples", "32", "--no-plots", "--no-progress"]


class _Bomb:
    def __reduce__(self):
        return (bytearray, (3 * 2**30,))


def _zip_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)  # members are named archive/...
    return buf.getvalue()


def _rezip(raw: bytes, deflated: str) -> bytes:
    """``raw`` (a torch zip) with the member ending in ``deflated`` compressed."""
    src, out = zipfile.ZipFile(io.BytesIO(raw)), io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            kind = zipfile.ZIP_DEFLATED if info.filename.endswith(deflated) else zipfile.ZIP_STORED
            z.writestr(info.filename, src.read(info.filename), compress_type=kind)
    return out.getvalue()


def _declare(data: bytes, member: str, size: int) -> bytes:
    """``data`` (a zip) whose member ending in ``member`` declares ``size`` uncompressed
    bytes, in its local and its central header."""
    blob = bytearray(data)
    name = next(i.filename for i in zipfile.ZipFile(io.BytesIO(data)).infolist()
                if i.filename.endswith(member)).encode()  # fmt: skip
    at = blob.find(name)
    while at >= 0:
        if blob[at - 30 : at - 26] == b"PK\x03\x04":
            blob[at - 8 : at - 4] = struct.pack("<I", size)
        elif blob[at - 46 : at - 42] == b"PK\x01\x02":
            blob[at - 22 : at - 18] = struct.pack("<I", size)
        at = blob.find(name, at + 1)
    return bytes(blob)


def hostile(kind: str, path: Path) -> None:
    """Write the hostile file ``kind`` (:data:`HOSTILE`) at ``path``."""
    bomb = {"w": torch.zeros(2), "x": _Bomb()}
    if kind == "legacy-pickle":  # the pre-zip format: torch.load builds the bytearray
        torch.save(bomb, path, _use_new_zipfile_serialization=False)
    elif kind == "misnamed-local-header":  # zipfile: "not a zip"; torch: the central one
        raw = _zip_bytes(bomb)
        at = raw.index(b"archive/data.pkl")  # the first occurrence: the local header
        path.write_bytes(raw[:at] + b"archive/data.pkX" + raw[at + 16 :])
    elif kind == "deflated-pickle-1GiB":
        path.write_bytes(_declare(_rezip(_zip_bytes({"w": torch.zeros(2)}), "data.pkl"),
                                  "data.pkl", 2**30))  # fmt: skip
    elif kind == "deflated-storage-1.5GiB":
        path.write_bytes(_declare(_rezip(_zip_bytes({"w": torch.zeros(2)}), "data/0"),
                                  "data/0", 3 * 2**29))  # fmt: skip
    elif kind == "stored-storage-over-the-file":
        path.write_bytes(_declare(_zip_bytes({"w": torch.zeros(2)}), "data/0", 3 * 2**29))
    elif kind == "fifo":
        path.unlink(missing_ok=True)
        os.mkfifo(path)
    else:
        raise ValueError(kind)


HOSTILE = ["legacy-pickle", "misnamed-local-header", "deflated-pickle-1GiB",
           "deflated-storage-1.5GiB", "stored-storage-over-the-file", "fifo"]  # fmt: skip


_cli = cli_in_child


def _load(probe, tmp_path, call: str, env: dict | None = None) -> tuple[int, str]:
    """``call`` (an expression of analysis.io) in a child: (0 or 2 on CheckpointError/
    ValueError, the message)."""
    code = (f"import os\nos.environ.update({env or {}!r})\nimport analysis.io as io\n"
            f"from landscape import Surface\ntry:\n    print({call})\n    rc = 0\n"
            f"except ValueError as e:\n    print(e)\n    rc = 2\n")  # fmt: skip
    rc, out, grew = probe.run(code, tmp_path / "log", 30)
    assert grew < BOUND_MIB and "Traceback" not in out, (call, grew, out)
    return rc, out.strip()


def _one_line(rc, lines, code=2) -> str:
    assert rc == code and len(lines) == 1, (rc, lines)
    return lines[0]


def _edit_run_json(run, edit):
    info = json.loads((run / "run.json").read_text())
    edit(info)
    (run / "run.json").write_text(json.dumps(info))


# -- A file cannot choose its memory ---------------------------------------------------------


def test_the_probe_sees_what_a_child_allocates(probe, tmp_path):
    """The oracle of every bound here: a touched 512 MiB shows as growth."""
    code = "b = bytearray(2**29)\nb[::4096] = b'1' * len(b[::4096])"
    rc, _, grew = probe.run(code, tmp_path / "log")
    assert rc == 0 and 500 < grew < 600, grew


@pytest.mark.parametrize("kind", HOSTILE[:-1])
def test_a_hostile_checkpoint_is_refused_before_anything_is_inflated(probe, tmp_path, kind):
    path = tmp_path / "bomb.pt"
    hostile(kind, path)
    assert path.stat().st_size < 2 * 2**20  # a small file that asks for 1 GiB or more
    rc, msg = _load(probe, tmp_path, f"io.safe_torch_load({str(path)!r})")
    assert rc == 2 and "refused" in msg and str(path) in msg and "\n" not in msg, msg


@pytest.mark.parametrize("kind", HOSTILE[:-1])
def test_analyze_names_a_hostile_checkpoint_and_does_the_rest(probe, tiny_run, tmp_path, kind):
    hostile(kind, tiny_run / "checkpoints" / "epoch_0002.pt")
    rc, lines = _cli(probe, tmp_path, ["analyze", tiny_run, *QUICK])
    assert rc == 3 and sum("epoch_0002.pt" in ln and "refused" in ln for ln in lines) == 1, lines
    table = pd.read_csv(tiny_run / "analysis.csv")
    assert sorted(set(table[table.status == "ok"].checkpoint)) == [
        "epoch_0000.pt", "epoch_0001.pt", "epoch_0003.pt"]  # fmt: skip


def test_a_checkpoint_without_an_epoch_in_its_name_is_scanned_before_its_epoch_is_read(
    probe, tiny_run, tmp_path
):
    path = tiny_run / "checkpoints" / "final.pt"
    torch.save({"epoch": 3, "x": _Bomb()}, path)
    rc, msg = _load(probe, tmp_path, f"io.checkpoint_epoch({str(path)!r})")
    assert rc == 0 and msg == "None", msg
    legit = tiny_run / "checkpoints" / "last.pt"
    torch.save({"epoch": 7, "state_dict": {"w": torch.zeros(2**20)}}, legit)
    assert _load(probe, tmp_path, f"io.checkpoint_epoch({str(legit)!r})") == (0, "7")
    legit.unlink()
    rc, lines = _cli(probe, tmp_path, ["analyze", tiny_run, *QUICK])
    assert rc == 3 and sum("final.pt" in ln and "refused" in ln for ln in lines) == 1, lines


def test_declared_sizes_over_the_load_budget_are_refused_naming_the_variable(probe, tmp_path):
    path = tmp_path / "big.pt"
    torch.save({"w": torch.zeros(2**19)}, path)  # 2 MiB, stored: legitimate
    rc, msg = _load(probe, tmp_path, f"io.safe_torch_load({str(path)!r})['w'].shape")
    assert rc == 0, msg
    rc, msg = _load(probe, tmp_path, f"io.safe_torch_load({str(path)!r})",
                    env={"SAF_LOAD_BUDGET": "1M"})  # fmt: skip
    assert rc == 2 and "load budget" in msg and "SAF_LOAD_BUDGET" in msg, msg


def test_a_safetensors_header_that_overstates_the_file_is_refused(probe, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(4)}, str(path))
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n].replace(b"[4]", b"[2147483648]").replace(b"16]", b"8589934592]")
    path.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n :])
    rc, msg = _load(probe, tmp_path, f"io.load_state_dict({str(path)!r})")
    assert rc == 2 and "refused" in msg and "safetensors" in msg, msg


def _planted_npz(path: Path, fingerprint: str, n: int) -> None:
    """A deflated surface file with the right fingerprint whose loss declares 2 GiB."""
    meta = {"format": "saf-surface/1", "fingerprint": fingerprint, "complete": False}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("metadata.npy", _npy(np.array(json.dumps(meta))))
        z.writestr("coords0.npy", _npy(np.linspace(-1, 1, n)))
        head = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            head, {"descr": "<f8", "fortran_order": False, "shape": (2**28,)}
        )
        z.writestr("loss.npy", head.getvalue() + bytes(2**20))  # inflates as far as it goes


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_a_planted_surface_file_inflates_nothing_and_is_recomputed(probe, tiny_run, tmp_path):
    out = tmp_path / "s"
    assert _cli(probe, tmp_path, ["surface", tiny_run, *SURFACE, "--out", out])[0] == 0
    (npz,) = out.glob("*.npz")
    fp = json.loads(npz.with_suffix(".json").read_text())["metadata"]["fingerprint"]
    _planted_npz(npz, fp, 3)
    assert npz.stat().st_size < 2**20
    rc, msg = _load(probe, tmp_path, f"Surface.load({str(npz)!r}, {fp!r}, (3,))")
    assert rc == 2 and "not a surface file of this grid" in msg, msg
    rc, msg = _load(probe, tmp_path, f"Surface.load({str(npz)!r})", {"SAF_LOAD_BUDGET": "64M"})
    assert rc == 2 and "load budget" in msg, msg
    rc, lines = _cli(probe, tmp_path, ["surface", tiny_run, *SURFACE, "--out", out])
    assert rc == 0, lines
    assert _load(probe, tmp_path, f"Surface.load({str(npz)!r}).complete") == (0, "True")


def test_run_json_model_options_are_bounded_by_the_parameters_they_imply(probe, tiny_run, tmp_path):
    _edit_run_json(tiny_run, lambda d: d["model"].update(name="resnet_small",
                                                         kwargs={"width": 4096}))  # fmt: skip
    before = files_under(tiny_run)
    rc, lines = _cli(probe, tmp_path, ["analyze", tiny_run, *QUICK], timeout=30)
    assert "parameters" in _one_line(rc, lines) and "width" in lines[0], lines
    assert files_under(tiny_run) == before


# -- Hangs and silent data loss ---------------------------------------------------------------


@pytest.mark.parametrize("command", ["analyze", "surface"])
def test_a_fifo_named_run_json_is_one_line_not_a_hang(probe, tiny_run, tmp_path, command):
    hostile("fifo", tiny_run / "run.json")
    out = tmp_path / "out"
    extra = QUICK if command == "analyze" else SURFACE
    rc, lines = _cli(probe, tmp_path, [command, tiny_run, *extra, "--out", out], timeout=30)
    assert "run.json" in _one_line(rc, lines) and "not a regular file" in lines[0], lines
    assert not out.exists()


def test_a_fifo_as_the_surface_target_is_refused_not_replaced(probe, tiny_run, tmp_path):
    fifo, out = tiny_run / "checkpoints" / "pipe.pt", tmp_path / "out"
    hostile("fifo", fifo)
    rc, lines = _cli(probe, tmp_path, ["surface", fifo, *SURFACE, "--out", out], timeout=30)
    assert "not a regular file" in _one_line(rc, lines), lines
    assert not out.exists()
    rc, lines = _cli(probe, tmp_path, ["analyze", tiny_run, *QUICK], timeout=30)
    assert rc == 3 and sum("pipe.pt" in ln for ln in lines) == 1, lines  # named, skipped


def test_a_second_surface_into_a_held_out_folder_is_refused(probe, tiny_run, tmp_path):
    out = tmp_path / "s"
    assert _cli(probe, tmp_path, ["surface", tiny_run, *SURFACE, "--out", out])[0] == 0
    before = files_under(out)
    with exclusive(out / ".lock", str(out)):  # the first writer, still writing
        rc, lines = _cli(probe, tmp_path, ["surface", tiny_run, *SURFACE, "--seed", "1",
                                           "--out", out])  # fmt: skip
    assert "being written by another process" in _one_line(rc, lines), lines
    assert files_under(out) == before


@pytest.mark.parametrize("victim", ["checkpoints/epoch_0002.pt", "run.json", "metrics.csv"])
def test_analyze_out_never_overwrites_an_input(probe, tiny_run, tmp_path, victim):
    before = files_under(tiny_run)
    rc, lines = _cli(probe, tmp_path, ["analyze", tiny_run, *QUICK, "--out", tiny_run / victim])
    assert "would overwrite" in _one_line(rc, lines), lines
    assert files_under(tiny_run) == before


def test_train_out_into_a_folder_of_another_runs_files_is_refused(probe, tiny_run, tmp_path):
    (tiny_run / "run.json").unlink()
    (tiny_run / "state.pt").unlink()
    before = files_under(tiny_run)
    rc, lines = _cli(probe, tmp_path, ["train", *TINY_TRAIN, "--epochs", "1", "--out", tiny_run])
    assert "checkpoints" in _one_line(rc, lines) and "no run.json" in lines[0], lines
    assert files_under(tiny_run) == before


def test_a_file_replaced_during_loads_is_hashed_as_the_version_loaded(probe, tmp_path):
    """A writer swaps three versions (zeros, ones, a bomb) under one name while 300 loads
    run: each load's hash is the hash of the version it loaded; the bomb is never built."""
    versions = []
    for i, obj in enumerate([{"w": torch.zeros(3)}, {"w": torch.ones(3)}, {"x": _Bomb()}]):
        versions.append(tmp_path / f"v{i}.pt")
        torch.save(obj, versions[-1])
    code = f"""
import hashlib, os, threading
from analysis.io import CheckpointError, load_state_dict
path, blobs = {str(tmp_path / "ckpt.pt")!r}, [open(v, "rb").read() for v in {[str(v) for v in versions]!r}]
digests = [hashlib.sha256(b).hexdigest() for b in blobs]
stop = []
def writer():
    i = 0
    while not stop:
        open(path + ".tmp", "wb").write(blobs[i % 3])
        os.replace(path + ".tmp", path)
        i += 1
open(path, "wb").write(blobs[0])
t = threading.Thread(target=writer)
t.start()
bad = loaded = 0
for _ in range(300):
    h = hashlib.sha256()
    try:
        state = load_state_dict(path, hasher=h)
    except CheckpointError:
        continue
    loaded += 1
    bad += h.hexdigest() != digests[int(state["w"][0])]
stop.append(1)
t.join()
print(bad, loaded)
rc = 0 if bad == 0 and loaded else 1
"""  # noqa: E501
    rc, out, grew = probe.run(code, tmp_path / "log", 60)
    assert rc == 0 and grew < BOUND_MIB, (out, grew)


def test_odd_checkpoint_names_keep_the_table(probe, tiny_run, tmp_path):
    ck = tiny_run / "checkpoints"
    (ck / "epoch_0002.pt").rename(os.fsdecode(bytes(ck / "epoch_0002") + b"\xff.pt"))
    (ck / "epoch_0001.pt").rename(ck / "epoch_0001\r.pt")
    rc, lines = _cli(probe, tmp_path, ["analyze", tiny_run, *QUICK])
    assert rc == 0, lines
    raw = (tiny_run / "analysis.csv").read_bytes()
    raw.decode("utf-8")  # the table is UTF-8
    assert b"\r" not in raw
    table = pd.read_csv(tiny_run / "analysis.csv")
    assert sorted(table.checkpoint) == ["epoch_0000.pt", "epoch_0001\\r.pt",
                                        "epoch_0002\\xff.pt", "epoch_0003.pt"]  # fmt: skip
    assert (table.status == "ok").all()
