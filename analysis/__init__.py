"""Curvature and sharpness measures on any PyTorch model and any checkpoint.

Imports point one way: ``landscape`` may import ``analysis``; ``analysis``
never imports ``saf`` or ``landscape``.
"""

from analysis._checkpoints import analyze_run, epoch_from_name, find_checkpoints
from analysis._density import SpectralDensity, hessian_density, plot_density, slq
from analysis._eigen import hessian_eigenvalues
from analysis._functional import params_without_norm_and_bias
from analysis._hvp import HessianOperator, hessian_operator
from analysis._io import (
    CHECKPOINT_SUFFIXES,
    CheckpointError,
    atomic_open,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    load_state_dict,
    safe_torch_load,
)
from analysis._lanczos import lanczos
from analysis._linop import EigenResult
from analysis._power import power_iteration
from analysis._sharpness import SharpnessResult, m_sharpness, sam_sharpness
from analysis._trace import TraceResult, hessian_trace, hutchinson, hutchpp

__all__ = [
    # Hessian operator
    "HessianOperator",
    "hessian_operator",
    "params_without_norm_and_bias",
    # eigen-solvers
    "EigenResult",
    "hessian_eigenvalues",
    "lanczos",
    "power_iteration",
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
    # checkpoint folders
    "analyze_run",
    "epoch_from_name",
    "find_checkpoints",
    # safe I/O
    "CHECKPOINT_SUFFIXES",
    "CheckpointError",
    "atomic_open",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "load_state_dict",
    "safe_torch_load",
]
