"""The configuration of a training run and its description in ``run.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch

from saf.data import DATASETS
from saf.ema import scaled_ema_decay
from saf.methods import METHODS
from saf.models import MODELS

# The paper's hyperparameters (Du et al. 2022, §4.1) for its 200-epoch CIFAR schedule.
DEFAULT_LAM = {"saf": 0.3, "mesa": 0.8}
DEFAULT_TAU = 5.0
DEFAULT_LAG = 3
DEFAULT_START_EPOCH = 5
PAPER_EPOCHS = 200
DEFAULT_RHO = {"sam": 0.05, "asam": 0.5}  # SAM paper; ASAM paper (CIFAR)


VERSION = "0.1.0"


class TrainingDiverged(ValueError):
    """The training loss became NaN or Inf; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Everything that defines a run (stored in ``run.json``; ``None`` = method default).

    ``rho``: 0.05 (sam) / 0.5 (asam). ``lam``: 0.3 (saf) / 0.8 (mesa). ``ema_decay``:
    an averaging horizon of 6.4% of the run, as the paper's 0.9998 on CIFAR (see
    :func:`saf.ema.scaled_ema_decay`). ``limit``: train on a
    fixed class-balanced subset of that many samples (quick runs). ``start_epoch``: first
    0-based epoch with the trajectory loss. ``out``: ``runs/{method}-s{seed}``.
    """

    method: str = "saf"
    model: str = "resnet_small"
    model_kwargs: dict = field(default_factory=dict)
    data: str = "digits"
    data_dir: str | None = None
    limit: int | None = None
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 0
    rho: float | None = None
    lam: float | None = None
    tau: float = DEFAULT_TAU
    lag: int = DEFAULT_LAG
    start_epoch: int = DEFAULT_START_EPOCH
    ema_decay: float | None = None
    augment: bool = True
    amp: bool = False
    threads: int | None = None
    seed: int = 0
    device: str = "cpu"
    out: str | Path | None = None
    progress: bool = True

    def validate(self) -> TrainConfig:
        """Check every field; raise ValueError saying what is wrong. Returns ``self``."""
        for name, allowed in (("method", METHODS), ("model", MODELS), ("data", DATASETS)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}"
                )
        for name in ("rho", "lam", "weight_decay", "momentum"):
            if getattr(self, name) is not None and not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("tau", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 2:
            raise ValueError(f"limit must be >= 2 training samples, got {self.limit}")
        for name in ("epochs", "batch_size", "lag"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.start_epoch < 0 or self.warmup_epochs < 0:
            raise ValueError("start_epoch and warmup_epochs must be >= 0")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise ValueError(f"data directory {self.data_dir} does not exist")
        if self.data.startswith("cifar") and self.data_dir is None:
            raise ValueError(f"data {self.data!r} needs a data_dir (python-format CIFAR folder)")
        return self

    @property
    def run_dir(self) -> Path:
        return (
            Path(self.out) if self.out is not None else Path("runs") / f"{self.method}-s{self.seed}"
        )

    def resolved(self, steps_per_epoch: int) -> dict:
        """The hyperparameters with method defaults filled in."""
        m, keys = self.method, ("epochs", "batch_size", "lr", "momentum", "weight_decay")
        traj = m in DEFAULT_LAM
        rho = self.rho if self.rho is not None else DEFAULT_RHO.get(m)
        lam = self.lam if self.lam is not None else DEFAULT_LAM.get(m)
        beta = (
            self.ema_decay
            if self.ema_decay is not None
            else scaled_ema_decay(steps_per_epoch, self.epochs)
        )
        return {
            **{k: getattr(self, k) for k in (*keys, "warmup_epochs", "augment", "amp")},
            "rho": rho if m in DEFAULT_RHO else None,
            "lam": lam if traj else None,
            "tau": self.tau if traj else None,
            "lag": self.lag if m == "saf" else None,
            "start_epoch": self.start_epoch if traj else None,
            "ema_decay": beta if m == "mesa" else None,
            "steps_per_epoch": steps_per_epoch,
        }


def scaled_hparams(epochs: int, steps_per_epoch: int) -> dict:
    r"""The paper's SAF/MESA defaults scaled to a schedule of ``epochs`` epochs.

    The paper trains CIFAR for 200 epochs with :math:`E_{start}=5` and lag
    :math:`\tilde E=3`, and MESA's EMA uses :math:`\beta=0.9998` (horizon
    :math:`1/(1-\beta)=5000` steps, 6.4% of 200 epochs x 391 steps). We keep the same
    *fractions of the run*, rounded, with a floor of one epoch:

    .. math:: E_{start} = \max(1, \mathrm{round}(0.025\,E)),\quad
              \tilde E = \max(1, \mathrm{round}(0.015\,E)),\quad
              1/(1-\beta) = 0.064\,E\cdot\text{steps/epoch}

    (:func:`saf.ema.scaled_ema_decay`, capped at 0.9998). :math:`\lambda` (0.3 SAF, 0.8
    MESA), :math:`\tau=5` and SAM's :math:`\rho=0.05` are the paper's, unscaled.

    >>> h = scaled_hparams(200, 391)
    >>> h["start_epoch"], h["lag"], round(h["ema_beta"], 4)
    (5, 3, 0.9998)
    """
    return {
        "start_epoch": max(1, round(DEFAULT_START_EPOCH / PAPER_EPOCHS * epochs)),
        "lag": max(1, round(DEFAULT_LAG / PAPER_EPOCHS * epochs)),
        "ema_beta": scaled_ema_decay(steps_per_epoch, epochs),
        "saf_lambda": DEFAULT_LAM["saf"],
        "mesa_lambda": DEFAULT_LAM["mesa"],
        "tau": DEFAULT_TAU,
        "rho": DEFAULT_RHO["sam"],
    }


def _versions() -> dict:
    return {
        "saf": VERSION,
        "torch": torch.__version__,
        "numpy": version("numpy"),
        "sklearn": version("scikit-learn"),
    }


def describe_run(cfg: TrainConfig, hp: dict, ds) -> dict:
    """The content of ``run.json``."""
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}
    return {
        "method": cfg.method,
        "hparams": hp,
        "model": {"name": cfg.model, "kwargs": dict(cfg.model_kwargs)},
        "data": {
            "name": cfg.data,
            "data_dir": cfg.data_dir,
            "num_classes": ds.num_classes,
            "in_shape": list(ds.in_shape),
            "num_train": len(ds),
        },
        "seed": cfg.seed,
        "device": cfg.device,
        "versions": _versions(),
        "config": config,
    }
