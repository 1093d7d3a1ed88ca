"""``saf figures``: the whole study (train, analyse, surfaces, figures, report) in one command."""

from __future__ import annotations

import argparse

from cli._common import (
    UsageError,
    device,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    threads,
    writable_dir,
)
from figures import full_settings, quick_settings, run_pipeline, say
from saf import DATASETS, METHODS, MODELS, load_dataset

# Per data set: the model and schedule when the user gives none (paper scale for CIFAR).
_DATA_DEFAULTS = {
    "digits": {},
    "mnist1d": {},
    "cifar10": {"model": "resnet18", "epochs": 200, "batch_size": 128, "lr": 0.1,
                "analysis_samples": 2048, "m_values": (16, 64, 128, 512, 2048)},
    "cifar100": {"model": "resnet18", "epochs": 200, "batch_size": 128, "lr": 0.1,
                 "analysis_samples": 2048, "m_values": (16, 64, 128, 512, 2048)},
}  # fmt: skip


def add_parser(subparsers) -> None:
    """Register ``saf figures``."""
    p = subparsers.add_parser(
        "figures",
        help="train every method x seed, analyse, and write the figures and index.html",
        description="The main job: train SGD, SAM, SAF and MESA (>= 3 seeds each), analyse "
        "every checkpoint, compute loss surfaces, then write paper-style figures, tables and "
        "OUT/index.html. A rerun reuses finished runs and analyses.",
    )
    p.add_argument("--out", required=True, help="output folder (runs, analysis, figures, report)")
    p.add_argument("--quick", action="store_true", help="small settings (about 3 minutes on CPU)")
    p.add_argument("--data", choices=DATASETS, default="digits", help="data set (default: digits)")
    p.add_argument("--data-dir", help="folder of the CIFAR python-format files (CIFAR only)")
    p.add_argument(
        "--model", choices=list(MODELS), help="model name (default: mlp; resnet18 for CIFAR)"
    )
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds per method (default: 3)")
    p.add_argument("--epochs", type=positive_int, help="epochs per run (default: by mode)")
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument(
        "--track-per-epoch",
        type=nonneg_int,
        help="per-step sharpness: lambda_max measurements per epoch in a replay of each run "
        "(0: off; default 3)",
    )
    p.add_argument("--threads", type=threads, default=1, help="torch CPU threads (default: 1)")
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars"
    )
    hidden = argparse.SUPPRESS  # smaller settings for tests and experiments
    p.add_argument("--methods", default=None, help=hidden)
    p.add_argument("--batch-size", type=positive_int, help=hidden)
    p.add_argument("--lr", type=positive_float, help=hidden)
    p.add_argument("--analysis-samples", type=positive_int, help=hidden)
    p.add_argument("--hessian-every", type=positive_int, help=hidden)
    p.add_argument("--surface-points", type=positive_int, help=hidden)
    p.add_argument("--surface-span", type=nonneg_float, help=hidden)
    p.add_argument("--interp-points", type=positive_int, help=hidden)
    p.add_argument("--m-values", help=hidden)
    p.add_argument("--sweep-lams", help=hidden)
    p.set_defaults(run=run)


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        v = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not v or min(v) < 1:
        raise UsageError(f"{what} must be integers >= 1, got {text!r}")
    return v


def build_settings(args: argparse.Namespace):
    """The pipeline's Settings from the parsed arguments (validated; nothing is run)."""
    if args.data.startswith("cifar") and not args.data_dir:
        raise UsageError(f"--data {args.data} needs --data-dir (the python-format CIFAR folder)")
    if args.data_dir and not args.data.startswith("cifar"):
        raise UsageError(f"--data-dir is for CIFAR only; {args.data} is embedded")
    over = dict(_DATA_DEFAULTS[args.data], data=args.data, data_dir=args.data_dir, seeds=args.seeds)
    for k in ("model", "epochs", "batch_size", "lr", "analysis_samples",
              "hessian_every", "surface_points", "surface_span", "interp_points",
              "track_per_epoch"):  # fmt: skip
        if getattr(args, k) is not None:
            over[k] = getattr(args, k)
    if args.methods:
        over["methods"] = tuple(args.methods.split(","))
        bad = [m for m in over["methods"] if m not in METHODS]
        if bad or len(over["methods"]) < 2:
            raise UsageError(f"--methods: give >= 2 of {', '.join(METHODS)}, got {args.methods!r}")
    if args.m_values:
        over["m_values"] = _ints(args.m_values, "--m-values")
    if args.sweep_lams:
        try:
            over["sweep_lams"] = tuple(float(t) for t in args.sweep_lams.split(","))
        except ValueError:
            raise UsageError(f"--sweep-lams must be numbers, got {args.sweep_lams!r}") from None
    if args.quick and args.data.startswith("cifar"):
        over.update(epochs=args.epochs or 2)
    return (quick_settings if args.quick else full_settings)(**over)


def run(args: argparse.Namespace) -> int:
    """Run the pipeline; print where the report is."""
    settings = build_settings(args)
    if settings.data.startswith("cifar"):  # a bad --data-dir: one line, before any output
        for split in ("train", "test"):
            load_dataset(settings.data, split, settings.data_dir)
    out = writable_dir(args.out)
    page = run_pipeline(settings, out, args.device, args.progress, args.threads)
    say(f"report: {page}")
    return 0
