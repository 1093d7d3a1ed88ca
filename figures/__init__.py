"""Paper-style figures and the report behind ``saf figures`` (Du et al., NeurIPS 2022).

One short recipe per figure reads a tidy table and writes PNG + PDF (HTML where it
helps); :func:`run_pipeline` does the whole study and writes ``index.html``, which leads with
the verdict: each method's flatness over SGD and over controls that reach the same training
CE without SAF, seed by seed, with 95% intervals and Holm-adjusted p-values. This
package sits on top of ``saf`` (trainer), ``landscape`` and ``analysis``; only the
command line (``cli``) imports it.
"""

from figures._controls import (
    fit_temperature,
    last_linear,
    smoothing_for_ce,
    temperature_matched,
    with_temperature,
)
from figures._gap import gap_correlations, gap_points
from figures._results import (
    Grid,
    at_loss,
    band_stats,
    bracketing_epochs,
    common_loss_range,
    epoch_at_loss,
    loss_trajectories,
    matched_levels,
    matched_loss,
    mean_std,
    melt_metrics,
    metric_curves,
)
from figures._settings import Settings, command_for, full_settings, quick_settings, say
from figures._stats import (
    Correlation,
    PairedRatio,
    holm,
    paired_ratio,
    seeds_for_power,
    spearman,
    spearman_ci,
)
from figures._verdict import verdict_display, verdict_table
from figures.eos import edge_of_stability
from figures.pipeline import export_reference, run_pipeline
from figures.recipes import (
    flatness_vs_gap,
    hessian,
    interpolation,
    m_sharpness,
    matched_sensitivity,
    sam_sharpness,
    sharpness_vs_loss,
    surface_slices,
    surfaces_2d,
    sweep,
    table3,
    training_ce,
    verdict,
)
from figures.report import Section, final_metrics, findings, matched_metrics, write_report

__all__ = [
    # recipes (one per figure)
    "flatness_vs_gap",
    "hessian",
    "interpolation",
    "m_sharpness",
    "matched_sensitivity",
    "sam_sharpness",
    "sharpness_vs_loss",
    "surface_slices",
    "surfaces_2d",
    "sweep",
    "table3",
    "training_ce",
    "verdict",
    # tidy tables
    "Grid",
    "mean_std",
    "melt_metrics",
    "metric_curves",
    # matched training loss
    "at_loss",
    "band_stats",
    "bracketing_epochs",
    "common_loss_range",
    "epoch_at_loss",
    "loss_trajectories",
    "matched_levels",
    "matched_loss",
    "matched_metrics",
    # controls: the same training CE without SAF
    "fit_temperature",
    "last_linear",
    "smoothing_for_ce",
    "temperature_matched",
    "with_temperature",
    # paired-seed statistics and the verdict
    "PairedRatio",
    "holm",
    "paired_ratio",
    "seeds_for_power",
    "verdict_display",
    "verdict_table",
    # flatness against the generalization gap
    "Correlation",
    "gap_correlations",
    "gap_points",
    "spearman",
    "spearman_ci",
    # reference study: the edge of stability
    "edge_of_stability",
    # report
    "Section",
    "final_metrics",
    "findings",
    "write_report",
    # pipeline
    "Settings",
    "command_for",
    "export_reference",
    "full_settings",
    "quick_settings",
    "run_pipeline",
    "say",
]
