"""Curvature and sharpness measures on any PyTorch model and any checkpoint.

The bottom layer: it imports nothing else of this toolkit. Its public modules
:mod:`analysis.batches` (the batch convention and the size-weighted loop),
:mod:`analysis.io` (atomic writes, safe checkpoint reading), :mod:`analysis.distributed`
(rank, world, reductions) and :mod:`analysis.fold` (BatchNorm folding) are the pieces
every other package shares; :mod:`analysis.losses` names the losses.
"""

from analysis._checkpoints import AnalysisSettings, analyze_run, parse_metrics
from analysis._density import SpectralDensity, hessian_density, plot_density, slq
from analysis._eigen import hessian_eigenvalues
from analysis._functional import params_without_norm_and_bias
from analysis._ggn import CURVATURES, FisherOperator, GGNOperator, curvature_operator
from analysis._hvp import HessianOperator, hessian_operator
from analysis._lanczos import lanczos, warm_start_vector
from analysis._linop import EigenResult
from analysis._power import power_iteration
from analysis._sharpness import SharpnessResult, m_sharpness, sam_sharpness
from analysis._trace import TraceResult, hessian_trace, hutchinson, hutchpp
from analysis.batches import Call, batch_mean, model_mode
from analysis.fold import fold_batchnorm
from analysis.io import (
    CHECKPOINT_SUFFIXES,
    CheckpointError,
    atomic_open,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    checkpoint_epoch,
    epoch_from_name,
    find_checkpoints,
    load_checkpoint,
    load_state_dict,
    safe_torch_load,
)
from analysis.losses import LOSSES, check_loss, loss_function
from analysis.monitor import SharpnessMonitor
from analysis.stability import (
    PreconditionedOperator,
    adam_preconditioner,
    adam_threshold,
    sam_edge,
    sgd_threshold,
    stability_thresholds,
)

__all__ = [
    # Hessian operator
    "HessianOperator",
    "hessian_operator",
    "params_without_norm_and_bias",
    # curvature beyond the Hessian
    "CURVATURES",
    "FisherOperator",
    "GGNOperator",
    "curvature_operator",
    # eigen-solvers
    "EigenResult",
    "hessian_eigenvalues",
    "lanczos",
    "power_iteration",
    "warm_start_vector",
    # trace and density
    "SpectralDensity",
    "TraceResult",
    "hessian_density",
    "hessian_trace",
    "hutchinson",
    "hutchpp",
    "plot_density",
    "slq",
    # sharpness
    "SharpnessResult",
    "m_sharpness",
    "sam_sharpness",
    # monitoring and stability thresholds
    "SharpnessMonitor",
    "PreconditionedOperator",
    "adam_preconditioner",
    "adam_threshold",
    "sam_edge",
    "sgd_threshold",
    "stability_thresholds",
    # checkpoint folders
    "AnalysisSettings",
    "analyze_run",
    "parse_metrics",
    # batches, models and losses
    "Call",
    "LOSSES",
    "batch_mean",
    "check_loss",
    "loss_function",
    "fold_batchnorm",
    "model_mode",
    # checkpoints and files
    "CHECKPOINT_SUFFIXES",
    "CheckpointError",
    "atomic_open",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "checkpoint_epoch",
    "epoch_from_name",
    "find_checkpoints",
    "load_checkpoint",
    "load_state_dict",
    "safe_torch_load",
]
