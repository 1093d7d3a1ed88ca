"""One regular-file check for ``run.json`` (``saf.runs.regular_file``): the library refuses
with ValueError, the command line with its own one-line UsageError; neither opens a FIFO."""

from __future__ import annotations

import os

import pytest

from cli._common import UsageError, regular_run_json
from saf.runs import is_run_dir, read_run, regular_file


def test_a_regular_file_passes_and_an_absent_one_is_left_to_the_reader(tmp_path):
    (tmp_path / "run.json").write_text("{}")
    assert regular_file(tmp_path / "run.json").st_size == 2
    assert regular_run_json(tmp_path) is None
    with pytest.raises(FileNotFoundError):
        regular_file(tmp_path / "absent.json")
    assert regular_run_json(tmp_path / "absent") is None  # the reader names what is missing


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_not_a_regular_file_is_refused_the_same_way_everywhere(tmp_path, kind):
    path = tmp_path / "run.json"
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    with pytest.raises(ValueError, match="not a regular file"):
        regular_file(path)
    with pytest.raises(UsageError, match=r"run\.json is not a regular file \(a FIFO, device"):
        regular_run_json(tmp_path)
    assert not is_run_dir(tmp_path)  # returns at once: the FIFO is never opened
    with pytest.raises(ValueError, match=r"unreadable \(not a regular file\)"):
        read_run(tmp_path)
