"""Hessian-vector products over a whole run directory: warm-started Lanczos against cold.

Trains ``resnet_small`` (the toolkit's BatchNorm CNN) with SGD on the real *digits* data
(``saf train``, one checkpoint per epoch), then measures ``lambda_max`` (tol 1e-4) of every
checkpoint twice with :func:`analysis.analyze_run` on the same 512 training samples: cold
(a random start vector per checkpoint) and ``warm_start=True`` (each checkpoint starts from
the previous one's Ritz vector). Reports the products of each, their ratio, the wall-time
ratio and the largest relative difference between the two tables (both meet the same
residual bound, so it stays within about the tolerance).

``--starts`` asks instead how good a start vector can be: per checkpoint, the overlap
:math:`|u_{t-1}^\top u_t|` of consecutive top eigenvectors (from 40 Lanczos steps), the
share of :math:`u_t` in the span of the previous top 8, and the products each start
needs at ``--tol``: cold, :func:`analysis.warm_start_vector` (the default warm start),
the previous eigenvector alone, its linear extrapolation :math:`2u_{t-1} - u_{t-2}`, and
the sum of the previous top 4 weighted by :math:`(\theta_i/\theta_1)^4`.

Usage::

    python benchmarks/warm_start.py [--epochs 20] [--run RUN_DIR] [--threads 1]
                                    [--tol 1e-4] [--starts] [--out results.json]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

from analysis import (
    AnalysisSettings,
    HessianOperator,
    analyze_run,
    atomic_write_json,
    find_checkpoints,
    lanczos,
    load_checkpoint,
    loss_function,
    warm_start_vector,
)
from saf import data_batches, model_from_run

STARTS = ("cold", "warm_start_vector", "previous", "extrapolated", "top4_weighted")


def compare_starts(run: Path, data, tol: float) -> dict:
    """Products per start vector on every checkpoint of ``run`` (see the module docstring)."""
    ce = loss_function("ce")
    counts = {name: 0 for name in STARTS}
    overlaps, spans, old, misses = [], [], [], 0  # old: the last two (values, vectors)
    for _, path in find_checkpoints(run):
        H = HessianOperator(load_checkpoint(model_from_run(run), path), ce, data, cache="auto")
        ref = lanczos(H, 8, tol=1e-8, max_iter=40)
        if old:
            (t1, Y1), (_, Y2) = old[-1], old[-2] if len(old) > 1 else old[-1]
            u = ref.vectors[0].double()
            overlaps.append(float((Y1[0].double() @ u).abs()))
            spans.append(float((torch.linalg.qr(Y1.double().T)[0].T @ u).norm()))
            sign = torch.sign(Y1[0] @ Y2[0])
            w = (t1[:4] / t1[0]) ** 4
            starts = {
                "cold": None,
                "warm_start_vector": warm_start_vector(Y1[:1]),
                "previous": Y1[0],
                "extrapolated": 2 * Y1[0] - sign * Y2[0],
                "top4_weighted": (w[:, None].to(Y1) * Y1[:4]).sum(0),
            }
            for name, v0 in starts.items():
                r = lanczos(H, 1, tol=tol, v0=v0)
                err = abs(float(r.values[0] - ref.values[0])) / float(ref.values[0])
                misses += not r.converged or err > 2 * tol
                counts[name] += r.n_matvecs
        old = [*old[-1:], (ref.values, ref.vectors)]
    print(f"{len(overlaps)} checkpoint pairs, lambda_max to tol {tol}: products per start")
    for name in STARTS:
        print(f"  {name:18s} {counts[name]:5d}  ({counts[name] / counts['cold']:.2f} of cold)")
    late = overlaps[len(overlaps) // 2 :]
    print(
        f"  overlap with the previous top eigenvector: median {median(overlaps):.4f} "
        f"(second half {median(late):.4f}); share in the previous top-8 span: median "
        f"{median(spans):.4f}; starts off by more than 2 tol: {misses}"
    )
    return {"checkpoint_pairs": len(overlaps), "tol": tol, "hvps": counts,
            "overlaps": overlaps, "top8_span": spans, "misses": misses}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20, help="epochs to train (one checkpoint each)")
    p.add_argument("--run", type=Path, default=None, help="an existing run directory instead")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--starts", action="store_true", help="compare start vectors instead")
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
        if args.starts:
            res = compare_starts(run, data, args.tol)
            if args.out:
                atomic_write_json(args.out, res)
            return 0
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
