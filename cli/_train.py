"""``saf train``: train one run (sgd, sam, asam, saf or mesa) and write its run directory."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from cli._common import (
    UsageError,
    device,
    existing_dir,
    import_object,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    regular_run_json,
    reported,
    threads,
    unit_float,
)
from saf import DATASETS, METHODS, MODELS, TrainConfig, read_run, train
from saf.config import OPTIMIZERS, is_spec

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


def _name_or_spec(names, what):
    def parse(text: str) -> str:
        if text in names or is_spec(text):
            return text
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(names)} or package.module:function, got {text!r}"
        )

    return parse


def _betas(text: str) -> tuple[float, float]:
    try:
        b = tuple(float(t) for t in text.split(","))
    except ValueError:
        b = ()
    if len(b) != 2 or not all(0 <= v < 1 for v in b):
        raise argparse.ArgumentTypeError(
            f"expected two numbers in [0, 1) like 0.9,0.999, got {text!r}"
        )
    return b


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
    a(
        "--model",
        type=_name_or_spec(MODELS, "--model"),
        default="resnet_small",
        metavar="NAME|MODULE:FACTORY",
        help=f"architecture: {', '.join(MODELS)}, or your own "
        "factory (given num_classes and in_shape if it takes them)",
    )
    a("--model-kwargs", type=_json_dict, default={}, metavar="JSON", help="e.g. '{\"width\": 32}'")
    a(
        "--data",
        type=_name_or_spec(DATASETS, "--data"),
        default="digits",
        metavar="NAME|MODULE:FUNCTION",
        help=f"data set: {', '.join(DATASETS)} (default digits, "
        "embedded), or your own function(split) returning a map-style data set of (x, y)",
    )
    a("--data-dir", type=existing_dir, default=None, help="folder of the CIFAR python files")
    a("--limit", type=positive_int, default=None, help="train on a balanced subset of N samples")
    a("--epochs", type=positive_int, default=30, help="number of epochs (default: 30)")
    a("--batch-size", type=positive_int, default=128, help="batch size (default: 128)")
    a("--optimizer", choices=OPTIMIZERS, default="sgd", help="base optimizer (default: sgd)")
    a("--lr", type=positive_float, default=0.05, help="peak learning rate, cosine decay")
    a("--momentum", type=unit_float, default=0.9, help="SGD momentum (default: 0.9)")
    a("--nesterov", action=argparse.BooleanOptionalAction, default=False, help="Nesterov (SGD)")
    a("--betas", type=_betas, default=(0.9, 0.999), metavar="B1,B2", help="AdamW betas")
    a("--weight-decay", type=nonneg_float, default=5e-4, help="weight decay (default: 5e-4)")
    a(
        "--decay-norm-bias",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="weight decay on normalization weights and biases (default: sgd yes, adamw no)",
    )
    a("--warmup-epochs", type=nonneg_int, default=0, help="linear LR warm-up epochs")
    a("--label-smoothing", type=unit_float, default=0.0, help="label smoothing (reference: 0.1)")
    a("--clip-grad", type=positive_float, default=None, help="clip the gradient norm to this")
    a("--track-sharpness", type=positive_int, default=None, metavar="N",
      help="lambda_max every N steps into RUN_DIR/sharpness.csv, beside the optimizer's "
           "stability threshold (the run's bits are unchanged)")  # fmt: skip
    a("--probe-samples", type=positive_int, default=256,
      help="training samples the sharpness is measured on (256)")  # fmt: skip
    a("--rho", type=nonneg_float, default=None, help="SAM/ASAM radius (0.05 / 0.5)")
    a(
        "--sam-local-eps",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="under DDP, each rank's SAM perturbation from its own gradient (default: yes)",
    )
    a("--saf-lambda", dest="lam", type=nonneg_float, default=None, help="trajectory weight")
    a("--saf-tau", dest="tau", type=positive_float, default=5.0, help="temperature (5)")
    a(
        "--saf-lag",
        dest="lag",
        type=positive_int,
        default=None,
        help="lag E~ in epochs (default: the paper's 3 at 200 epochs, scaled to --epochs)",
    )
    a(
        "--saf-start",
        dest="start_epoch",
        type=nonneg_int,
        default=None,
        help="first epoch, 0-based (default: the paper's 5 at 200 epochs, scaled to --epochs)",
    )
    a("--ema-decay", type=unit_float, default=None, help="MESA EMA decay beta")
    a("--augment", action=argparse.BooleanOptionalAction, default=True, help="CIFAR augmentation")
    a("--amp", action=argparse.BooleanOptionalAction, default=False, help="bf16 autocast")
    a(
        "--sync-bn",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="SyncBatchNorm across ranks (torchrun)",
    )
    a("--save-every", type=positive_int, default=1, help="keep every N-th epoch's checkpoint")
    a("--threads", type=threads, default=None, help="torch CPU threads")
    a("--seed", type=nonneg_int, default=0, help="seed of init, data order, augmentation")
    a("--device", type=device, default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    a("--out", default=None, help="run directory (default: runs/METHOD-sSEED)")
    a(
        "--resume",
        metavar="RUN_DIR",
        type=existing_dir,
        default=None,
        help="continue a run (with --epochs N: extend it to N epochs)",
    )
    a("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    p.set_defaults(run=run)


# what a resumed run may take from the command line; every other option comes from run.json
RESUMABLE = {"epochs", "device", "threads", "progress", "resume", "out"}


def run(args) -> int:
    """Train (or resume) and print the run directory."""
    fields = {k: v for k, v in vars(args).items() if k not in ("command", "run", "resume", "argv")}
    fields["data_dir"] = None if args.data_dir is None else str(args.data_dir)
    epochs = None
    if args.resume is not None:
        if args.out is not None and args.out != str(args.resume):
            raise UsageError("--resume continues RUN_DIR in place; do not also give --out")
        changed = sorted(given(args) - RESUMABLE - {"model", "data"})
        if changed:
            raise UsageError(
                f"--resume takes its settings from {args.resume / 'run.json'}; only --epochs "
                f"(to extend), --device, --threads and --progress may be given, not "
                f"{', '.join('--' + c.replace('_', '-') for c in changed)}"
            )
        fields["out"] = str(args.resume)
        epochs = args.epochs if "epochs" in given(args) else None
        regular_run_json(args.resume)
        run = read_run(args.resume, custom_ok=True)
        for what in ("model", "data"):  # your own code is named in run.json, never imported
            if is_spec(run[what]["name"]):
                if getattr(args, what) != run[what]["name"]:
                    raise UsageError(
                        f"{args.resume} was trained with {what} {run[what]['name']}: give "
                        f"--{what} {run[what]['name']} to resume it"
                    )
                fields[what] = run[what]["name"]
    factory = import_object(fields["model"], "--model") if is_spec(fields["model"]) else None
    data_fn = import_object(fields["data"], "--data") if is_spec(fields["data"]) else None
    factory, data_fn = reported(factory, "--model", torch.nn.Module), reported(data_fn, "--data")
    cfg = TrainConfig(**fields)
    if args.resume is None:
        _fresh(cfg.run_dir)
    run_dir = train(cfg, resume=args.resume is not None, epochs=epochs,
                    model_factory=factory, dataset_fn=data_fn)  # fmt: skip
    print(run_dir)
    return 0


RUN_FILES = ("run.json", "state.pt", "metrics.csv", "checkpoints")
"""What `saf train` writes in a run directory."""


def _fresh(out) -> None:
    """Refuse an ``--out`` a new run would overwrite: a file, or a folder holding a run's
    files (``checkpoints/``, ``metrics.csv``) without the ``run.json`` that would make
    ``--resume`` possible (with one, the trainer says to resume)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    regular_run_json(out)
    found = [n for n in RUN_FILES if os.path.lexists(out / n)]
    if found and "run.json" not in found and "state.pt" not in found:
        raise UsageError(
            f"--out {out} holds {', '.join(found)} of another run (but no run.json); choose "
            "another --out or move them away"
        )


def given(args) -> set[str]:
    """The destinations of the options written on the command line (``--x`` or ``--x=v``)."""
    out = set()
    for action in build_parser_actions():
        for opt in action.option_strings:
            if any(tok == opt or tok.startswith(opt + "=") for tok in args.argv):
                out.add(action.dest)
    return out


def build_parser_actions():
    """The actions of ``saf train`` (a fresh parser: argparse keeps no registry)."""
    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub)
    return sub.choices["train"]._actions
