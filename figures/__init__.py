"""Paper-style figures and the report behind ``saf figures`` (Du et al., NeurIPS 2022).

One short recipe per figure reads a tidy table and writes PNG + PDF (HTML where it
helps); :func:`run_pipeline` does the whole study and writes ``index.html``. This
package sits on top of ``saf`` (trainer), ``landscape`` and ``analysis``; only the
command line (``cli``) imports it.
"""

from figures._results import (
    Grid,
    at_loss,
    band_stats,
    common_loss_range,
    epoch_at_loss,
    loss_trajectories,
    matched_loss,
    mean_std,
    melt_metrics,
    metric_curves,
)
from figures._settings import Settings, full_settings, quick_settings, say
from figures.pipeline import export_reference, run_pipeline
from figures.recipes import (
    hessian,
    interpolation,
    m_sharpness,
    sam_sharpness,
    sharpness_vs_loss,
    surface_slices,
    surfaces_2d,
    sweep,
    table3,
    training_ce,
)
from figures.report import Section, final_metrics, findings, matched_metrics, write_report

__all__ = [
    # recipes (one per figure)
    "hessian",
    "interpolation",
    "m_sharpness",
    "sam_sharpness",
    "sharpness_vs_loss",
    "surface_slices",
    "surfaces_2d",
    "sweep",
    "table3",
    "training_ce",
    # tidy tables
    "Grid",
    "mean_std",
    "melt_metrics",
    "metric_curves",
    # matched training loss
    "at_loss",
    "band_stats",
    "common_loss_range",
    "epoch_at_loss",
    "loss_trajectories",
    "matched_loss",
    "matched_metrics",
    # report
    "Section",
    "final_metrics",
    "findings",
    "write_report",
    # pipeline
    "Settings",
    "export_reference",
    "full_settings",
    "quick_settings",
    "run_pipeline",
    "say",
]
