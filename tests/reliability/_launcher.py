"""A pre-warmed launcher of ``saf`` commands that the tests can kill with SIGKILL.

Starting a fresh Python per ``saf`` command costs seconds (torch, sklearn and dynamo
imports). The launcher imports everything once, with one CPU thread and no torch work done,
then forks one child per command: each child runs ``cli.main(argv)`` exactly as the
console script does, in its own process, so ``os.kill(pid, SIGKILL)`` is a real SIGKILL.

Protocol (one JSON object per line): the test sends ``{"argv": [...], "log": PATH}``; the
launcher answers ``{"pid": N}`` at once and ``{"status": S}`` when the child ends, where
``S`` is the exit code or ``-signal`` when a signal ended it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _serve() -> None:
    import torch

    torch.set_num_threads(1)  # no OpenMP pool before fork; children inherit one thread
    import sklearn.datasets  # noqa: F401  (the slow imports, done once)
    import torch._dynamo  # noqa: F401

    import analysis  # noqa: F401
    import cli
    import landscape  # noqa: F401  (matplotlib, plotly)
    from saf.data import load_dataset

    for split in ("train", "test"):
        load_dataset("digits", split)  # cached in memory, inherited by every child
    cli.build_parser()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: run the command line like the console script
            fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = 1
            if req.get("slow_io") or req.get("hold_write"):
                _slow_fsync(req["slow_io"], req.get("hold_write", 0), held_marker(req["log"]))
            try:
                code = cli.main(req["argv"])
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"status": code}), flush=True)


def _slow_fsync(seconds: float, hold: int, marker: str) -> None:
    """A slow disk: every fsync lasts ``seconds``, so the temporary file of an atomic write
    lives that long. With ``hold`` > 0 the ``hold``-th fsync never returns: that write's
    temporary file is complete but not yet moved into place, and ``marker`` is created to
    say so (the process then waits for its SIGKILL)."""
    real, count = os.fsync, [0]

    def fsync(fd):
        real(fd)
        count[0] += 1
        if count[0] == hold:
            Path(marker).touch()
            while True:
                time.sleep(60)
        time.sleep(seconds)

    os.fsync = fsync


class Launcher:
    """Client side: ``start(argv)`` -> pid, then ``wait()`` -> exit status."""

    def __init__(self, cwd: Path):
        self.proc = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=cwd,
        )
        self._read()  # {"ready": true}

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the launcher died")
        return json.loads(line)

    def start(self, argv: list[str], log: Path, slow_io: float = 0.0, hold_write: int = 0) -> int:
        """Fork a child running ``saf argv``; with ``slow_io`` each fsync takes that long;
        with ``hold_write`` = k the child stops inside its k-th atomic write (after the
        fsync, before ``os.replace``) and creates ``LOG.held`` (:func:`held_marker`)."""
        Path(held_marker(log)).unlink(missing_ok=True)
        req = {"argv": [str(a) for a in argv], "log": str(log), "slow_io": slow_io}
        req["hold_write"] = hold_write
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()["pid"]

    def wait(self) -> int:
        return self._read()["status"]

    def run(self, argv: list[str], log: Path) -> int:
        """Run to completion; returns the exit status."""
        self.start(argv, log)
        return self.wait()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def held_marker(log: Path) -> str:
    """The file a child started with ``hold_write`` creates once it is held in a write."""
    return str(log) + ".held"


def kill_at(launcher: Launcher, argv, log: Path, folders, k: int, delay: float,
            in_write: bool, slow_io: float) -> tuple[bool, int, bool]:  # fmt: skip
    """Start ``argv`` and SIGKILL it at one kill point: with ``in_write``, while its
    ``k``-th atomic write is held between fsync and ``os.replace`` (so the kill surely lands
    inside a write); otherwise ``delay`` seconds after ``k`` write events were seen.

    Returns:
        ``(landed, status, stray)``: whether the process was still running when killed, its
        exit status, and whether a new temporary file was left behind.
    """
    seen, before = tmp_files(*folders), entries(*folders)
    pid = launcher.start(argv, log, slow_io=slow_io, hold_write=k if in_write else 0)
    if in_write:
        wait_for_file(pid, Path(held_marker(log)))
    else:
        wait_for_writes(pid, folders, k, before)
        if delay:
            time.sleep(delay)
    landed = kill(pid)
    status = launcher.wait()
    return landed, status, bool(tmp_files(*folders) - seen)


def wait_for_file(pid: int, path: Path, timeout: float = 120.0) -> bool:
    """Poll until ``path`` exists (or ``pid`` ends)."""
    t_end = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < t_end:
        if path.exists():
            return True
        time.sleep(0.001)
    return path.exists()


def alive(pid: int) -> bool:
    """True while ``pid`` has not exited (a zombie counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill(pid: int) -> bool:
    """SIGKILL ``pid``; True when it was still running (the kill landed)."""
    if not alive(pid):
        return False
    os.kill(pid, signal.SIGKILL)
    return True


def tmp_files(*folders: Path) -> set[Path]:
    """The temporary files of atomic writes (``.NAME.XXXX.tmp``) now in ``folders``."""
    out = set()
    for d in folders:
        with contextlib.suppress(FileNotFoundError):
            out.update(Path(e.path) for e in os.scandir(d) if e.name.endswith(".tmp"))
    return out


def entries(*folders: Path) -> set[tuple[str, int]]:
    """``(path, mtime_ns)`` of every entry: a file replaced atomically shows up as new."""
    out = set()
    for d in folders:
        with contextlib.suppress(FileNotFoundError):
            for e in os.scandir(d):
                with contextlib.suppress(FileNotFoundError):
                    out.add((e.path, e.stat().st_mtime_ns))
    return out


def wait_for_writes(pid: int, folders, count: int, seen: set, timeout: float = 120.0) -> bool:
    """Poll until ``count`` write events were seen in ``folders`` (or ``pid`` ends). An event
    is a new temporary file (a write in progress) or a file newly created or replaced, so a
    write is counted even when its temporary file was too short-lived to be seen. ``seen``:
    :func:`entries` taken before the process started."""
    t_end, found = time.monotonic() + timeout, set()
    while alive(pid) and time.monotonic() < t_end:
        found |= entries(*folders) - seen
        events = {p for p, _ in found if p.endswith(".tmp")}  # one per temporary file
        events |= {f"{p}@{t}" for p, t in found if not p.endswith(".tmp")}
        if len(events) >= count:
            return True
    return False


if __name__ == "__main__":
    _serve()
