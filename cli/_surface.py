"""``saf surface``: 1D/2D loss surfaces of a run (or one of its checkpoints), with plots.

Directions: ``random`` (Gaussian, filter-normalized, biases/BN ignored; the same draw for
every compared run), ``interpolate`` (between checkpoints), ``pca`` (of the run's
checkpoint trajectory) or ``hessian`` (top eigenvectors). Surfaces are resumable: rerun
the same command after an interruption and only the missing points are evaluated.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch.nn.functional as F

import landscape as L
from analysis import atomic_write_json, load_checkpoint, load_state_dict
from analysis.distributed import init_from_env
from cli._common import (
    EXIT_OK,
    UsageError,
    device,
    existing_dir,
    existing_path,
    nonneg_int,
    positive_int,
    writable_dir,
)
from saf import data_batches, is_run_dir, list_checkpoints, model_from_run, read_run

DIRECTIONS = ("random", "interpolate", "pca", "hessian")
MAX_POINTS = 10_001

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
    a("target", type=existing_path, metavar="RUN_DIR|CHECKPOINT", help="run or checkpoint")
    a("--dim", type=int, choices=(1, 2), default=2, help="1D line or 2D plane (default: 2)")
    a("--grid", type=grid_spec, default=grid_spec("-1:1:21"), help="START:STOP:N (-1:1:21)")
    a("--grid-y", type=grid_spec, default=None, help="second axis (default: same as --grid)")
    a("--compare", type=existing_dir, nargs="+", default=[], metavar="RUN_DIR",
      help="more runs: side-by-side panels (or interpolation end points)")  # fmt: skip
    a("--directions", choices=DIRECTIONS, default="random", help="direction kind (random)")
    a("--norm", choices=("filter", "layer", "model", "none"), default="filter")
    a("--ignore", choices=("biasbn", "none"), default="biasbn", help="1-D tensors (biasbn)")
    a("--epoch", type=nonneg_int, default=None, help="checkpoint epoch (default: last)")
    a("--split", choices=("train", "test"), default="train", help="data split (train)")
    a("--n-samples", type=positive_int, default=None, help="class-balanced subset size")
    a("--batch-size", type=positive_int, default=512, help="evaluation batch size (512)")
    a("--data-dir", type=existing_dir, default=None, help="CIFAR folder (default: run's)")
    a("--seed", type=nonneg_int, default=0, help="seed of the random directions (0)")
    a("--device", type=device, default="cpu", help="cpu, cuda, cuda:N or auto (cpu)")
    a("--log", action=argparse.BooleanOptionalAction, default=False, help="log10 loss plots")
    a("--plots", action=argparse.BooleanOptionalAction, default=True, help="write plots")
    a("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    a("--out", required=True, help="output folder")
    p.set_defaults(run=run)


def _resolve(target: Path, epoch: int | None) -> tuple[Path, Path, int]:
    """``(run_dir, checkpoint, epoch)`` of a run directory or a checkpoint file."""
    if target.is_file():
        run_dir = next((p for p in target.parents[:2] if is_run_dir(p)), None)
        if run_dir is None:
            raise UsageError(f"{target}: a checkpoint must sit inside a run directory (run.json)")
        if epoch is not None:
            raise UsageError("give either a CHECKPOINT or --epoch, not both")
        ckpts = {p.resolve(): e for e, p in list_checkpoints(run_dir)}
        return run_dir, target, ckpts.get(target.resolve(), -1)
    if not is_run_dir(target):
        raise UsageError(f"{target}: not a run directory of `saf train` (no run.json)")
    ckpts = list_checkpoints(target)
    if not ckpts:
        raise UsageError(f"{target}: no checkpoints yet")
    if epoch is None:
        return target, ckpts[-1][1], ckpts[-1][0]
    found = dict(ckpts)
    if epoch not in found:
        raise UsageError(f"{target}: no checkpoint for epoch {epoch} (have {sorted(found)})")
    return target, found[epoch], epoch


class _Run:
    """A run's model (weights loaded from one checkpoint) and its settings."""

    def __init__(self, target: Path, epoch: int | None, dev: str):
        self.dir, self.ckpt, self.epoch = _resolve(target, epoch)
        self.info = read_run(self.dir)
        self.model = load_checkpoint(model_from_run(self.info), self.ckpt)
        self.state = self.model.state_dict()
        for k, t in self.state.items():  # load_state_dict keeps NaN
            if t.is_floating_point() and not bool(t.isfinite().all()):
                raise UsageError(f"{self.ckpt}: {k} has NaN/Inf weights; no surface to compute")
        self.model.to(dev).eval()
        self.name = self.dir.resolve().name
        self.pca = None


def _data(run: _Run, args):
    d = run.info["data"]
    data_dir = args.data_dir if args.data_dir is not None else d.get("data_dir")
    return data_batches(d["name"], args.split, args.batch_size, args.n_samples, data_dir,
                        args.device)  # fmt: skip


def _checkpoints(run: _Run, k: int) -> list[dict]:
    ckpts = [p for e, p in list_checkpoints(run.dir) if e <= run.epoch or run.epoch < 0]
    if len(ckpts) < k:
        raise UsageError(f"{run.dir}: needs at least {k} checkpoints, has {len(ckpts)}")
    picks = [ckpts[round(i * (len(ckpts) - 1) / (k - 1))] for i in range(k)]
    return [load_state_dict(p) for p in picks]


def _directions(args, run: _Run, others: list[_Run], data, out: Path) -> tuple[list, dict | None]:
    """``(directions, origin)`` for ``run``; for PCA also writes ``*_pca.json`` and sets
    ``run.pca``."""
    n, ignore = args.dim, None if args.ignore == "none" else args.ignore
    if args.directions == "random":
        seeds = [args.seed + i for i in range(n)]
        return [L.random_direction(run.model, args.norm, ignore, s) for s in seeds], None
    if args.directions == "interpolate":
        states = [run.state, *(o.state for o in others)]
        if len(states) == 1:
            states = _checkpoints(run, n + 1)
        if len(states) != n + 1:
            raise UsageError(f"--directions interpolate --dim {n} needs {n} --compare run(s)")
        return L.interpolation_directions(*states), states[0]
    if args.directions == "pca":
        traj = _all_checkpoints(run)
        keys = [k for k, p in run.model.named_parameters() if p.dim() > 1 or ignore is None]
        pca = L.pca_directions(traj, keys, n_components=n, origin=run.state)
        _write_pca(pca, out / f"{_stem(args, run)}_pca.json")
        run.pca = pca
        return pca.directions, None
    dirs, evals = L.hessian_directions(
        run.model, F.cross_entropy, data, k=n, seed=args.seed, tol=1e-3, progress=args.progress
    )
    print(f"saf surface: top Hessian eigenvalues {np.round(evals, 6).tolist()}", file=sys.stderr)
    return dirs, None


def _all_checkpoints(run: _Run) -> list[dict]:
    paths = [p for e, p in list_checkpoints(run.dir) if run.epoch < 0 or e <= run.epoch]
    if len(paths) < 3:
        raise UsageError(f"{run.dir}: PCA needs at least 3 checkpoints, has {len(paths)}")
    return [load_state_dict(p) for p in paths]


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
    main = _Run(args.target, args.epoch, args.device)
    others = [_Run(c, None, args.device) for c in args.compare]
    data = _data(main, args)
    out = writable_dir(args.out)
    rank, _ = init_from_env(args.device)
    group = [main] if args.directions == "interpolate" else [main, *others]
    surfaces = []
    for r in group:
        rdata = data if r is main else _data(r, args)
        dirs, origin = _directions(args, r, others, rdata, out)
        kw = {"origin": origin, "path": out / f"{_stem(args, r)}.npz", "metadata": _meta(args, r),
              "device": args.device, "progress": args.progress}  # fmt: skip
        if args.dim == 1:
            s = L.surface_1d(r.model, F.cross_entropy, rdata, dirs[0], args.grid, **kw)
        else:
            s = L.surface_2d(r.model, F.cross_entropy, rdata, tuple(dirs), args.grid, ys, **kw)
        surfaces.append(s)
    if rank == 0 and args.plots:
        _plots(args, group, surfaces, out)
    if rank == 0:
        print(
            json.dumps({_stem(args, r): _summary(s) for r, s in zip(group, surfaces, strict=True)})
        )
    return EXIT_OK


def _stem(args, r: _Run) -> str:
    return f"{r.name}_e{r.epoch}_{args.directions}_{args.dim}d"


def _meta(args, r: _Run) -> dict:
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
        "compare": [str(c) for c in args.compare] if args.directions == "interpolate" else [],
    }


def _summary(s) -> dict:
    i = np.unravel_index(np.nanargmin(s.loss), s.loss.shape)
    centre = tuple(int(np.argmin(np.abs(c))) for c in s.coords)
    return {
        "min_loss": float(s.loss[i]),
        "argmin": [float(c[j]) for c, j in zip(s.coords, i, strict=True)],
        "centre_loss": float(s.loss[centre]),
        "max_loss": float(np.nanmax(s.loss)),
    }


def _plots(args, group: list[_Run], surfaces: list, out: Path) -> None:
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
