"""2D loss-surface speed, side by side in one process on the same model, data and grid.

Rows (each the median of ``--reps`` interleaved repetitions):

* ``limit``: one plain inference pass (eval mode, ``torch.inference_mode``, unfused)
  times the number of grid points: what a loop of passes costs at best.
* ``loss-landscapes``: ``loss_landscapes.random_plane`` as its README calls it (optional:
  ``pip install loss-landscapes``; the row is skipped when missing).
* ``landscape (plain)``: ``landscape.surface_2d(..., fast=False)``.
* ``landscape``: ``landscape.surface_2d`` as shipped (BatchNorm folded into the convolutions,
  channels-last inputs, inference mode).
* ``landscape (target_se)``: the same with ``target_se`` (``--target-se``, default 0.05) on the
  same samples cut into batches of 32: each point stops at the first 2, 4, ... batches whose
  loss has that standard error; the mean share of the samples used is printed.

Ratios are printed as ``loss-landscapes / landscape`` and ``limit / landscape`` (> 1 means
this package is faster). Run: ``python benchmarks/surface.py [--steps 7] [--reps 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import landscape as L
from analysis import atomic_write_json
from saf import build_model


def build(args):
    torch.manual_seed(0)
    model = build_model(args.model, 10, (3, args.size, args.size), width=args.width)
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics, non-zero biases (as trained)
        for _ in range(3):
            model(torch.randn(64, 3, args.size, args.size))
        for p in model.parameters():
            # loss-landscapes divides by each bias element's norm: a zero bias (BatchNorm's
            # init) raises ZeroDivisionError there, so start from a "trained-like" point.
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    return model, x, y


def run_limit(model, x, y, n_points: int) -> float:
    with torch.inference_mode():
        F.cross_entropy(model(x), y)  # warm-up
        t = time.perf_counter()
        for _ in range(n_points):  # as long as the others, so it sees the same load
            F.cross_entropy(model(x), y).item()
        return time.perf_counter() - t


def run_loss_landscapes(model, x, y, steps: int) -> float | None:
    try:
        import loss_landscapes
        import loss_landscapes.metrics
    except ImportError:
        return None
    metric = loss_landscapes.metrics.Loss(F.cross_entropy, x, y)
    t = time.perf_counter()
    loss_landscapes.random_plane(model, metric, distance=1, steps=steps, normalization="filter",
                                 deepcopy_model=True)  # fmt: skip
    return time.perf_counter() - t


def run_landscape(model, x, y, steps: int, fast: bool, target_se=None, share=None) -> float:
    dirs = (L.random_direction(model, index=0), L.random_direction(model, index=1))
    grid = np.linspace(-1, 1, steps)
    data = [(x, y)] if target_se is None else list(zip(x.split(32), y.split(32), strict=True))
    t = time.perf_counter()
    s = L.surface_2d(model, F.cross_entropy, data, dirs, grid, grid, fast=fast, progress=False,
                     target_se=target_se)  # fmt: skip
    if share is not None:
        share.append(float(s.samples.mean() / len(y)))
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet_small", help="a saf.models name (resnet_small)")
    p.add_argument("--width", type=int, default=16, help="model width (16)")
    p.add_argument("--size", type=int, default=32, help="image side (32, CIFAR-sized)")
    p.add_argument("--batch", type=int, default=256, help="samples per grid point (256)")
    p.add_argument("--steps", type=int, default=7, help="grid side: steps x steps points (7)")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--target-se", type=float, default=0.05, help="target_se row (0.05)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (loss-landscapes: CPU only)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, x, y = build(args)
    model, x, y = model.to(args.device), x.to(args.device), y.to(args.device)
    cuda = torch.device(args.device).type == "cuda"

    def synced(fn, *a):  # a CUDA row's time includes its queued kernels
        out = fn(*a)
        if cuda:
            torch.cuda.synchronize()
        return out

    n = args.steps**2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows: dict[str, list[float]] = {}
    share: list[float] = []
    for rep in range(args.reps):
        print(f"rep {rep + 1}/{args.reps}", file=sys.stderr)
        times = {
            "limit": synced(run_limit, model, x, y, n),
            "loss-landscapes": None if cuda else run_loss_landscapes(model, x, y, args.steps),
            "landscape (plain)": synced(run_landscape, model, x, y, args.steps, False),
            "landscape": synced(run_landscape, model, x, y, args.steps, True),
            "landscape (target_se)": synced(
                run_landscape, model, x, y, args.steps, True, args.target_se, share
            ),
        }
        for k, v in times.items():
            if v is not None:
                rows.setdefault(k, []).append(v)
    unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    med = {k: statistics.median(v) for k, v in rows.items()}
    ours = med["landscape"]
    print(f"{args.model} width {args.width}, {args.batch} x 3x{args.size}x{args.size}, "
          f"{args.steps}x{args.steps} grid, {torch.get_num_threads()} threads, "
          f"median of {args.reps}")  # fmt: skip
    print(f"{'method':<20} {'seconds':>9} {'ms/point':>9} {'ratio vs landscape':>19}")
    for k, v in med.items():
        print(f"{k:<20} {v:9.2f} {1000 * v / n:9.1f} {v / ours:18.2f}x")
    if "loss-landscapes" not in med:
        print("loss-landscapes: not installed (pip install loss-landscapes); row skipped")
    print(f"target_se {args.target_se}: mean share of the samples used {share[0]:.2f}")
    print(f"model state unchanged by landscape: {unchanged}")
    if args.json:
        atomic_write_json(args.json, {"args": vars(args) | {"json": str(args.json)},
                                      "seconds": rows, "median": med})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
