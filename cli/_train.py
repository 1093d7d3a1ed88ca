"""``saf train``: train one run (sgd, sam, asam, saf or mesa) and write its run directory."""

from __future__ import annotations

import argparse
import json

from cli._common import (
    UsageError,
    device,
    existing_dir,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    unit_float,
)
from saf import DATASETS, METHODS, MODELS, TrainConfig, train

EXAMPLES = """examples:
  saf train --method saf --out runs/saf-s0
  saf train --data digits --model resnet_small --method sam --epochs 30 --seed 1 --out runs/sam-s1
  saf train --method mesa --saf-lambda 0.8 --ema-decay 0.99 --out runs/mesa-s0
  saf train --data cifar10 --data-dir ~/data --model resnet18 --method saf --epochs 200 \\
            --batch-size 128 --lr 0.1 --device cuda --amp --out runs/c10-saf
  saf train --resume runs/saf-s0          # continue an interrupted run

defaults: method-specific values are used where an option is left out: rho 0.05 (sam) /
0.5 (asam); lambda 0.3 (saf) / 0.8 (mesa); EMA decay: a horizon of 6.4% of the run,
at most 0.9998 (mesa).
exit codes: 0 done, 2 bad input or training diverged (NaN/Inf loss; the last good
checkpoint is kept), 130 interrupted (resume with --resume).
"""


def _json_dict(text: str) -> dict:
    try:
        d = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}") from None
    if not isinstance(d, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return d


def add_parser(subparsers) -> None:
    """Register ``saf train``."""
    p = subparsers.add_parser(
        "train",
        help="train one run with sgd, sam, asam, saf or mesa",
        description="Train a model with SGD, SAM, ASAM, SAF or MESA in one loop (same data "
        "order for every method given the seed) and write a self-describing run directory.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a("--method", choices=METHODS, default="saf", help="training method (default: saf)")
    a("--model", choices=list(MODELS), default="resnet_small", help="architecture")
    a("--model-kwargs", type=_json_dict, default={}, metavar="JSON", help="e.g. '{\"width\": 32}'")
    a("--data", choices=DATASETS, default="digits", help="data set (default: digits, embedded)")
    a("--data-dir", type=existing_dir, default=None, help="folder of the CIFAR python files")
    a("--limit", type=positive_int, default=None, help="train on a balanced subset of N samples")
    a("--epochs", type=positive_int, default=30, help="number of epochs (default: 30)")
    a("--batch-size", type=positive_int, default=128, help="batch size (default: 128)")
    a("--lr", type=positive_float, default=0.05, help="peak learning rate, cosine decay")
    a("--momentum", type=unit_float, default=0.9, help="SGD momentum (default: 0.9)")
    a("--weight-decay", type=nonneg_float, default=5e-4, help="weight decay (default: 5e-4)")
    a("--warmup-epochs", type=nonneg_int, default=0, help="linear LR warm-up epochs")
    a("--rho", type=nonneg_float, default=None, help="SAM/ASAM radius (0.05 / 0.5)")
    a("--saf-lambda", dest="lam", type=nonneg_float, default=None, help="trajectory weight")
    a("--saf-tau", dest="tau", type=positive_float, default=5.0, help="temperature (5)")
    a("--saf-lag", dest="lag", type=positive_int, default=3, help="lag E~ in epochs (3)")
    a("--saf-start", dest="start_epoch", type=nonneg_int, default=5, help="first epoch (0-based)")
    a("--ema-decay", type=unit_float, default=None, help="MESA EMA decay beta")
    a("--augment", action=argparse.BooleanOptionalAction, default=True, help="CIFAR augmentation")
    a("--amp", action=argparse.BooleanOptionalAction, default=False, help="bf16 autocast (CUDA)")
    a("--threads", type=positive_int, default=None, help="torch CPU threads")
    a("--seed", type=nonneg_int, default=0, help="seed of init, data order, augmentation")
    a("--device", type=device, default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    a("--out", default=None, help="run directory (default: runs/METHOD-sSEED)")
    a("--resume", metavar="RUN_DIR", type=existing_dir, default=None, help="continue a run")
    a("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    p.set_defaults(run=run)


def run(args) -> int:
    """Train (or resume) and print the run directory."""
    fields = {k: v for k, v in vars(args).items() if k not in ("command", "run", "resume")}
    fields["data_dir"] = None if args.data_dir is None else str(args.data_dir)
    if args.resume is not None:
        if args.out is not None and args.out != str(args.resume):
            raise UsageError("--resume continues RUN_DIR in place; do not also give --out")
        fields["out"] = str(args.resume)
    run_dir = train(TrainConfig(**fields), resume=args.resume is not None)
    print(run_dir)
    return 0
