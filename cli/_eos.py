"""``saf eos``: the edge-of-stability reference study (Cohen et al. 2021, scaled down)."""

from __future__ import annotations

import argparse

import torch

from cli._common import device, writable_dir
from figures import edge_of_stability


def add_parser(subparsers) -> None:
    """Register ``saf eos``."""
    p = subparsers.add_parser(
        "eos",
        help="progressive sharpening and the edge of stability under full-batch GD and SAM",
        description="Train a tanh MLP on 1,000 digits with full-batch gradient descent at "
        "several learning rates, SAM and cross-entropy, measuring lambda_max every 20 steps "
        "against 2/lr (SAM: its edge); write OUT/eos.csv, OUT/tables/eos_summary.csv, "
        "OUT/figures/edge_of_stability.png and OUT/findings.md (about 5 minutes on CPU).",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds; for tests)")
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress lines"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the study; print where the findings are."""
    out = writable_dir(args.out)
    torch.set_num_threads(1)  # full batches of 1,000 x 64: one thread is as fast, and repeatable
    findings = edge_of_stability(out, args.quick, args.device, args.progress)
    print(findings)
    return 0
