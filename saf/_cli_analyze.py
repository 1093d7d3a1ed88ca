"""``saf analyze``: curvature and sharpness of every checkpoint of a folder, as a tidy CSV."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from saf._cli_common import (
    EXIT_OK,
    EXIT_SKIPPED,
    UsageError,
    device,
    existing_dir,
    positive_float,
    positive_int,
)

DEFAULT_METRICS = "loss,accuracy,lambda_max,trace,sam_sharpness"

EXAMPLES = """examples:
  saf analyze runs/saf-s0
  saf analyze runs/saf-s0 --metrics lambda_5,trace,m_sharpness --m 32 --every 5
  saf analyze my_ckpts --model mypkg.nets:make_net --data digits --out table.csv
  saf analyze my_ckpts --model mypkg.nets:make_net --data mypkg.data:batches

metrics: loss, accuracy, lambda_max, lambda_2..lambda_K (top K in one Lanczos run),
lambda_min, trace (Hutch++), sam_sharpness (one step, rho 0.05, per batch: SAF Fig. 4b),
m_sharpness (--rho, --m, --steps, --kind, --adaptive).
For a run directory of `saf train` the model and data come from its run.json; for any
other folder of .pt/.pth/.safetensors state dicts give --model and --data.
Results are cached next to --out by checkpoint content and settings: a rerun (also after
a crash) computes only what is missing.
exit codes: 0 done, 2 bad input, 3 done but some checkpoint was skipped (named on stderr).
"""


def add_parser(subparsers) -> None:
    """Register ``saf analyze``."""
    p = subparsers.add_parser(
        "analyze",
        help="Hessian eigenvalues, trace and sharpness of every checkpoint, as a CSV table",
        description="Measure every checkpoint of a run directory (or of any folder of state "
        "dicts) and write one tidy CSV row per checkpoint x metric.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a("dir", type=existing_dir, metavar="DIR", help="run directory or folder of checkpoints")
    a("--model", metavar="MODULE:FACTORY", help="zero-argument callable returning the model")
    a("--data", metavar="NAME|MODULE:FUNCTION", help="data set name, or a callable returning "
      "an iterable of (inputs, targets) batches (default: the run's data set)")  # fmt: skip
    a("--split", choices=("train", "test"), default="train", help="data split (default: train)")
    a("--data-dir", type=existing_dir, default=None, help="folder of the CIFAR python files")
    a("--metrics", default=DEFAULT_METRICS, help=f"comma list (default: {DEFAULT_METRICS})")
    a("--out", default=None, help="CSV path (default: DIR/analysis.csv)")
    a("--every", type=positive_int, default=1, help="only epochs that are multiples of N")
    a("--device", type=device, default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    a("--batch-size", type=positive_int, default=128, help="batch size (sam_sharpness: per batch)")
    a("--n-samples", type=positive_int, default=None, help="class-balanced subset of N samples")
    a("--dtype", choices=("float32", "float64"), default=None, help="compute dtype")
    a("--mode", choices=("eval", "train"), default="eval", help="BatchNorm mode (default: eval)")
    a("--tol", type=positive_float, default=1e-4, help="Lanczos relative tolerance (1e-4)")
    a("--trace-matvecs", type=positive_int, default=99, help="Hutch++ products (default: 99)")
    a("--rho", type=positive_float, default=0.05, help="m_sharpness radius (default: 0.05)")
    a("--m", type=positive_int, default=128, help="m_sharpness batch size m (default: 128)")
    a("--steps", type=positive_int, default=1, help="m_sharpness ascent steps (default: 1)")
    a("--kind", choices=("worst", "average"), default="worst", help="m_sharpness kind")
    a("--adaptive", action=argparse.BooleanOptionalAction, default=False, help="ASAM scaling")
    a("--seed", type=int, default=0, help="seed of every random probe (default: 0)")
    a("--threads", type=positive_int, default=None, help="torch CPU threads")
    a("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    p.set_defaults(run=run)


def import_object(spec: str, what: str):
    """``package.module:name`` -> the object (the current folder is importable too).

    Raises:
        UsageError: malformed spec, module not importable, or no such attribute.
    """
    mod, sep, name = spec.partition(":")
    if not sep or not mod or not name.isidentifier():
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


def _sources(args):
    """(model_factory, data) from the run directory and/or --model / --data."""
    from saf.data import DATASETS, data_batches
    from saf.runs import model_from_run

    run, notes = _run_info(args.dir, args.model is not None and args.data is not None)
    if run is None and (args.model is None or args.data is None):
        raise UsageError(
            f"{args.dir} is not a run directory of `saf train`; give --model MODULE:FACTORY "
            "and --data NAME|MODULE:FUNCTION"
        )
    factory = import_object(args.model, "--model") if args.model else (lambda: model_from_run(run))
    name = args.data or run["data"]["name"]
    if ":" in name:
        data = import_object(name, "--data")()
    elif name in DATASETS:
        data_dir = args.data_dir or (run or {}).get("data", {}).get("data_dir")
        data = data_batches(
            name, args.split, args.batch_size, args.n_samples, data_dir, args.device
        )
    else:
        raise UsageError(f"--data: unknown data set {name!r}; use {', '.join(DATASETS)} "
                         "or package.module:function")  # fmt: skip
    return factory, data, notes


_RUN_REQUIRED = {"format", "method", "hparams", "model", "data", "seed"}
_RUN_KEYS = _RUN_REQUIRED | {"device", "versions", "config"}  # device...: optional


def _run_info(run_dir, have_sources: bool) -> tuple[dict | None, list[str]]:
    """``(run.json, problems)``. Analysis needs only its ``model`` and ``data``: other
    missing keys and unknown keys are reported (exit 3), not fatal; with --model and --data
    given, an incomplete run.json is reported and ignored."""
    import json

    from saf.runs import is_run_dir, read_run

    if not is_run_dir(run_dir):
        return None, []
    path = run_dir / "run.json"
    try:
        return _note_keys(read_run(run_dir), path)
    except ValueError as e:
        run = json.loads(path.read_text())
        model, data = run.get("model"), run.get("data")
        usable = isinstance(model, dict) and {"name", "kwargs"} <= set(model)
        usable = (
            usable and isinstance(data, dict) and {"name", "num_classes", "in_shape"} <= set(data)
        )
        if not usable and not have_sources:
            raise UsageError(str(e)) from None
        run, notes = (run, _note_keys(run, path)[1]) if usable else (None, [str(e)])
    return run, notes


def _note_keys(run: dict, path) -> tuple[dict, list[str]]:
    missing, unknown = sorted(_RUN_REQUIRED - set(run)), sorted(set(run) - _RUN_KEYS)
    parts = [f"{what} keys {keys}" for what, keys in (("missing", missing), ("unknown", unknown))
             if keys]  # fmt: skip
    return run, [f"{path}: {', '.join(parts)} (ignored)"] if parts else []


def run(args) -> int:
    """Analyse, write the CSV, print a summary; exit 3 when a checkpoint was skipped."""
    import torch

    from analysis import analyze_run
    from analysis._checkpoints import parse_metrics

    if args.threads:
        torch.set_num_threads(args.threads)
    metrics = parse_metrics(args.metrics.split(","))
    factory, data, notes = _sources(args)
    for note in notes:
        print(f"saf analyze: skipped: {note}", file=sys.stderr)
    out = args.out or str(args.dir / "analysis.csv")
    try:
        factory()
    except Exception as e:
        raise UsageError(f"--model: building the model failed: {type(e).__name__}: {e}") from None
    df = analyze_run(
        args.dir, metrics, model_factory=factory, data=data, every=args.every, out=out,
        device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None,
        mode=args.mode, tol=args.tol, trace_matvecs=args.trace_matvecs, rho=args.rho, m=args.m,
        steps=args.steps, kind=args.kind, adaptive=args.adaptive, seed=args.seed,
        progress=args.progress,
    )  # fmt: skip
    ok = df[df.status == "ok"]
    if len(ok):
        table = ok.pivot_table(index="checkpoint", columns="metric", values="value", sort=False)
        print(table.to_string(float_format=lambda v: f"{v:.6g}"))
    print(f"wrote {out}")
    return EXIT_SKIPPED if df.attrs.get("skipped") or notes else EXIT_OK
