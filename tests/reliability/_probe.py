"""A pre-warmed process that runs one snippet per forked child and reports the child's peak
memory growth: the bound every memory-bomb regression test asserts.

Each request is ``{"code": ..., "log": PATH}``. The child resets its peak-RSS mark
(``/proc/self/clear_refs``), notes its RSS, ``exec``s the code with stdout and stderr going
to ``PATH`` (``rc`` in the code's namespace is the exit status), and writes
``{"rc": ..., "grew_mib": ...}`` to ``PATH.json``: ``grew_mib`` is its peak RSS (VmHWM)
minus its RSS at the start, so the imports done once in the parent do not count.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _serve() -> None:
    import torch

    torch.set_num_threads(1)  # no OpenMP pool before fork
    import analysis  # noqa: F401  (the slow imports, done once)
    import cli  # noqa: F401
    import landscape  # noqa: F401
    from saf.data import load_dataset

    for split in ("train", "test"):
        load_dataset("digits", split)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(req)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"status": code}), flush=True)


def _child(req: dict) -> None:
    fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak-RSS mark starts again from here
    start, rc = _kib("VmRSS"), 1
    try:
        ns: dict = {}
        exec(req["code"], ns)
        rc = int(ns.get("rc", 0))
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        grew = (_kib("VmHWM") - start) / 1024
        Path(req["log"] + ".json").write_text(json.dumps({"rc": rc, "grew_mib": grew}))
        os._exit(0)


class Probe:
    """Client side: ``run(code, log, timeout)`` -> ``(rc, output, grew_mib)``."""

    def __init__(self, cwd: Path):
        root = str(Path(__file__).resolve().parents[2])  # this checkout, not an installed one
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
        }
        self.proc = subprocess.Popen(
            [sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, cwd=cwd, env=env,
        )  # fmt: skip
        self._read(120)

    def _read(self, timeout: float) -> dict | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the probe died")
        return json.loads(line)

    def run(self, code: str, log: Path, timeout: float = 30) -> tuple[int, str, float]:
        """Run ``code`` in a fresh child; a child still running after ``timeout`` seconds
        is killed and reported as hung (an AssertionError)."""
        self.proc.stdin.write(json.dumps({"code": code, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        pid = self._read(30)["pid"]
        if self._read(timeout) is None:
            os.kill(pid, signal.SIGKILL)
            self._read(30)
            raise AssertionError(f"hung: still running after {timeout} s:\n{code}")
        result = json.loads(Path(str(log) + ".json").read_text())
        return result["rc"], Path(log).read_text(errors="replace"), result["grew_mib"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


if __name__ == "__main__":
    _serve()
