"""What the study behind ``saf figures`` is: its settings, run names and progress lines."""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from analysis.io import atomic_write_json

METHODS = ("sgd", "sam", "saf", "mesa")


@dataclass(frozen=True)
class Settings:
    """Everything that defines the study. Same settings for every method and seed.

    The SAF/MESA hyperparameters are the paper's (Du et al. 2022, Sec. 4.1) scaled to
    the schedule: see :func:`saf.scaled_hparams`.
    """

    data: str = "digits"
    model: str = "mlp"
    model_kwargs: dict = field(default_factory=dict)
    methods: tuple[str, ...] = METHODS
    seeds: int = 3
    epochs: int = 40
    batch_size: int = 128
    lr: float = 0.05
    analysis_samples: int = 512
    hessian_every: int = 4
    surface_points: int = 21
    surface_span: float = 1.0
    interp_points: int = 25
    m_values: tuple[int, ...] = (1, 4, 16, 64, 256)
    sweep_lams: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)
    sweep_lags: tuple[int, ...] = (1, 3)
    sweep_seeds: int = 1
    track_per_epoch: int = 3
    data_dir: str | None = None
    quick: bool = False

    def __post_init__(self) -> None:
        """Every setting is checked here, before the pipeline writes anything."""
        for name in ("seeds", "epochs", "batch_size", "analysis_samples", "hessian_every",
                     "sweep_seeds"):  # fmt: skip
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not (isinstance(self.track_per_epoch, int) and self.track_per_epoch >= 0):
            raise ValueError(
                f"track_per_epoch must be an integer >= 0, got {self.track_per_epoch!r}"
            )
        if self.surface_points < 2 or self.interp_points < 2:
            raise ValueError("surface_points and interp_points must be >= 2 (a grid needs two)")
        if not all(math.isfinite(v) and v >= 0 for v in self.sweep_lams) or not self.sweep_lams:
            raise ValueError(f"sweep_lams must be finite numbers >= 0, got {self.sweep_lams}")
        if not all(1 <= lag < self.epochs for lag in self.sweep_lags):
            raise ValueError(f"sweep_lags must lie in 1..{self.epochs - 1}, got {self.sweep_lags}")
        if not self.m_values or not all(1 <= m <= self.analysis_samples for m in self.m_values):
            raise ValueError(
                f"m_values must lie in 1..{self.analysis_samples} (the analysed samples), got "
                f"{self.m_values}"
            )
        if not (math.isfinite(self.lr) and self.lr > 0 and math.isfinite(self.surface_span)
                and self.surface_span > 0):  # fmt: skip
            raise ValueError("lr and surface_span must be finite numbers > 0")
        first = max(1, round(0.025 * self.epochs))  # the scaled E_start (saf.scaled_hparams)
        if {"saf", "mesa"} & set(self.methods) and first >= self.epochs:
            raise ValueError(
                f"{self.epochs} epochs: SAF's trajectory loss would start at epoch {first}; "
                "train at least 2 epochs"
            )

    def key(self) -> dict:
        """The settings that define the results (a change means new results)."""
        return {k: v for k, v in asdict(self).items() if k != "data_dir"}


def quick_settings(**overrides) -> Settings:
    """Small settings for ``--quick`` (minutes on 2 CPU cores)."""
    base = Settings(
        epochs=6,
        analysis_samples=256,
        hessian_every=2,
        surface_points=9,
        interp_points=11,
        m_values=(4, 16, 64),
        sweep_lams=(0.3, 3.0),
        sweep_lags=(1,),
        quick=True,
    )
    return replace(base, **overrides)


def full_settings(**overrides) -> Settings:
    """The default (full) settings."""
    return replace(Settings(), **overrides)


_FLAGS = ("data", "model", "seeds", "epochs", "batch_size", "lr", "analysis_samples",
          "hessian_every", "surface_points", "surface_span", "interp_points", "m_values",
          "sweep_lams", "methods", "data_dir", "track_per_epoch")  # fmt: skip


def command_for(s: Settings, out: str) -> str:
    """The ``saf figures`` command that gives these settings (options only where they differ
    from the mode's defaults; fields with no option are named after ``#``)."""
    base = quick_settings() if s.quick else full_settings()
    words = ["saf", "figures", "--out", str(out)] + ["--quick"] * s.quick
    other = []
    for k, v in asdict(s).items():
        if v == getattr(base, k) or k == "quick":
            continue
        if k in _FLAGS:
            text = ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
            words += [f"--{k.replace('_', '-')}", text]
        else:
            other.append(f"{k}={v}")
    return " ".join(words) + (f"  # and {', '.join(other)}" if other else "")


_T0 = [time.perf_counter()]


def restart_clock() -> None:
    """Count the seconds that :func:`say` prints from now."""
    _T0[0] = time.perf_counter()


def say(msg: str) -> None:
    """A progress line on stderr, with the seconds since the pipeline started."""
    print(f"saf figures [{time.perf_counter() - _T0[0]:6.1f}s]: {msg}", file=sys.stderr, flush=True)


ADDED_LATER = {"track_per_epoch": 3}
"""Settings added after results folders existed: their value in a folder that lacks them."""


def check_settings(out: Path, s: Settings) -> None:
    """Refuse to mix results of different settings in one folder; record the settings."""
    path = out / "settings.json"
    if path.is_file():
        old = {**ADDED_LATER, **json.loads(path.read_text())}  # older folders lack them
        new = json.loads(json.dumps(s.key()))
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            raise ValueError(
                f"{out} holds results made with other settings ({', '.join(diff)} differ); "
                "use another --out folder, or delete it to start over"
            )
    else:
        atomic_write_json(path, s.key())


def run_name(method: str, seed: int) -> str:
    """Folder name of one run, e.g. ``saf-s0``."""
    return f"{method}-s{seed}"
