"""Shared pieces of the ``saf`` command line: errors, exit codes, argument types."""

from __future__ import annotations

import argparse
import functools
import importlib
import math
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from analysis import LOSSES, loss_function
from analysis.losses import IGNORE_INDEX, TokenCrossEntropy
from saf import DATASETS, data_batches
from saf.runs import regular_file

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_SKIPPED = 3


class UsageError(ValueError):
    """Bad input from the user; the CLI prints it as one line and exits 2.

    Args:
        message: what was wrong and what to do instead.
        prog: the command it belongs to (``"saf train"``), when known.
    """

    def __init__(self, message: str, prog: str | None = None):
        super().__init__(message)
        self.prog = prog


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``saf train: error: ...``), exit 2."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message, prog=self.prog)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _number(text, float, lambda v: v > 0, "a number > 0")


def nonneg_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _number(text, float, lambda v: v >= 0, "a number >= 0")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _number(text, int, lambda v: v >= 1, "an integer >= 1")


def nonneg_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def threads(text: str) -> int:
    """argparse type: a thread count from 1 to this machine's CPU count."""
    n = os.cpu_count() or 1
    return _number(text, int, lambda v: 1 <= v <= n, f"an integer from 1 to {n} (the CPUs here)")


def unit_float(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    return _number(text, float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def _number(text, kind, ok, what):
    try:
        v = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if isinstance(v, float) and not math.isfinite(v) or not ok(v):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return v


def existing_dir(text: str) -> Path:
    """argparse type: a directory that exists."""
    p = Path(text)
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {text}")
    return p


def existing_path(text: str) -> Path:
    """argparse type: a regular file or a directory that exists (a FIFO, device or socket
    is refused: reading one could wait forever)."""
    p = Path(text)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"no such file or directory: {text}")
    if not (p.is_file() or p.is_dir()):
        raise argparse.ArgumentTypeError(
            f"{text} is not a regular file or folder (a FIFO, device or socket); name a "
            "checkpoint file or a folder"
        )
    return p


def regular_run_json(folder: Path) -> None:
    """Refuse, in one line, a ``run.json`` in ``folder`` that is not a regular file (a FIFO
    would block its reader forever, a device never end).

    Raises:
        UsageError: it exists and is not a regular file.
    """
    path = Path(folder) / "run.json"
    try:
        regular_file(path)  # the one check, here with the command line's message
    except OSError:  # absent (or unreadable: the reader names it)
        return
    except ValueError:
        raise UsageError(
            f"{path} is not a regular file (a FIFO, device or socket); put the run's "
            "run.json there or remove it"
        ) from None


def writable_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and check it is writable, else raise UsageError."""
    if not str(path).strip():
        raise UsageError("--out is empty; name an output folder")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"--out {p} is a file, not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create output folder {p}: {e.strerror}") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise UsageError(f"output folder {p} is not writable")
    return p


def device(text: str) -> str:
    """argparse type: a device this machine can compute on ('cpu', 'cuda', 'cuda:N', 'mps',
    ...), or 'auto' (cuda if available)."""
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        d = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r} (try cpu, cuda, cuda:0)"
        ) from None
    if d.type == "meta":
        raise argparse.ArgumentTypeError("device 'meta' holds no data; use cpu or cuda")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r} asked for, but CUDA is not available")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(
            f"device {text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    try:
        (torch.ones(2, device=d) * 2).sum().item()
    except Exception as e:  # mps or another backend that is built in but cannot run here
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise argparse.ArgumentTypeError(f"device {text!r} cannot run here ({why})") from None
    return str(d)


def import_object(spec: str, what: str):
    """``package.module:name`` -> the object (the current folder is importable too).

    Only the command line names code: this is called on ``--model``/``--data``/``--loss``
    values, never on anything read from a file.

    Raises:
        UsageError: malformed spec, module not importable, or no such attribute.
    """
    mod, sep, name = spec.partition(":")
    if not sep or not mod or mod.startswith(".") or not name.isidentifier():
        raise UsageError(f"{what} must look like package.module:name, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = getattr(importlib.import_module(mod), name)
    except ImportError as e:
        raise UsageError(f"{what} {spec!r}: cannot import {mod!r} ({e})") from None
    except AttributeError:
        raise UsageError(f"{what} {spec!r}: module {mod!r} has no {name!r}") from None
    if not callable(obj):
        raise UsageError(f"{what} {spec!r} is not callable")
    return obj


def loss_spec(text: str) -> str:
    """argparse type: a loss name (:data:`analysis.LOSSES`) or ``package.module:function``."""
    mod, sep, name = text.partition(":")
    if text in LOSSES or (sep and mod and name.isidentifier()):
        return text
    raise argparse.ArgumentTypeError(
        f"expected one of {', '.join(LOSSES)} or package.module:function, got {text!r}"
    )


def resolve_loss(spec: str, ignore_index: int = IGNORE_INDEX):
    """The loss callable for a :func:`loss_spec` value (importing it when it names code);
    ``ignore_index``: the label the token losses (``lm``, ``token_ce``) skip.

    Raises:
        UsageError: another ``ignore_index`` for a loss that is not a token loss.
    """
    loss = import_object(spec, "--loss") if ":" in spec else loss_function(spec)
    if ignore_index == IGNORE_INDEX:
        return loss
    if not isinstance(loss, TokenCrossEntropy):
        raise UsageError(f"--ignore-index applies to --loss lm and token_ce, not {spec}")
    return TokenCrossEntropy(loss.shift, ignore_index)


def regex(text: str) -> str:
    """argparse type: a regular expression with one group (the epoch in a file name)."""
    try:
        groups = re.compile(text).groups
    except re.error as e:
        raise argparse.ArgumentTypeError(f"not a regular expression ({e}): {text!r}") from None
    if groups < 1:
        raise argparse.ArgumentTypeError(f"the regex needs a group for the epoch, got {text!r}")
    return text


def reported(fn, what: str, returns: type | None = None):
    """``fn`` (the caller's own code, named by ``what``) with any failure, or a result that is
    not a ``returns``, turned into one line (:class:`UsageError`, exit 2), not a traceback."""
    if fn is None:
        return None
    name = getattr(fn, "__name__", repr(fn))

    @functools.wraps(fn)  # the trainer reads the factory's signature
    def call(*args, **kwargs):
        try:
            out = fn(*args, **kwargs)
        except Exception as e:
            why = (str(e).strip().splitlines() or [""])[0][:200]
            raise UsageError(f"{what}: {name} failed: {type(e).__name__}: {why}") from None
        if returns is not None and not isinstance(out, returns):
            label = "torch.nn.Module" if returns is torch.nn.Module else returns.__qualname__
            raise UsageError(f"{what}: {name} returned a {type(out).__name__}, not a {label}")
        return out

    return call


def add_checkpoint_options(p: argparse.ArgumentParser) -> None:
    """``--loss``, ``--ignore-index``, ``--key``, ``--strip-prefix`` and ``--epoch-regex``: how
    any checkpoint folder is read and scored (``saf analyze`` and ``saf surface``)."""
    p.add_argument(
        "--loss",
        type=loss_spec,
        default="ce",
        metavar="|".join(LOSSES) + "|MODULE:FUNCTION",
        help="loss(output, targets), a batch mean (default: ce; lm: next-token cross-entropy "
        "of (batch, seq, vocab) logits on the input_ids, label -100 ignored, batches weighted "
        "by tokens); checked against the data first",
    )
    p.add_argument(
        "--ignore-index",
        type=int,
        default=IGNORE_INDEX,
        metavar="N",
        help=f"the label --loss lm/token_ce skip (default: {IGNORE_INDEX}, Hugging Face's)",
    )
    p.add_argument(
        "--key", default=None, help="where each file keeps its state dict (e.g. ema, state_dict)"
    )
    p.add_argument(
        "--strip-prefix",
        default=None,
        metavar="PREFIX",
        help="remove PREFIX (e.g. net.) from every key, keeping only its keys (default: the "
        "prefix that makes the keys match the model's)",
    )
    p.add_argument(
        "--epoch-regex",
        type=regex,
        default=None,
        metavar="REGEX",
        help="the epoch in a file name: the first group (default: epoch=N, epoch_N, epN, N)",
    )


def data_for(args, run_data: dict | None = None):
    """The batches to measure on: ``--data`` (a data set of ours, or ``MODULE:FUNCTION``:
    trusted code from the command line) or else the run's own data set (``run.json`` is
    data: only names of ours are accepted there)."""
    if args.data and ":" in args.data:
        data = import_object(args.data, "--data")()
        if not isinstance(data, Iterable):
            raise UsageError(f"--data {args.data} returned a {type(data).__name__}, not batches")
        try:
            data = list(data) if iter(data) is data else data  # a generator is read once
            empty = next(iter(data), None) is None
        except Exception as e:  # the user's own loader failed
            raise UsageError(f"--data {args.data}: reading its batches failed: {e}") from None
        if empty:
            raise UsageError(f"--data {args.data} gave no batches; return (inputs, targets) pairs")
        return data
    name = args.data or (run_data or {}).get("name")
    if name not in DATASETS:
        raise UsageError(
            f"--data: unknown data set {name!r}; use {', '.join(DATASETS)} or "
            "package.module:function"
        )
    data_dir = args.data_dir or (run_data or {}).get("data_dir")
    return data_batches(name, args.split, args.batch_size, args.n_samples, data_dir, args.device)
