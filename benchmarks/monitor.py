"""The cost of :class:`analysis.SharpnessMonitor` in a training loop, and warm against cold.

resnet18 (``saf.build_model("resnet18", 10, (3, 32, 32))``) trained by SGD (lr 0.05,
momentum 0.9) on CIFAR-shaped batches of 128 (synthetic tensors: no CIFAR data on the
machine); the monitor measures ``lambda_max`` (tol 1e-3, Hessian, eval-mode BatchNorm)
on a fixed 256-sample probe at step 0 (a cold start) and every ``--every`` steps after
(warm-started from the previous Ritz vector). At the last measured step a second, cold
monitor measures the same weights, so warm and cold products are compared side by side.

Reported, all from one process: the median training step, the seconds and products of
each measurement, and the overhead ``measurement seconds / (every x step seconds)`` of
the warm measurements: the share of training time the monitor adds.

Usage::

    python benchmarks/monitor.py [--steps 100] [--every 50] [--threads 2] [--json out.json]
    python benchmarks/monitor.py --model resnet_small --steps 150 --threads 2
    python benchmarks/monitor.py --quick          # an mlp on 8x8 inputs, 4 steps
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from analysis import SharpnessMonitor, atomic_write_json
from saf import build_model


def _data(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def run(model_name: str, size: int, batch: int, probe: int, steps: int, every: int,
        tol: float, max_iter: int | None = None, device: str = "cpu") -> dict:  # fmt: skip
    """Train ``steps`` steps with the monitor; return the timings and products."""
    torch.manual_seed(0)
    model = build_model(model_name, 10, (3, size, size)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    X, Y = (t.to(device) for t in _data(probe, size, 1))
    probe_batches = [(X[i : i + batch], Y[i : i + batch]) for i in range(0, probe, batch)]
    monitor = SharpnessMonitor(model, F.cross_entropy, probe_batches, every, optimizer=opt, tol=tol,
                               warm_max_iter=max_iter)  # fmt: skip
    step_s = []
    _report(monitor(0))  # cold: no previous vectors
    for step in range(1, steps + 1):
        x, y = (t.to(device) for t in _data(batch, size, 100 + step))
        model.train()
        _sync(device)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        _sync(device)
        step_s.append(time.perf_counter() - t)
        _report(monitor(step))
    cold = SharpnessMonitor(model, F.cross_entropy, probe_batches, every, warm=False, tol=tol)
    last = cold.measure(monitor.rows[-1]["step"])
    return _summary(monitor.rows, last, statistics.median(step_s), every)


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _report(row: dict | None) -> None:
    if row is not None:
        print(f"step {row['step']:>5}: lambda_1 {row['lambda_1']:.4g}, {row['lambda_matvecs']} "
              f"products, {row['seconds']:.1f} s", flush=True)  # fmt: skip


def _summary(rows: list[dict], cold_last: dict, step_s: float, every: int) -> dict:
    warm = rows[1:]
    overhead = [r["seconds"] / (every * step_s) for r in warm]
    return {
        "step_seconds": step_s,
        "measurements": [
            {
                k: r[k]
                for k in ("step", "lambda_1", "lambda_matvecs", "matvecs", "seconds", "threshold")
            }
            for r in rows
        ],  # fmt: skip
        "cold_at_last_step": {k: cold_last[k] for k in ("lambda_1", "lambda_matvecs", "seconds")},
        "first_cold_matvecs": rows[0]["lambda_matvecs"],
        "warm_matvecs": [r["lambda_matvecs"] for r in warm],
        "overhead": overhead,
        "cold_overhead_at_last_step": cold_last["seconds"] / (every * step_s),
        "last_relative_error": rows[-1]["lambda_1"] / cold_last["lambda_1"] - 1,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=32, help="image side (default: 32, CIFAR-shaped)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--probe", type=int, default=256, help="probe samples (default: 256)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument(
        "--max-iter",
        type=int,
        default=None,
        help="products per warm measurement at most (a budget; default: until tol)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="an mlp on 8x8 inputs, 4 steps")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        res = run("mlp", 8, 16, 32, 4, 2, a.tol)
    else:
        res = run(a.model, a.size, a.batch, a.probe, a.steps, a.every, a.tol, a.max_iter, a.device)
    print(f"training step (median): {res['step_seconds']:.3f} s")
    for m in res["measurements"]:
        print(
            f"step {m['step']:>5}: lambda_1 {m['lambda_1']:.4g} (threshold {m['threshold']:.4g}), "
            f"{m['lambda_matvecs']} products for lambda ({m['matvecs']} in all), "
            f"{m['seconds']:.2f} s"
        )
    c = res["cold_at_last_step"]
    print(
        f"cold at the last step: {c['lambda_matvecs']} products, {c['seconds']:.2f} s, "
        f"lambda_1 {c['lambda_1']:.4g}"
    )
    print(f"last warm lambda_1 / cold lambda_1 - 1: {res['last_relative_error']:+.2e}")
    print("warm overhead per interval: " + ", ".join(f"{o:.3f}" for o in res["overhead"])
          + f"; cold would be {res['cold_overhead_at_last_step']:.3f}")  # fmt: skip
    if a.json:
        atomic_write_json(a.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
