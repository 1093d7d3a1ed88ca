r"""Progressive sharpening and the edge of stability, reproduced small (``saf eos``).

Full-batch gradient descent with step :math:`\eta` on a network's training loss is stable on
the local quadratic model only while the sharpness :math:`\lambda_{\max}(\nabla^2 L) < 2/\eta`.
Cohen et al. (2021) observe that in practice the sharpness first *rises* during training
(progressive sharpening) until it reaches :math:`2/\eta`, then *hovers* just above it while
the loss keeps falling, non-monotonically (the edge of stability). Long & Bartlett (2024)
find the same for full-batch SAM against its own, lower edge
(:func:`analysis.sam_edge`, which depends on :math:`\|\nabla L\|`, :math:`\rho` and
:math:`\eta`).

This study repeats the setting at a scale that runs on two CPU cores in minutes: 1,000
digits (8x8, :func:`saf.load_dataset`), a tanh MLP of two hidden layers of width 200, the
square loss :math:`\tfrac12\|f(x) - e_y\|^2` on one-hot targets (averaged over examples),
gradient descent at several :math:`\eta`, SAM (:math:`\rho = 0.05`, gradient descent base)
and, as the counter-example, cross-entropy. :class:`analysis.SharpnessMonitor` measures
:math:`\lambda_{\max}` on the whole training set every few steps, beside the optimizer's
threshold.

References: Cohen, Kaur, Li, Kolter & Talwalkar, "Gradient descent on neural networks
typically occurs at the edge of stability", ICLR 2021; Long & Bartlett, "Sharpness-aware
minimization and the edge of stability", JMLR 2024 (arXiv:2309.12488).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from analysis import SharpnessMonitor
from analysis.io import atomic_write_text
from analysis.rng import stream_seed
from figures._save import plt, save_figure, save_table
from saf import SAM, load_dataset

REACHED = 0.9  # "at the edge" from lambda_max >= 90% of the threshold on


@dataclass(frozen=True)
class EosRun:
    """One training run: full-batch GD (``rho == 0``) or SAM over GD, on ``loss``."""

    lr: float
    steps: int
    rho: float = 0.0
    loss: str = "mse"

    @property
    def name(self) -> str:
        """``gd-mse-lr0.04``, ``sam0.05-mse-lr0.04``: the run's id in the tables."""
        opt = f"sam{self.rho:g}" if self.rho else "gd"
        return f"{opt}-{self.loss}-lr{self.lr:g}"


@dataclass(frozen=True)
class EosSettings:
    """The study's data, model, runs and measurement interval."""

    n_samples: int = 1000
    width: int = 200
    runs: tuple[EosRun, ...] = (
        EosRun(0.08, 3000),
        EosRun(0.06, 3000),
        EosRun(0.04, 3000),
        EosRun(0.02, 6000),
        EosRun(0.04, 3000, rho=0.05),
        EosRun(0.04, 3000, rho=0.01),
        EosRun(0.2, 1500, loss="ce"),
    )
    every: int = 20
    seed: int = 0


QUICK = EosSettings(
    n_samples=200, width=32, every=10,
    runs=(EosRun(0.15, 60), EosRun(0.15, 60, rho=0.05), EosRun(1.0, 40, loss="ce")),
)  # fmt: skip


def square_loss(outputs: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    r""":math:`\frac1N \sum_i \tfrac12 \|f(x_i) - y_i\|^2`, Cohen et al.'s square loss.

    >>> float(square_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0]])))
    2.0
    """
    return 0.5 * (outputs - onehot).pow(2).sum(1).mean()


LOSSES = {"mse": square_loss, "ce": nn.functional.cross_entropy}


def digits_subset(n: int, loss: str, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` training digits, flat (n, 64), with one-hot targets for ``"mse"`` and
    class indices for ``"ce"``."""
    ds = load_dataset("digits", "train")
    if not 1 <= n <= len(ds):
        raise ValueError(f"n_samples must be in [1, {len(ds)}], got {n}")
    x, y = ds.x[:n].reshape(n, -1), ds.y[:n]
    if loss == "mse":
        y = nn.functional.one_hot(y, ds.num_classes).float()
    return x.to(device), y.to(device)


def tanh_mlp(width: int, seed: int) -> nn.Module:
    """64 -> width -> width -> 10 with tanh, PyTorch's default initialisation from its own
    seeded stream (the global generator is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, "eos-init"))
        return nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width),
                             nn.Tanh(), nn.Linear(width, 10))  # fmt: skip


def train_run(run: EosRun, s: EosSettings, device: str = "cpu", log=None) -> pd.DataFrame:
    """Full-batch GD or SAM for ``run.steps`` steps; λ_max every ``s.every`` steps.

    Returns the monitor's rows (step 0 is the initialisation) with the run's id, optimizer,
    ``rho`` and loss; stops early at a non-finite loss.
    """
    x, y = digits_subset(s.n_samples, run.loss, device)
    model, loss_fn = tanh_mlp(s.width, s.seed).to(device), LOSSES[run.loss]
    params = list(model.parameters())
    opt = (SAM(params, torch.optim.SGD, rho=run.rho, lr=run.lr) if run.rho
           else torch.optim.SGD(params, lr=run.lr))  # fmt: skip
    monitor = SharpnessMonitor(model, loss_fn, [(x, y)], every=s.every, optimizer=opt,
                               seed=s.seed)  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    monitor(0)
    for step in range(1, run.steps + 1):
        loss = opt.step(closure) if run.rho else (closure(), opt.step())[0]
        if not math.isfinite(float(loss.detach())):  # diverged: the rows so far tell how
            break
        row = monitor(step)
        if log and row and step % (s.every * 25) == 0:
            log(f"{run.name}: step {step}/{run.steps}, λ_max {row['lambda_1']:.2f}, "
                f"loss {row['loss']:.4f}")  # fmt: skip
    df = pd.DataFrame(monitor.rows)
    return df.assign(run=run.name, optimizer="sam" if run.rho else "gd", rho=run.rho,
                     loss_fn=run.loss, planned_steps=run.steps)  # fmt: skip


def edge_ratio(df: pd.DataFrame) -> pd.Series:
    r""":math:`\lambda_{\max}` over the run's own edge: :math:`2/\eta` for GD, the SAM-edge
    (row by row, it moves with :math:`\|\nabla L\|`) for SAM."""
    edge = df["sam_edge"].where(df["optimizer"] == "sam", df["threshold"])
    return df["lambda_1"] / edge.astype(float)


def run_summary(df: pd.DataFrame) -> dict:
    """One run's measured facts: λ_max at init, peak and end, its trend over the last tenth
    of the run (per 100 steps), the first step at >= 90% of its edge, the statistics after it
    (:func:`_after_edge`) and a one-phrase ``verdict``."""
    last, lam = df.iloc[-1], df["lambda_1"]
    r = {
        "run": df["run"].iloc[0], "optimizer": df["optimizer"].iloc[0],
        "loss_fn": df["loss_fn"].iloc[0], "lr": float(last["lr"]), "rho": float(df["rho"].iloc[0]),
        "two_over_lr": float(last["threshold"]), "steps": int(last["step"]),
        "diverged": bool(last["step"] < last["planned_steps"] or not math.isfinite(last["loss"])),
        "lambda_0": float(lam.iloc[0]), "lambda_peak": float(lam.max()),
        "lambda_last": float(last["lambda_1"]),
        "lambda_trend_end": _trend_end(df),
        "edge_last": float(last["lambda_1"] / edge_ratio(df).iloc[-1]),
        **_after_edge(df), "loss_0": float(df["loss"].iloc[0]), "loss_last": float(last["loss"]),
    }  # fmt: skip
    return {**r, "verdict": _verdict(r)}


def _trend_end(df: pd.DataFrame) -> float:
    """λ_max's change per 100 steps over the last tenth of the measurements (at least two)."""
    tail = df.tail(max(2, len(df) // 10))
    span = max(int(tail["step"].iloc[-1] - tail["step"].iloc[0]), 1)
    return float(100 * (tail["lambda_1"].iloc[-1] - tail["lambda_1"].iloc[0]) / span)


def _after_edge(df: pd.DataFrame) -> dict:
    """From the first measurement at >= 90% of the edge on: the median and largest
    λ_max/edge, the share above the edge, and how often the loss rose between measurements
    (the edge's non-monotone descent)."""
    ratio = edge_ratio(df)
    at = ratio >= REACHED
    if not at.any():
        return {"step_at_edge": None, "median_ratio_after": math.nan, "max_ratio_after": math.nan,
                "share_above_after": math.nan, "loss_rises_after": 0}  # fmt: skip
    first = int(df["step"][at].iloc[0])
    after = df["step"] >= first
    return {"step_at_edge": first, "median_ratio_after": float(ratio[after].median()),
            "max_ratio_after": float(ratio[after].max()),
            "share_above_after": float((ratio[after] > 1).mean()),
            "loss_rises_after": int((df["loss"].diff()[after] > 0).sum())}  # fmt: skip


def _verdict(r: dict) -> str:
    """``at the edge`` (median λ_max/edge within 10% of 1 after reaching it), ``still
    sharpening`` or ``no edge: λ_max fell`` (never reached), ``diverged`` or ``off the edge``."""
    if r["diverged"]:
        return "diverged"
    if r["step_at_edge"] is not None:
        return "at the edge" if abs(r["median_ratio_after"] - 1) <= 0.1 else "off the edge"
    if r["lambda_trend_end"] > 0:
        return "still sharpening"
    return "no edge: λ_max fell" if r["lambda_last"] < 0.9 * r["lambda_peak"] else "below the edge"


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """:func:`run_summary` for every run, in the study's order."""
    return pd.DataFrame([run_summary(g) for _, g in df.groupby("run", sort=False)])


def _setting(s: EosSettings) -> str:
    return f"{s.n_samples:,} digits, tanh MLP {s.width}-{s.width}, full batch, seed {s.seed}"


def findings_text(summary: pd.DataFrame, s: EosSettings) -> str:
    """``findings.md``: each run's measured facts in words, and whether it reproduces."""
    lines = ["# Edge of stability: findings", "", _setting(s) + ".",
             f"λ_max measured on the full training set; \"at the edge\" from the first "
             f"measurement with λ_max ≥ {REACHED:.0%} of the run's edge (2/η for GD, the "
             "SAM-edge for SAM), statistics over the measurements from then on.", ""]  # fmt: skip
    for r in summary.itertuples(index=False):
        lines.append(f"- {_sentence(r)}")
    return "\n".join(lines) + "\n"


def _sentence(r) -> str:
    edge = "its SAM-edge" if r.optimizer == "sam" else f"2/η = {r.two_over_lr:.4g}"
    head = (f"**{r.run}** ({r.steps} steps): λ_max {r.lambda_0:.3g} at init, peak "
            f"{r.lambda_peak:.3g}, last {r.lambda_last:.3g}; loss {r.loss_0:.3g} → "
            f"{r.loss_last:.3g}. ")  # fmt: skip
    if r.diverged:
        head += f"**Diverged** before step {r.steps + 1}. "
    if pd.isna(r.step_at_edge):
        return head + (f"**Does not reach** {edge} ({r.verdict}): λ_max peaked at "
                       f"{r.lambda_peak / r.two_over_lr:.0%} of 2/η and moved "
                       f"{r.lambda_trend_end:+.2g} per 100 steps in the last tenth.")  # fmt: skip
    head += (f"**{r.verdict.capitalize()}**: reached {REACHED:.0%} of {edge} at step "
             f"{int(r.step_at_edge)}; from then on "
             f"λ_max/edge has median {r.median_ratio_after:.3f}, max {r.max_ratio_after:.3f}, "
             f"{r.share_above_after:.0%} of measurements above the edge; the loss rose between "
             f"measurements {r.loss_rises_after} times.")  # fmt: skip
    if r.optimizer == "sam":
        head += (f" The SAM-edge ends at {r.edge_last:.3g}, {r.edge_last / r.two_over_lr:.0%} "
                 "of 2/η.")  # fmt: skip
    return head


def plot_study(df: pd.DataFrame, stem: str | os.PathLike, s: EosSettings) -> list[Path]:
    """λ_max per step against each run's edge (top) and the training loss (bottom): GD on
    the square loss per η, SAM beside GD at its η, and GD on cross-entropy."""
    panels = [("gd", "mse", "GD, square loss"),
              ("sam", "mse", "SAM vs GD, square loss"),
              ("gd", "ce", "GD, cross-entropy")]  # fmt: skip
    fig, axes = plt.subplots(2, 3, figsize=(14, 6.5), sharex="col", height_ratios=(2, 1))
    for col, (opt, loss, title) in enumerate(panels):
        runs = df[(df["optimizer"] == opt) & (df["loss_fn"] == loss)]
        for i, (_, g) in enumerate(runs.groupby("run", sort=False)):
            _draw_run(axes[0, col], axes[1, col], g, f"C{i}" if opt == "gd" else f"C{i + 4}")
        if opt == "sam":
            _draw_gd_beside(axes[0, col], axes[1, col], df, runs)
        axes[0, col].set_title(title)
        axes[0, col].set_ylabel("λ_max (full batch)")
        axes[1, col].set(yscale="log", xlabel="step", ylabel="training loss")
        axes[0, col].legend(fontsize=7)
    fig.suptitle("Progressive sharpening and the edge of stability (Cohen et al. 2021): "
                 + _setting(s))  # fmt: skip
    fig.tight_layout()
    return save_figure(fig, stem)


def _draw_run(ax, ax_loss, g: pd.DataFrame, color: str) -> None:
    lr = float(g["lr"].iloc[0])
    rho = float(g["rho"].iloc[0])
    name = f"λ_max, η={lr:g}" + (f", ρ={rho:g}" if rho else "")
    ax.plot(g["step"], g["lambda_1"], color=color, lw=1.2, label=name)
    if rho:
        ax.plot(g["step"], g["sam_edge"], color=color, ls="--", lw=1, label=f"SAM-edge, ρ={rho:g}")
    else:
        ax.axhline(2 / lr, color=color, ls="--", lw=1, label=f"2/η = {2 / lr:.4g}")
    ax_loss.plot(g["step"], g["loss"], color=color, lw=1)


def _draw_gd_beside(ax, ax_loss, df: pd.DataFrame, sam: pd.DataFrame) -> None:
    """GD at SAM's η and its 2/η, in grey, for comparison."""
    lrs = set(sam["lr"])
    gd = df[(df["optimizer"] == "gd") & (df["loss_fn"] == "mse") & df["lr"].isin(lrs)]
    for _, g in gd.groupby("run", sort=False):
        lr = float(g["lr"].iloc[0])
        ax.plot(g["step"], g["lambda_1"], color="0.6", lw=1, label=f"GD, η={lr:g}")
        ax.axhline(2 / lr, color="0.4", ls=":", lw=1, label=f"2/η = {2 / lr:.4g}")
        ax_loss.plot(g["step"], g["loss"], color="0.6", lw=1)


def edge_of_stability(
    out: str | os.PathLike, quick: bool = False, device: str = "cpu", progress: bool = True
) -> Path:
    r"""Run the edge-of-stability study; write ``eos.csv`` (every measurement),
    ``tables/eos_summary.{csv,md}`` (:func:`run_summary` per run),
    ``figures/edge_of_stability.{png,pdf}`` (:func:`plot_study`) and ``findings.md`` under
    ``out`` (:func:`figures.export_reference` copies the figure and tables).

    Deterministic (seeded initialisation, full batches, seeded Lanczos starts). ``quick``:
    200 digits, width 32, a few dozen steps (seconds; for tests). Progress lines go to stderr.

    Returns:
        the path of ``findings.md``.
    """
    out, s = Path(out), QUICK if quick else EosSettings()
    start = time.perf_counter()

    def log(msg: str) -> None:
        if progress:
            print(f"saf eos [{time.perf_counter() - start:6.1f}s]: {msg}", file=sys.stderr,
                  flush=True)  # fmt: skip

    frames = []
    for run in s.runs:
        log(f"{run.name}: {run.steps} steps, λ_max every {s.every}")
        frames.append(train_run(run, s, device, log))
    df = pd.concat(frames, ignore_index=True)
    columns = ["run", "optimizer", "loss_fn", "lr", "rho", "step", "loss", "grad_norm",
               "lambda_1", "threshold", "sam_edge", "matvecs", "lambda_converged"]  # fmt: skip
    for sub in ("figures", "tables"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "eos.csv", df[columns].to_csv(index=False, lineterminator="\n"))
    summary = summary_table(df)
    save_table(summary, out / "tables" / "eos_summary")
    plot_study(df, out / "figures" / "edge_of_stability", s)
    atomic_write_text(out / "findings.md", findings_text(summary, s))
    log(f"done: {out / 'findings.md'}")
    return out / "findings.md"
