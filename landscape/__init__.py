"""Loss surfaces on any PyTorch model: filter-normalized directions, 1D/2D slices, plots.

Directions are ``dict[str, Tensor]`` keyed by parameter (and optionally buffer)
names; a state dict is a point (``origin``). Data follow the batch convention of
:mod:`analysis.batches`. Imports ``analysis`` only.
"""

from landscape._directions import (
    Direction,
    PCAResult,
    filter_normalize,
    hessian_directions,
    interpolation_directions,
    model_weights,
    pca_directions,
    random_direction,
)
from landscape._plot import plot_1d, plot_2d, plot_trajectory, save_figure, write_html
from landscape._surface import (
    Surface,
    evaluate_grid,
    fingerprint,
    make_point_evaluator,
    surface,
    surface_1d,
    surface_2d,
)

__all__ = [
    # directions
    "Direction",
    "PCAResult",
    "filter_normalize",
    "hessian_directions",
    "interpolation_directions",
    "model_weights",
    "pca_directions",
    "random_direction",
    # surfaces
    "Surface",
    "evaluate_grid",
    "fingerprint",
    "make_point_evaluator",
    "surface",
    "surface_1d",
    "surface_2d",
    # plots
    "plot_1d",
    "plot_2d",
    "plot_trajectory",
    "save_figure",
    "write_html",
]
