"""The configuration of a training run and its description in ``run.json``."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch

from saf.data import DATASETS
from saf.ema import scaled_ema_decay
from saf.models import MODELS
from saf.paper import DEFAULT_LAM, DEFAULT_RHO, DEFAULT_TAU, METHODS, scaled_hparams

VERSION = "0.1.0"


class TrainingDiverged(ValueError):
    """The training loss became NaN or Inf; the last good checkpoint is kept."""


OPTIMIZERS = ("sgd", "adamw")


def is_spec(name) -> bool:
    """Whether ``name`` names code (``package.module:function``) rather than one of ours."""
    if not isinstance(name, str):
        return False
    mod, sep, fn = name.partition(":")
    return bool(sep and mod and fn.isidentifier())


MAX_EPOCHS = 1_000_000
"""The longest schedule accepted (the paper trains for 200 epochs)."""


@dataclass
class TrainConfig:
    """Everything that defines a run (stored in ``run.json``; ``None`` = method default).

    Method defaults: ``rho`` 0.05 (sam) / 0.5 (asam); ``lam`` 0.3 (saf) / 0.8 (mesa);
    ``lag`` and ``start_epoch`` (0-based first epoch of the trajectory loss) the paper's 3
    and 5 at 200 epochs, scaled to ``epochs`` (:func:`saf.scaled_hparams`); ``ema_decay`` an
    averaging horizon of 6.4% of the run (:func:`saf.scaled_ema_decay`); ``decay_norm_bias``
    True for sgd, False for adamw (no weight decay on normalization weights and biases).
    ``limit``: train on a fixed class-balanced subset of that many samples. ``save_every``:
    keep the checkpoint of every N-th epoch (and the first and last). ``out``:
    ``runs/{method}-s{seed}``.
    """

    method: str = "saf"
    model: str = "resnet_small"
    model_kwargs: dict = field(default_factory=dict)
    data: str = "digits"
    data_dir: str | None = None
    limit: int | None = None
    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 5e-4
    decay_norm_bias: bool | None = None
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    clip_grad: float | None = None
    rho: float | None = None
    sam_local_eps: bool = True
    lam: float | None = None
    tau: float = DEFAULT_TAU
    lag: int | None = None
    start_epoch: int | None = None
    ema_decay: float | None = None
    augment: bool = True
    amp: bool = False
    sync_bn: bool = False
    save_every: int = 1
    track_sharpness: int | None = None
    probe_samples: int = 256
    threads: int | None = None
    seed: int = 0
    device: str = "cpu"
    out: str | Path | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # run.json stores a list

    def validate(self) -> TrainConfig:
        """Check every field; raise ValueError saying what is wrong. Returns ``self``."""
        for name, allowed in (("method", METHODS), ("model", MODELS), ("data", DATASETS),
                              ("optimizer", OPTIMIZERS)):  # fmt: skip
            if name in ("model", "data") and is_spec(getattr(self, name)):
                continue  # the caller's own code, passed to train() as a callable
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}"
                )
        for name in ("rho", "lam", "weight_decay", "momentum", "label_smoothing"):
            if getattr(self, name) is not None and not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("tau", "lr", "clip_grad"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 2:
            raise ValueError(f"limit must be >= 2 training samples, got {self.limit}")
        for name in (
            "epochs",
            "batch_size",
            "lag",
            "save_every",
            "track_sharpness",
            "probe_samples",
        ):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs > MAX_EPOCHS:
            raise ValueError(f"epochs must be at most {MAX_EPOCHS:,}, got {self.epochs:,}")
        if self.threads is not None and not 1 <= self.threads <= (os.cpu_count() or 1):
            raise ValueError(
                f"threads must be 1..{os.cpu_count()} (the CPUs here), got {self.threads}"
            )
        if (self.start_epoch or 0) < 0 or self.warmup_epochs < 0:
            raise ValueError("start_epoch and warmup_epochs must be >= 0")
        for name in ("ema_decay", "label_smoothing"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < 1:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise ValueError(f"data directory {self.data_dir} does not exist")
        if str(self.data).startswith("cifar") and self.data_dir is None:
            raise ValueError(f"data {self.data!r} needs a data_dir (python-format CIFAR folder)")
        first = self.first_trajectory_epoch()
        if first is not None and first >= self.epochs:
            raise ValueError(
                f"the trajectory loss would never switch on: it starts at epoch {first} "
                f"(0-based; start_epoch {self.schedule()[1]}, lag {self.schedule()[0]}) of a "
                f"{self.epochs}-epoch run; lower --saf-start/--saf-lag or train longer"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return (
            Path(self.out) if self.out is not None else Path("runs") / f"{self.method}-s{self.seed}"
        )

    def schedule(self) -> tuple[int, int]:
        """``(lag, start_epoch)``: as given, or the paper's scaled to ``epochs``."""
        scaled = scaled_hparams(self.epochs, 1)
        lag = self.lag if self.lag is not None else scaled["lag"]
        start = self.start_epoch if self.start_epoch is not None else scaled["start_epoch"]
        return lag, start

    def first_trajectory_epoch(self) -> int | None:
        """The first epoch whose loss has a trajectory term (SAF also needs ``lag`` epochs of
        stored logits); None for methods without one."""
        lag, start = self.schedule()
        return {"saf": max(start, lag), "mesa": start}.get(self.method)

    def resolved(self, steps_per_epoch: int, device: torch.device | None = None) -> dict:
        """The hyperparameters as applied (method defaults filled in, options that do not
        apply to this run recorded as off)."""
        m = self.method
        traj = m in DEFAULT_LAM
        lag, start = self.schedule()
        rho = self.rho if self.rho is not None else DEFAULT_RHO.get(m)
        lam = self.lam if self.lam is not None else DEFAULT_LAM.get(m)
        beta = (
            self.ema_decay
            if self.ema_decay is not None
            else scaled_ema_decay(steps_per_epoch, self.epochs)
        )
        sgd = self.optimizer == "sgd"
        decay_nb = self.decay_norm_bias if self.decay_norm_bias is not None else sgd
        keys = ("epochs", "batch_size", "optimizer", "lr", "weight_decay", "warmup_epochs",
                "label_smoothing", "clip_grad", "sync_bn", "save_every")  # fmt: skip
        return {
            **{k: getattr(self, k) for k in keys},
            "momentum": self.momentum if sgd else None,
            "nesterov": self.nesterov if sgd else None,
            "betas": None if sgd else list(self.betas),
            "decay_norm_bias": decay_nb,
            "augment": self.augment and self.data.startswith("cifar"),
            "amp": "bf16"
            if self.amp and device is not None and device.type in ("cuda", "cpu")
            else False,
            "rho": rho if m in DEFAULT_RHO else None,
            "sam_local_eps": self.sam_local_eps if m in DEFAULT_RHO else None,
            "lam": lam if traj else None,
            "tau": self.tau if traj else None,
            "lag": lag if m == "saf" else None,
            "start_epoch": start if traj else None,
            "ema_decay": beta if m == "mesa" else None,
            "steps_per_epoch": steps_per_epoch,
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
    config = {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
              for k, v in dataclasses.asdict(cfg).items()}  # fmt: skip
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
