"""Hessian-vector products over a whole run directory: warm-started Lanczos against cold.

Trains ``resnet_small`` (the toolkit's BatchNorm CNN) with SGD on the real *digits* data
(``saf train``, one checkpoint per epoch), then measures ``lambda_max`` (tol 1e-4) of every
checkpoint twice with :func:`analysis.analyze_run` on the same 512 training samples: cold
(a random start vector per checkpoint) and ``warm_start=True`` (each checkpoint starts from
the previous one's Ritz vector). Reports the products of each, their ratio, the wall-time
ratio and the largest relative difference between the two tables (both meet the same
residual bound, so it stays within about the tolerance).

Usage::

    python benchmarks/warm_start.py [--epochs 20] [--run RUN_DIR] [--threads 1]
                                    [--tol 1e-4] [--out results.json]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from analysis import AnalysisSettings, analyze_run, atomic_write_json
from saf import data_batches, model_from_run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20, help="epochs to train (one checkpoint each)")
    p.add_argument("--run", type=Path, default=None, help="an existing run directory instead")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--out", type=Path, default=None, help="write the numbers as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or Path(tmp) / "sgd"
        if args.run is None:
            cmd = [sys.executable, "-m", "cli", "train", "--method", "sgd", "--model",
                   "resnet_small", "--epochs", str(args.epochs), "--out", str(run),
                   "--no-progress", "--threads", str(args.threads)]  # fmt: skip
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        data = data_batches("digits", "train", 128, args.samples)
        rows = {}
        for name, warm in (("cold", False), ("warm", True)):
            t0 = time.perf_counter()
            df = analyze_run(
                run, ["lambda_max"], model_factory=lambda: model_from_run(run), data=data,
                settings=AnalysisSettings(tol=args.tol, warm_start=warm), out=False,
                progress=False,
            )  # fmt: skip
            rows[name] = (df, time.perf_counter() - t0)
    (cold, t_cold), (warm, t_warm) = rows["cold"], rows["warm"]
    diff = float(((warm.value - cold.value).abs() / cold.value.abs()).max())
    res = {
        "checkpoints": len(cold),
        "tol": args.tol,
        "hvps_cold": int(cold.matvecs.sum()),
        "hvps_warm": int(warm.matvecs.sum()),
        "hvp_ratio": float(warm.matvecs.sum() / cold.matvecs.sum()),
        "hvp_ratio_second_half": float(
            warm.matvecs[len(warm) // 2 :].sum() / cold.matvecs[len(cold) // 2 :].sum()
        ),
        "wall_ratio": t_warm / t_cold,
        "max_rel_diff": diff,
    }
    print(f"{res['checkpoints']} checkpoints, lambda_max to tol {args.tol}:")
    print(
        f"  HVPs cold {res['hvps_cold']}, warm {res['hvps_warm']}: warm/cold "
        f"{res['hvp_ratio']:.2f} (second half of the run {res['hvp_ratio_second_half']:.2f}); "
        f"wall warm/cold {res['wall_ratio']:.2f}"
    )
    print(f"  largest relative difference warm vs cold: {diff:.1e}")
    if args.out:
        atomic_write_json(args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
