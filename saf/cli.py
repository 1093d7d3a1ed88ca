"""The ``saf`` command: ``train``, ``analyze``, ``surface`` and ``figures``.

This is the only module (with ``figures``) that sees every package. Each
subcommand lives in its own ``saf._cli_<name>`` module exposing
``add_parser(subparsers)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import importlib
import sys

from saf._cli_common import EXIT_USAGE, OneLineParser, UsageError

SUBCOMMANDS = ("train", "analyze", "surface", "figures")

EPILOG = """examples:
  saf train --method saf --epochs 20 --out runs/saf-s0
  saf analyze runs/saf-s0 --metrics lambda_max,trace,m_sharpness
  saf surface runs/saf-s0 --dim 2 --grid -1:1:21 --out surfaces/saf
  saf figures --quick --out results/quick
"""


def build_parser() -> OneLineParser:
    """The full argument parser, one subparser per available subcommand."""
    import argparse

    parser = OneLineParser(
        prog="saf",
        description="Sharpness-aware training (SGD, SAM, ASAM, SAF, MESA) and "
        "loss-landscape analysis.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"saf._cli_{name}")
        except ModuleNotFoundError as e:
            if e.name != f"saf._cli_{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script. Returns the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
