r"""The whole study behind ``saf figures``: train, analyse, surfaces, figures, report.

Stages (each reuses what is already on disk under ``out``, so a rerun is cheap
and an interrupted run resumes):

1. **train** every method x seed (finished runs are skipped, unfinished ones resume), and
   the label-smoothing control: SGD per seed with the smoothing whose CE floor is SAF's
   final CE (``runs/sgd_ls-s<k>``, analysed like the others as method ``sgd_ls``); then
   **track**: each main run replayed with the sharpness monitor, :math:`\lambda_{\max}`
   a few times per epoch beside the optimizer's threshold (:mod:`figures._tracking`);
2. **analyse** checkpoints: training cross-entropy, SAM sharpness (:math:`\rho=0.05`) and
   adaptive sharpness (:math:`\rho=0.5`) every epoch, Hessian :math:`\lambda_{\max}` and
   trace every ``hessian_every`` epochs, with
   :func:`analysis.analyze_run` (the engine of ``saf analyze``: cached per checkpoint);
3. **controls** and **m-sharpness**: SGD's and SAM's final models with the last layer
   rescaled to each other method's final training CE (temperature matching), their
   :math:`\lambda_{\max}` and SAM sharpness; m-sharpness of the final models against m
   (cached CSVs);
4. **surfaces**: 2D filter-normalized surfaces of the seed-0 final models (two random
   directions, the same draw for every method) and the SGD -> SAF interpolation
   (resumable ``.npz`` files);
5. **sweep**: SAF with other :math:`\lambda` and lag values (``sweep_seeds`` seeds), final
   SAM sharpness, :math:`\lambda_{\max}` and test accuracy, and the same at a training
   loss that SGD, SAM and every sweep run reach, to show where SAF flattens;
6. **figures, tables, report** (``index.html``), led by the verdict: each method over SGD
   (last epoch and matched training loss) and over the controls, seed by seed, with 95%
   intervals and Holm-adjusted p-values (:mod:`figures._verdict`).

Layout of ``out``: ``settings.json``, ``runs/<method>-s<seed>/`` (trainer runs),
``tracking/``, ``analysis/``, ``surfaces/``, ``figures/``, ``tables/``, ``index.html``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image

from analysis.io import atomic_write_with
from figures import _outputs, _stages, _tracking
from figures._settings import Settings, check_settings, command_for, restart_clock, say


def run_pipeline(
    s: Settings,
    out: str | os.PathLike,
    device: str = "cpu",
    progress: bool = True,
    threads: int | None = 1,
    command: str | None = None,
) -> Path:
    """Run every stage (see the module docstring) and return the path of ``index.html``.

    Args:
        threads: torch CPU threads (``None``: torch's default). One is fastest for the small
            default models, whose operations are too small to gain from threads, and on a
            shared machine, where threads contend for busy cores.
        command: the command shown at the top of the report (None:
            :func:`figures._settings.command_for` these settings).
    """
    restart_clock()
    if threads is not None:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, s)
    runs = _stages.train_all(s, out, device, progress)
    smoothed = _stages.smoothing_runs(s, out, runs, device, progress)
    track = _tracking.track_all(s, out, runs, _config(s, device, progress), progress)
    curves = _stages.analyse_all(s, out, {**runs, **smoothed}, device, progress)
    temperature = _stages.temperature_controls(s, out, runs, device)
    msharp = _stages.m_sharpness_all(s, out, runs, device, progress)
    surfaces = _stages.surfaces_all(s, out, runs, device, progress)
    interp = _stages.interpolation(s, out, runs, device, progress)
    sweep = _stages.sweep(s, out, curves, device, progress)
    say("writing figures, tables and the report")
    command = command or command_for(s, str(out))
    return _outputs.write_outputs(
        s,
        out,
        runs,
        curves,
        msharp,
        surfaces,
        interp,
        sweep,
        device,
        temperature,
        command,
        track,
    )


def _config(s: Settings, device: str, progress: bool):
    """A run's own trainer config, for the per-step replays."""
    return lambda method, seed, run_dir, **over: _stages.train_config(
        s, method, seed, run_dir, device, progress, **over
    )


def export_reference(out: str | os.PathLike, dest: str | os.PathLike) -> list[Path]:
    """Copy a study's PNG figures and tables to ``dest`` (e.g. ``figures/reference/digits``).

    PNGs are re-encoded with a 256-colour palette (about 3x smaller, visually the same),
    so the committed reference figures stay small.
    """
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
