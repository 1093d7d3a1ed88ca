"""The ``saf`` command: ``train``, ``analyze``, ``surface`` and ``figures``.

The top layer: the only package that sees every other one. Each subcommand lives in its
own module (``cli._train``, ...) exposing ``add_parser(subparsers)`` and ``run(args)``.
Only the command line names code to import (``--model``, ``--data``: trusted input);
a file on disk never does.

Exit codes: 0 done, 2 bad input (one line on stderr, no traceback, nothing written) or
training diverged (one line; the last good checkpoint is kept), 3 done but something was
skipped (each skip named on stderr), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

from cli import _analyze, _figures, _surface, _train
from cli._common import EXIT_OK, EXIT_SKIPPED, EXIT_USAGE, OneLineParser, UsageError

__all__ = ["EXIT_OK", "EXIT_SKIPPED", "EXIT_USAGE", "UsageError", "build_parser", "main"]

SUBCOMMANDS = (_train, _analyze, _surface, _figures)

EPILOG = """examples:
  saf train --method saf --epochs 20 --out runs/saf-s0
  saf analyze runs/saf-s0 --metrics lambda_max,trace,m_sharpness
  saf surface runs/saf-s0 --dim 2 --grid -1:1:21 --out surfaces/saf
  saf figures --quick --out results/quick
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script. Returns the process exit code."""
    parser = build_parser()
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(argv)
        args.argv = [str(a) for a in argv]
        return int(args.run(args) or 0)
    except (UsageError, ValueError, OSError) as e:
        # UsageError, CheckpointError (a ValueError) and unreadable/unwritable paths:
        # one line, exit 2, no traceback.
        if isinstance(e, OSError) and e.filename:
            e = UsageError(f"{e.filename}: {e.strerror}")
        prog = getattr(e, "prog", None) or (f"saf {args.command}" if "args" in locals() else "saf")
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("saf: interrupted", file=sys.stderr)
        return 130
