"""``saf analyze``: curvature and sharpness of every checkpoint of a folder, as a tidy CSV."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import sys
from pathlib import Path

import torch

from analysis import AnalysisSettings, analyze_run, find_checkpoints, parse_metrics
from analysis.io import CHECKPOINT_SUFFIXES
from cli._common import (
    EXIT_OK,
    EXIT_SKIPPED,
    UsageError,
    add_checkpoint_options,
    data_for,
    device,
    existing_dir,
    import_object,
    positive_float,
    positive_int,
    regular_run_json,
    reported,
    resolve_loss,
    threads,
)
from saf import is_run_dir, model_from_run, read_run_lenient

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
other folder of .pt/.pth/.ckpt/.safetensors/.pth.tar files or Hugging Face model folders
(save_pretrained, Trainer checkpoint-N/) give --model and --data. Rows come in epoch, then
step order (step_N, checkpoint-N). Language models: --loss lm.
Results are cached next to --out by checkpoint content and settings: a rerun (also after
a crash) computes only what is missing.
Error bars: the stderr column (trace: over probes; sharpness: over m-batches; lambda rows
with --lambda-se G: jackknife over the data). Those over the data fall as 1/sqrt(N): four
times --n-samples halve them.
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
    a("--lambda-se", dest="lambda_se_groups", type=int, default=0, metavar="G",
      help="standard error of the lambda_* rows: jackknife over G groups of batches (G more "
      "solves, G >= 8 for a steady error bar; it falls as 1/sqrt(--n-samples))")  # fmt: skip
    a("--warm-start", action=argparse.BooleanOptionalAction, default=False,
      help="start each checkpoint's Lanczos from the previous one's vectors (fewer products, "
      "same tolerance; the matvecs column counts them)")  # fmt: skip
    a("--curvature", choices=("hessian", "ggn", "fisher"), default="hessian",
      help="matrix of the lambda_* and trace rows: the Hessian (default), the Gauss-Newton "
      "or the empirical Fisher")  # fmt: skip
    add_checkpoint_options(p)
    a("--seed", type=int, default=0, help="seed of every random probe (default: 0)")
    a("--threads", type=threads, default=None, help="torch CPU threads")
    a("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    p.set_defaults(run=run)


def _sources(args):
    """(model_factory, data, notes) from the run directory and/or --model / --data.

    Only --model and --data may name code; a run directory's ``run.json`` is data (its
    model and data names must be ones this toolkit knows)."""
    regular_run_json(args.dir)
    run, error, notes = read_run_lenient(args.dir) if is_run_dir(args.dir) else (None, None, [])
    if run is None and (args.model is None or args.data is None):
        raise UsageError(
            error
            or f"{args.dir} is not a run directory of `saf train`; give --model MODULE:FACTORY "
            "and --data NAME|MODULE:FUNCTION"
        )
    if error:
        notes = [error]
    factory = import_object(args.model, "--model") if args.model else (lambda: model_from_run(run))
    data = data_for(args, (run or {}).get("data"))
    return factory, data, notes


def _not_an_input(folder: Path, out: Path) -> None:
    """Refuse an ``--out`` that would overwrite what the analysis reads or the run keeps:
    a checkpoint, ``run.json``, ``metrics.csv`` or ``state.pt``."""
    kept = [folder / n for n in ("run.json", "metrics.csv", "state.pt")]
    with contextlib.suppress(ValueError):  # no checkpoints: analyze_run says so
        kept += [p for _, p in find_checkpoints(folder)]
    if out.name.endswith(CHECKPOINT_SUFFIXES) or out.resolve() in {p.resolve() for p in kept}:
        raise UsageError(
            f"--out {out} would overwrite an input of the analysis or a file of the run; "
            "name a new .csv file"
        )


def settings(args) -> AnalysisSettings:
    """The measurement settings from the parsed arguments (one field per option)."""
    fields = {f.name for f in dataclasses.fields(AnalysisSettings)} - {"dtype", "sam_rho"}
    kw = {k: getattr(args, k) for k in fields}
    try:
        return AnalysisSettings(dtype=getattr(torch, args.dtype) if args.dtype else None, **kw)
    except ValueError as e:  # name the option, not the field
        flags = {"lambda_se_groups": "--lambda-se"}
        raise UsageError(re.sub(r"\b[a-z_]+\b", lambda m: flags.get(m[0], m[0]), str(e))) from None


def run(args) -> int:
    """Analyse, write the CSV, print a summary; exit 3 when a checkpoint was skipped."""
    if args.threads:
        torch.set_num_threads(args.threads)
    metrics = parse_metrics(args.metrics.split(","))
    factory, data, notes = _sources(args)
    if args.lambda_se_groups and len(data := list(data)) < args.lambda_se_groups:
        fix = (f"return more batches from --data {args.data}" if args.data and ":" in args.data
               else "use a smaller --batch-size")  # fmt: skip
        raise UsageError(f"--lambda-se {args.lambda_se_groups} needs at least that many batches, "
                         f"got {len(data)}; {fix}")  # fmt: skip
    for note in notes:
        print(f"saf analyze: skipped: {note}", file=sys.stderr)
    out = args.out or str(args.dir / "analysis.csv")
    if not str(out).strip() or Path(out).is_dir():
        raise UsageError(f"--out {out!r} must be a CSV file path, not a folder")
    _not_an_input(args.dir, Path(out))
    loss_fn = resolve_loss(args.loss, args.ignore_index)
    factory = reported(factory, "--model", torch.nn.Module)
    factory()  # a model that cannot be built is one line, before any work
    df = analyze_run(
        args.dir, metrics, model_factory=factory, data=data, loss_fn=loss_fn,
        settings=settings(args), every=args.every, out=out, device=args.device,
        progress=args.progress, key=args.key, epoch_regex=args.epoch_regex,
        strip_prefix=args.strip_prefix,
    )  # fmt: skip
    ok = df[df.status == "ok"]
    if len(ok):
        table = ok.pivot_table(index="checkpoint", columns="metric", values="value", sort=False)
        print(table.to_string(float_format=lambda v: f"{v:.6g}"))
    print(f"wrote {out}")
    return EXIT_SKIPPED if df.attrs.get("skipped") or notes else EXIT_OK
