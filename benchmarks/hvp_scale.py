"""One Hessian-vector product at scale against one training step: time and peak memory.

resnet18 (11.2M parameters) on 128 CIFAR-shaped 32×32 images (synthetic tensors: no CIFAR
data on the machine), eval-mode BatchNorm for the HVP as ``analysis`` uses it. Each row runs
in its own process, so its peak resident memory is its own:

* ``step``: one SGD training step (forward, backward, update);
* ``hvp``: ``HessianOperator(..., cache=False).matvec`` (double backward each product);
* ``hvp cached``: ``cache=True`` (the first-order graph kept; a product is one backward
  through it). The first product, which builds the graph, is timed apart as ``build``;
* ``hvp cached, unfolded``: the same with ``fold=False`` (BatchNorm run as it is, not
  folded into the convolutions).

Time is the median of ``--reps`` after one warm-up; memory is the process's peak RSS above
its RSS before the first operation (model and data loaded), or on CUDA (``--device cuda``)
the allocator's peak above what model and data hold. Ratios are to ``step``.

Usage::

    python benchmarks/hvp_scale.py [--model resnet18] [--batch 128] [--size 32] [--reps 3]
                                   [--threads 2] [--device cpu] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from analysis import HessianOperator, atomic_write_json
from saf import build_model


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> dict:
    """Run one row in this process; return its times and memory."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = build_model(args.model, 10, (3, args.size, args.size)).to(dev)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(dev)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(dev)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev) / 2**20 if cuda else _rss_mb()

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    times, build = [], None
    if args.row == "step":
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        model.train()

        def op():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
    else:
        model.eval()
        cached, fold = args.row.startswith("hvp cached"), not args.row.endswith("unfolded")
        H = HessianOperator(model, F.cross_entropy, [(x, y)], cache=cached, fold=fold)
        v = torch.randn(H.n_params, generator=g).to(dev)
        if cached:
            t = time.perf_counter()
            H.matvec(v)  # builds the graph
            sync()
            build = time.perf_counter() - t

        def op():
            H.matvec(v)

    op()  # warm-up
    for _ in range(args.reps):
        sync()
        t = time.perf_counter()
        op()
        sync()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else _peak_mb()
    return {"row": args.row, "seconds": statistics.median(times), "build_s": build,
            "peak_mb": peak - base}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda (memory: allocator peak)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # the child's row
    args = p.parse_args(argv)
    if args.row:
        print(json.dumps(child(args)))
        return 0
    rows = {}
    for row in ("step", "hvp", "hvp cached", "hvp cached, unfolded"):
        cmd = [sys.executable, __file__, "--row", row, *(argv or sys.argv[1:])]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows[row] = json.loads(out.strip().splitlines()[-1])
    step = rows["step"]
    print(f"{args.model}, {args.batch} x 3x{args.size}x{args.size}, {args.device}, "
          f"{args.threads} threads, median of {args.reps}")  # fmt: skip
    print(f"{'row':<21} {'seconds':>8} {'x step':>7} {'peak MB':>8} {'x step':>7}")
    for r in rows.values():
        built = f"   (building the graph: {r['build_s']:.2f} s)" if r["build_s"] else ""
        print(f"{r['row']:<21} {r['seconds']:8.2f} {r['seconds'] / step['seconds']:7.2f} "
              f"{r['peak_mb']:8.0f} {r['peak_mb'] / step['peak_mb']:7.2f}{built}")  # fmt: skip
    if args.out:
        atomic_write_json(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
