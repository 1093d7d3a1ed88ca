r"""The whole study behind ``saf figures``: train, analyse, surfaces, figures, report.

Stages (each reuses what is already on disk under ``out``, so a rerun is cheap
and an interrupted run resumes):

1. **train** every method x seed (finished runs are skipped, unfinished ones resume);
2. **analyse** checkpoints: SAM sharpness (:math:`\rho=0.05`) every epoch, Hessian
   :math:`\lambda_{\max}` and trace every ``hessian_every`` epochs, with
   :func:`analysis.analyze_run` (the engine of ``saf analyze``: cached per checkpoint);
3. **m-sharpness** of the final models against m (cached CSV);
4. **surfaces**: 2D filter-normalized surfaces of the seed-0 final models (two random
   directions, the same draw for every method) and the SGD -> SAF interpolation
   (resumable ``.npz`` files);
5. **sweep**: SAF with other :math:`\lambda` and lag values (``sweep_seeds`` seeds), final
   SAM sharpness, :math:`\lambda_{\max}` and test accuracy, to show where SAF flattens;
6. **figures, tables, report** (``index.html``).

Layout of ``out``: ``settings.json``, ``runs/<method>-s<seed>/`` (trainer runs),
``analysis/``, ``surfaces/``, ``figures/``, ``tables/``, ``index.html``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd

from analysis._io import atomic_write_json

METHODS = ("sgd", "sam", "saf", "mesa")


@dataclass(frozen=True)
class Settings:
    """Everything that defines the study. Same settings for every method and seed.

    The SAF/MESA hyperparameters are the paper's (Du et al. 2022, Sec. 4.1) scaled to
    the schedule: see :func:`scaled_hparams`.
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
    data_dir: str | None = None
    quick: bool = False

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


def scaled_hparams(s: Settings, steps_per_epoch: int) -> dict:
    r"""The paper's SAF/MESA defaults scaled to a schedule of ``s.epochs`` epochs.

    The paper trains CIFAR for 200 epochs with :math:`E_{start}=5` and lag
    :math:`\tilde E=3`, and MESA's EMA uses :math:`\beta=0.9998` (horizon
    :math:`1/(1-\beta)=5000` steps, 6.4% of 200 epochs x 391 steps). We keep the same
    *fractions of the run*, rounded, with a floor of one epoch:

    .. math:: E_{start} = \max(1, \mathrm{round}(0.025\,E)),\quad
              \tilde E = \max(1, \mathrm{round}(0.015\,E)),\quad
              1/(1-\beta) = 0.064\,E\cdot\text{steps/epoch}

    (the trainer's own default, :func:`saf.ema.scaled_ema_decay`, capped at 0.9998).

    :math:`\lambda` (0.3 SAF, 0.8 MESA), :math:`\tau=5` and SAM's :math:`\rho=0.05`
    are the paper's, unscaled.

    >>> h = scaled_hparams(Settings(epochs=200), 391)
    >>> h["start_epoch"], h["lag"], round(h["ema_beta"], 4)
    (5, 3, 0.9998)
    """
    from saf.ema import scaled_ema_decay

    e = s.epochs
    return {
        "start_epoch": max(1, round(0.025 * e)),
        "lag": max(1, round(0.015 * e)),
        "ema_beta": scaled_ema_decay(steps_per_epoch, e),
        "saf_lambda": 0.3,
        "mesa_lambda": 0.8,
        "tau": 5.0,
        "rho": 0.05,
    }


_T0 = [time.perf_counter()]


def say(msg: str) -> None:
    """A progress line on stderr, with the seconds since the pipeline started."""
    print(f"saf figures [{time.perf_counter() - _T0[0]:6.1f}s]: {msg}", file=sys.stderr, flush=True)


def check_settings(out: Path, s: Settings) -> None:
    """Refuse to mix results of different settings in one folder; record the settings."""
    path = out / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
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


def run_pipeline(
    s: Settings,
    out: str | os.PathLike,
    device: str = "cpu",
    progress: bool = True,
    threads: int | None = 1,
) -> Path:
    """Run every stage (see the module docstring) and return the path of ``index.html``.

    Args:
        threads: torch CPU threads (``None``: torch's default). One is fastest for the small
            default models, whose operations are too small to gain from threads, and on a
            shared machine, where two threads contending for a busy core can be 10x slower.
    """
    import torch

    from figures import _stages

    _T0[0] = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, s)
    runs = _stages.train_all(s, out, device, progress)
    curves = _stages.analyse_all(s, out, runs, device, progress)
    msharp = _stages.m_sharpness_all(s, out, runs, device, progress)
    surfaces = _stages.surfaces_all(s, out, runs, device, progress)
    interp = _stages.interpolation(s, out, runs, device, progress)
    sweep = _stages.sweep(s, out, device, progress)
    say("writing figures, tables and the report")
    return _stages.write_outputs(s, out, runs, curves, msharp, surfaces, interp, sweep, device)


def load_curves(out: str | os.PathLike) -> pd.DataFrame:
    """The tidy curves table saved by the pipeline (``analysis/curves.csv``)."""
    return pd.read_csv(Path(out) / "analysis" / "curves.csv")


def export_reference(out: str | os.PathLike, dest: str | os.PathLike) -> list[Path]:
    """Copy a study's PNG figures and tables to ``dest`` (e.g. ``figures/reference/digits``).

    PNGs are re-encoded with a 256-colour palette (about 3x smaller, visually the same),
    so the committed reference figures stay small.
    """
    from PIL import Image

    from analysis._io import atomic_write_with

    out, dest = Path(out), Path(dest)
    written = []
    for p in sorted((out / "figures").glob("*.png")):
        img = Image.open(p).convert("RGB").quantize(256)
        target = dest / p.name
        atomic_write_with(target, lambda f, img=img: img.save(f, format="PNG", optimize=True))
        written.append(target)
    for p in sorted((out / "tables").glob("*.*")):
        atomic_write_with(dest / p.name, lambda f, p=p: f.write(p.read_bytes()))
        written.append(dest / p.name)
    return written
