"""The ``saf`` command: ``train``, ``analyze``, ``surface``, ``figures`` and ``eos``.

The top layer: the only package that sees every other one. Each subcommand lives in its
own module (``cli._train``, ...) exposing ``add_parser(subparsers)`` and ``run(args)``.
Only the command line names code to import (``--model``, ``--data``: trusted input);
a file on disk never does.

Exit codes: 0 done, 2 bad input (one line on stderr, no traceback, nothing written) or
training diverged (one line; the last good checkpoint is kept), 3 done but something was
skipped (each skip named on stderr), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM);
after 130 or 143 the same command resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import warnings

# An invalid MPLBACKEND fails matplotlib's own import: take it out, check it, then say so
# in one line in main() (a valid one is kept).
_BACKEND, _BAD_BACKEND = os.environ.pop("MPLBACKEND", None), None
import matplotlib  # noqa: E402

if _BACKEND is not None:
    try:
        matplotlib.rcParams["backend"] = _BACKEND
        os.environ["MPLBACKEND"] = _BACKEND
    except ValueError:
        _BAD_BACKEND = _BACKEND

from cli import _analyze, _eos, _figures, _surface, _train  # noqa: E402
from cli._common import (  # noqa: E402
    EXIT_OK,
    EXIT_SKIPPED,
    EXIT_USAGE,
    OneLineParser,
    UsageError,
)

__all__ = ["EXIT_OK", "EXIT_SKIPPED", "EXIT_USAGE", "UsageError", "build_parser", "main"]

SUBCOMMANDS = (_train, _analyze, _surface, _figures, _eos)

EPILOG = """examples:
  saf train --method saf --epochs 20 --out runs/saf-s0
  saf analyze runs/saf-s0 --metrics lambda_max,trace,m_sharpness
  saf surface runs/saf-s0 --dim 2 --grid -1:1:21 --out surfaces/saf
  saf figures --quick --out results/quick
  saf eos --out results/eos
"""


def build_parser() -> OneLineParser:
    """The full argument parser, one subparser per subcommand."""
    parser = OneLineParser(
        prog="saf",
        description="Sharpness-aware training (SGD, SAM, ASAM, SAF, MESA) and "
        "loss-landscape analysis.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that files in flight are cleaned up as for
    Ctrl-C (every write is atomic) and the command exits 143 with one line."""


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"saf: warning: {message}\n"


@contextlib.contextmanager
def _sigterm_raises():
    def handler(signum, frame):
        raise Terminated()

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _warnings_in_one_line():
    saved, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        yield
    finally:
        warnings.formatwarning = saved


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script. Returns the process exit code."""
    if _BAD_BACKEND is not None:
        print(
            f"saf: error: MPLBACKEND={_BAD_BACKEND!r} is not a matplotlib backend; unset it "
            "(saf draws into files with Agg)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    parser = build_parser()
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(argv)
        args.argv = [str(a) for a in argv]
        with _sigterm_raises(), _warnings_in_one_line():
            return int(args.run(args) or 0)
    except (UsageError, ValueError, OSError) as e:
        # UsageError, CheckpointError (a ValueError) and unreadable/unwritable paths:
        # one line, exit 2, no traceback.
        if isinstance(e, OSError) and e.filename:
            e = UsageError(f"{e.filename}: {e.strerror}")
        prog = getattr(e, "prog", None) or (f"saf {args.command}" if "args" in locals() else "saf")
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        if isinstance(e, Terminated):
            print(
                "saf: terminated (SIGTERM); run the same command again to resume", file=sys.stderr
            )
            return 143
        print("saf: interrupted", file=sys.stderr)
        return 130
