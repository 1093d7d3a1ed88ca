"""``saf surface``: 1D/2D loss surfaces of a run (or one of its checkpoints), with plots.

Directions: ``random`` (Gaussian, filter-normalized, biases/BN ignored; the same draw for
every compared run), ``interpolate`` (between checkpoints), ``pca`` (of the run's
checkpoint trajectory) or ``hessian`` (top eigenvectors). Surfaces are resumable: rerun
the same command after an interruption and only the missing points are evaluated.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

import landscape as L
from analysis import (
    atomic_write_json,
    check_loss,
    find_checkpoints,
    load_checkpoint,
    load_state_dict,
)
from analysis.batches import forward, split, to
from analysis.distributed import init_from_env
from analysis.io import checkpoint_step, exclusive
from cli._common import (
    EXIT_OK,
    UsageError,
    add_checkpoint_options,
    data_for,
    device,
    existing_dir,
    existing_path,
    import_object,
    nonneg_int,
    positive_float,
    positive_int,
    regular_run_json,
    reported,
    resolve_loss,
    writable_dir,
)
from saf import is_run_dir, model_from_run, read_run

DIRECTIONS = ("random", "interpolate", "pca", "hessian")
MAX_POINTS = 10_001
MAX_GRID = 1_000_000
"""The most points a surface may have (each is a pass over --data; 1001 x 1001 in 2D)."""

EXAMPLES = """examples:
  saf surface runs/saf-s0 --dim 2 --grid -1:1:21 --out surfaces/saf
  saf surface runs/sgd-s0 --compare runs/sam-s0 runs/saf-s0 --dim 2 --grid -1:1:21 --log \\
              --out surfaces/compare
  saf surface runs/sgd-s0 --compare runs/saf-s0 --directions interpolate --dim 1 \\
              --grid -0.5:1.5:41 --out surfaces/sgd-to-saf
  saf surface runs/saf-s0 --directions pca --dim 2 --grid -1:1:21 --out surfaces/saf-pca
  saf surface runs/saf-s0/checkpoints/epoch_0010.pt --directions hessian --dim 1 \\
              --grid -0.5:0.5:21 --out surfaces/saf-e10-hessian

directions (grid units):
  random       Gaussian, ||d_i|| = ||w_i|| per filter (Li et al.); 1 = one weight norm
  interpolate  RUN [COMPARE ...]: 0 = RUN, 1 = COMPARE (2D: (1,0), (0,1) = two COMPAREs);
               without --compare: the run's first and last (2D: and middle) checkpoints
  pca          the run's checkpoints projected on their top principal plane (unit vectors)
  hessian      top Hessian eigenvectors at the checkpoint (unit vectors)
exit codes: 0 done, 2 bad input (nothing written), 130 interrupted (rerun to resume).
"""


def grid_spec(text: str) -> np.ndarray:
    """argparse type: ``START:STOP:N`` -> N evenly spaced points, START < STOP, N >= 2."""
    parts = text.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        a, b, n = float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected START:STOP:N like -1:1:51, got {text!r}"
        ) from None
    if n > MAX_POINTS:
        raise argparse.ArgumentTypeError(f"at most {MAX_POINTS} points per axis, got {text!r}")
    ok = math.isfinite(a) and math.isfinite(b) and a < b and n >= 2
    with np.errstate(all="ignore"):
        g = np.linspace(a, b, n) if ok else np.zeros(0)
    if len(g) < 2 or not np.isfinite(g).all() or not (np.diff(g) > 0).all():
        raise argparse.ArgumentTypeError(
            f"expected finite START < STOP and N >= 2 distinct points (e.g. -1:1:51), got {text!r}"
        )
    return g


def add_parser(subparsers) -> None:
    """Register ``saf surface``."""
    p = subparsers.add_parser(
        "surface",
        help="1D/2D loss surfaces of runs or checkpoints, with plots",
        description="Evaluate filter-normalized 1D/2D loss surfaces (Li et al. 2018) of a run "
        "directory (its last checkpoint) or of one checkpoint file inside a run directory, "
        "and plot them (PNG, PDF, interactive HTML).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Let "--grid -1:1:51" read as a value, not an option (argparse only knows plain numbers).
    p._negative_number_matcher = re.compile(r"^-\.?\d")
    a = p.add_argument
    a(
        "target",
        type=existing_path,
        metavar="RUN_DIR|FOLDER|CHECKPOINT",
        help="a run of `saf train`, or (with --model and --data) any checkpoint file or folder",
    )
    a("--dim", type=int, choices=(1, 2), default=2, help="1D line or 2D plane (default: 2)")
    a("--grid", type=grid_spec, default=grid_spec("-1:1:21"), help="START:STOP:N (-1:1:21)")
    a("--grid-y", type=grid_spec, default=None, help="second axis (default: same as --grid)")
    a(
        "--compare",
        type=existing_path,
        nargs="+",
        default=[],
        metavar="RUN|CHECKPOINT",
        help="more runs or checkpoints: side-by-side panels (or interpolation end points)",
    )
    a("--directions", choices=DIRECTIONS, default="random", help="direction kind (random)")
    a("--norm", choices=("filter", "layer", "model", "none"), default="filter")
    a("--ignore", choices=("biasbn", "none"), default="biasbn", help="1-D tensors (biasbn)")
    a("--epoch", type=nonneg_int, default=None, help="checkpoint epoch (default: last)")
    a("--model", metavar="MODULE:FACTORY", help="zero-argument callable returning your model")
    a(
        "--data",
        metavar="NAME|MODULE:FUNCTION",
        help="data set name, or a callable returning "
        "(inputs, targets) batches (default: the run's data set)",
    )
    add_checkpoint_options(p)
    a("--split", choices=("train", "test"), default="train", help="data split (train)")
    a("--n-samples", type=positive_int, default=None, help="class-balanced subset size")
    a("--batch-size", type=positive_int, default=512, help="evaluation batch size (512)")
    a("--target-se", type=positive_float, default=None, metavar="SE",
      help="evaluate each point on growing class-balanced subsets until the standard error "
      "of its loss is at most SE (steps of 2, 4, 8, ... batches: for a named data set a "
      "smaller --batch-size gives finer ones; --data keeps its own batches)")  # fmt: skip
    a("--data-dir", type=existing_dir, default=None, help="CIFAR folder (default: run's)")
    a("--seed", type=nonneg_int, default=0, help="seed of the random directions (0)")
    a("--device", type=device, default="cpu", help="cpu, cuda, cuda:N or auto (cpu)")
    a("--log", action=argparse.BooleanOptionalAction, default=False, help="log10 loss plots")
    a("--plots", action=argparse.BooleanOptionalAction, default=True, help="write plots")
    a("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    a("--out", required=True, help="output folder")
    p.set_defaults(run=run)


class _Source:
    """One model to draw: its weights (one checkpoint), its data, its checkpoint history.

    A run directory of ``saf train`` (or a checkpoint inside one) describes itself; any
    other file or folder needs ``--model`` and ``--data``."""

    def __init__(self, target: Path, epoch: int | None, args, is_main: bool):
        run_dir = _run_of(target)
        self.info = read_run(run_dir) if run_dir is not None and args.model is None else None
        self.dir = run_dir if self.info is not None else (target if target.is_dir() else
                                                           target.parent)  # fmt: skip
        if self.info is None and (args.model is None or args.data is None):
            raise UsageError(
                f"{target}: not a run of `saf train`; give --model MODULE:FACTORY and "
                "--data NAME|MODULE:FUNCTION to draw your own checkpoints"
            )
        found = find_checkpoints(self.dir, regex=args.epoch_regex)
        self.history = [(e, p) for e, p in found if e is not None] or found
        self.ckpt, self.epoch = _pick(target, epoch, self.history, is_main)
        factory = (reported(import_object(args.model, "--model"), "--model", torch.nn.Module)
                   if args.model else None)  # fmt: skip
        self.model = factory() if factory else model_from_run(self.info)
        self.model = load_checkpoint(self.model, self.ckpt, args.key, prefix=args.strip_prefix)
        self.key, self.prefix = args.key, args.strip_prefix
        self.state = self.model.state_dict()
        for k, t in self.state.items():  # load_state_dict keeps NaN
            if t.is_floating_point() and not bool(t.isfinite().all()):
                raise UsageError(f"{self.ckpt}: {k} has NaN/Inf weights; no surface to compute")
        self.model.to(args.device).eval()
        self.name = (self.dir.resolve().name if self.info is not None or target.is_dir()
                     else self.ckpt.stem)  # fmt: skip
        self.data = data_for(args, (self.info or {}).get("data"))
        self.pca = None

    def states(self, k: int | None = None) -> list[dict]:
        """The state dicts of the history up to this checkpoint (``k`` of them, evenly)."""
        upto = [p for e, p in self.history if self.epoch is None or e is None or e <= self.epoch]
        if k is not None:
            if len(upto) < k:
                raise UsageError(f"{self.dir}: needs at least {k} checkpoints, has {len(upto)}")
            upto = [upto[round(i * (len(upto) - 1) / (k - 1))] for i in range(k)]
        return [load_state_dict(p, key=self.key, model=self.model, prefix=self.prefix)
                for p in upto]  # fmt: skip


def _run_of(target: Path) -> Path | None:
    """The run directory ``target`` is, or holds the checkpoint ``target``."""
    candidates = [target] if target.is_dir() else list(target.parents[:2])
    for p in candidates:
        regular_run_json(p)  # a FIFO named run.json would block is_run_dir forever
    return next((p for p in candidates if is_run_dir(p)), None)


def _pick(target: Path, epoch: int | None, history, is_main: bool) -> tuple[Path, int | None]:
    """``(checkpoint, epoch)``: the file given, else ``--epoch`` (the main target's) or
    the last of the history."""
    if target.is_file():
        if epoch is not None and is_main:
            raise UsageError("give either a CHECKPOINT or --epoch, not both")
        known = {p.resolve(): e for e, p in history}
        return target, known.get(target.resolve())
    if not history:
        raise UsageError(f"{target}: no checkpoints yet")
    if epoch is None or not is_main:
        return history[-1][1], history[-1][0]
    found = {e: p for e, p in history}
    if epoch not in found:
        have = sorted(e for e in found if e is not None)
        raise UsageError(f"{target}: no checkpoint for epoch {epoch} (have {have})")
    return found[epoch], epoch


def _directions(args, run: _Source, others: list[_Source], loss_fn, out: Path):
    """``(directions, origin)`` for ``run``; for PCA also writes ``*_pca.json`` and sets
    ``run.pca``."""
    n, ignore = args.dim, None if args.ignore == "none" else args.ignore
    if args.directions == "random":
        return [L.random_direction(run.model, args.norm, ignore, args.seed, index=i)
                for i in range(n)], None  # fmt: skip
    if args.directions == "interpolate":
        states = [run.state, *(o.state for o in others)]
        if len(states) == 1:
            states = run.states(n + 1)
        if len(states) != n + 1:
            raise UsageError(f"--directions interpolate --dim {n} needs {n} --compare run(s)")
        return L.interpolation_directions(*states), states[0]
    if args.directions == "pca":
        traj = run.states()
        if len(traj) < 3:
            raise UsageError(f"{run.dir}: PCA needs at least 3 checkpoints, has {len(traj)}")
        keys = [k for k, p in run.model.named_parameters() if p.dim() > 1 or ignore is None]
        pca = L.pca_directions(traj, keys, n_components=n, origin=run.state)
        _write_pca(pca, out / f"{_stem(args, run)}_pca.json")
        run.pca = pca
        return pca.directions, None
    dirs, evals = L.hessian_directions(
        run.model, loss_fn, run.data, k=n, seed=args.seed, tol=1e-3, progress=args.progress
    )
    print(f"saf surface: top Hessian eigenvalues {np.round(evals, 6).tolist()}", file=sys.stderr)
    return dirs, None


def _write_pca(pca, path: Path) -> None:
    atomic_write_json(
        path,
        {
            "explained_variance_ratio": pca.explained_variance_ratio.tolist(),
            "coords": pca.coords.tolist(),
            "residuals": pca.residuals.tolist(),
        },
    )


def run(args) -> int:
    """Compute (or resume) the surfaces, then plot them."""
    if args.directions == "interpolate" and args.compare and len(args.compare) != args.dim:
        raise UsageError(f"--directions interpolate --dim {args.dim} takes {args.dim} --compare")
    ys = args.grid if args.grid_y is None else args.grid_y
    points = len(args.grid) * (len(ys) if args.dim == 2 else 1)
    if points > MAX_GRID:
        raise UsageError(
            f"a grid of {points:,} points is more than {MAX_GRID:,} (each point is a pass over "
            "the data); use fewer points per axis, e.g. --grid -1:1:101"
        )
    loss_fn = resolve_loss(args.loss, args.ignore_index)
    main = _Source(args.target, args.epoch, args, is_main=True)
    others = [_Source(c, None, args, is_main=False) for c in args.compare]
    for src in [main, *others]:  # the loss against the data, before anything is written
        first = split(next(iter(src.data)))
        with torch.no_grad():
            try:
                out = forward(src.model, to(first[0], args.device))
            except Exception as e:  # shapes, dtypes, a forward of the caller's own
                why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise UsageError(f"{src.name}: the model does not run on the data: {why}") from None
            check_loss(loss_fn, out, to(first[1], args.device))
            if not math.isfinite(float(loss_fn(out, to(first[1], args.device)))):
                raise UsageError(
                    f"{src.name}: the loss is not finite on the first batch of the data, so "
                    "the surface has no value to draw (a diverged checkpoint?)"
                )
    _check_name_lengths(args, [main, *others])
    out = writable_dir(args.out)
    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 holds it
    with exclusive(out / ".lock", str(out)) if rank0 else contextlib.nullcontext():
        return _draw(args, main, others, loss_fn, ys, out)  # one writer per output folder


def _draw(args, main: _Source, others: list[_Source], loss_fn, ys, out: Path) -> int:
    """Compute (or resume) the surfaces into ``out``, then plot them."""
    rank, _ = init_from_env(args.device)
    group = [main] if args.directions == "interpolate" else [main, *others]
    surfaces = []
    for r in group:
        rdata = r.data
        dirs, origin = _directions(args, r, others, loss_fn, out)
        kw = {"origin": origin, "path": out / f"{_stem(args, r)}.npz", "metadata": _meta(args, r),
              "device": args.device, "progress": args.progress,
              "target_se": args.target_se}  # fmt: skip
        if args.dim == 1:
            s = L.surface_1d(r.model, loss_fn, rdata, dirs[0], args.grid, **kw)
        else:
            s = L.surface_2d(r.model, loss_fn, rdata, tuple(dirs), args.grid, ys, **kw)
        surfaces.append(s)
    if rank == 0 and args.plots:
        _plots(args, group, surfaces, out)
    if rank == 0:
        print(
            json.dumps({_stem(args, r): _summary(s) for r, s in zip(group, surfaces, strict=True)})
        )
    return EXIT_OK


def _stem(args, r: _Source) -> str:
    """``NAME_e<epoch>_<directions>_<dim>d``; ``_step<N>`` for a checkpoint whose name gives a
    step but no epoch (a Trainer ``checkpoint-N/``); neither for one that gives neither."""
    step = checkpoint_step(r.ckpt) if r.epoch is None else None
    at = f"e{r.epoch}_" if r.epoch is not None else f"step{step}_" if step is not None else ""
    return f"{r.name}_{at}{args.directions}_{args.dim}d"


def _check_name_lengths(args, sources: list[_Source]) -> None:
    """Every file this run will write has a name the file system takes (its temporary
    sibling ``.NAME.XXXXXXXX.tmp`` included), checked before any work."""
    try:
        limit = os.pathconf(Path(args.out).resolve().parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    longest = max(len(f".{_stem(args, r)}_trajectory_heatmap.html.XXXXXXXX.tmp") for r in sources)
    if longest > limit:
        raise UsageError(
            f"the output names of {sources[0].name[:40]}... would be {longest} characters, more "
            f"than the {limit} the file system takes; rename or link the run to a shorter name"
        )


def _meta(args, r: _Source) -> dict:
    return {
        "label": r.name,
        "run_dir": str(r.dir),
        "checkpoint": str(r.ckpt),
        "epoch": r.epoch,
        "directions": args.directions,
        "norm": args.norm,
        "ignore": args.ignore,
        "seed": args.seed,
        "split": args.split,
        "n_samples": args.n_samples,
        "loss": args.loss,
        "compare": [str(c) for c in args.compare] if args.directions == "interpolate" else [],
    }


def _finite(v) -> float | None:
    return float(v) if math.isfinite(v) else None


def _summary(s) -> dict:
    i = np.unravel_index(np.nanargmin(s.loss), s.loss.shape)
    centre = tuple(int(np.argmin(np.abs(c))) for c in s.coords)
    return {
        "min_loss": float(s.loss[i]),
        "argmin": [float(c[j]) for c, j in zip(s.coords, i, strict=True)],
        "centre_loss": float(s.loss[centre]),
        "centre_loss_se": _finite(s.loss_se[centre]),  # None: the loss has no per-sample form
        "max_loss_se": _finite(np.nanmax(s.loss_se)) if np.isfinite(s.loss_se).any() else None,
        "max_loss": float(np.nanmax(s.loss)),
        "mean_samples": _finite(np.nanmean(s.samples)),
    }


def _plots(args, group: list[_Source], surfaces: list, out: Path) -> None:
    labels = [r.name for r in group]
    base = out / ("compare" if len(group) > 1 else _stem(args, group[0]))
    if args.dim == 1:
        L.plot_1d(surfaces, labels, path=f"{base}_line", log=args.log, accuracy=True)
    else:
        for kind in ("contour", "filled", "heatmap", "3d"):
            L.plot_2d(surfaces, kind, labels, path=f"{base}_{kind}", log=args.log)
        for r, s in zip(group, surfaces, strict=True):
            if r.pca is not None:
                L.plot_trajectory(r.pca, s, path=out / f"{_stem(args, r)}_trajectory", log=args.log)
    L.write_html(surfaces, f"{base}.html", labels, log=args.log)
