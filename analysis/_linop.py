"""Turn "anything that multiplies a vector" into a plain function on flat tensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Matvec = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EigenResult:
    """Eigenpairs from :func:`lanczos`, :func:`power_iteration` or :func:`hessian_eigenvalues`.

    Attributes:
        values: ``(k,)`` eigenvalues; largest first for ``which="largest"``,
            smallest first for ``which="smallest"``.
        vectors: ``(k, n)`` unit eigenvectors, one per row (sign is arbitrary).
        residuals: ``(k,)`` residual norms :math:`\\|Hv - \\lambda v\\|`.
        n_matvecs: matrix-vector products used.
        converged: every requested pair met the tolerance.
        stderr: ``(k,)`` standard errors of the values over the data (the jackknife of
            :func:`hessian_eigenvalues` with ``se_groups``); None when not estimated.
    """

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    n_matvecs: int
    converged: bool
    stderr: torch.Tensor | None = None


def as_matvec(op: Any, n: int | None = None) -> tuple[Matvec, int, torch.dtype, torch.device]:
    """``(matvec, n, dtype, device)`` for a dense matrix, an operator or a callable.

    ``op`` may be a square tensor, an object with ``.matvec`` and ``.shape``
    (e.g. :class:`HessianOperator`), or a callable; a bare callable needs ``n``.

    Raises:
        ValueError: a non-square matrix, or a callable without ``n``.
    """
    if isinstance(op, torch.Tensor):
        if op.ndim != 2 or op.shape[0] != op.shape[1]:
            raise ValueError(f"expected a square matrix, got shape {tuple(op.shape)}")
        return (lambda v: op @ v), op.shape[0], op.dtype, op.device
    if hasattr(op, "matvec") and hasattr(op, "shape"):
        dtype = getattr(op, "dtype", torch.float64)
        dtype = dtype if isinstance(dtype, torch.dtype) else torch.float64
        return op.matvec, int(op.shape[0]), dtype, torch.device(getattr(op, "device", "cpu"))
    if callable(op):
        if n is None:
            raise ValueError("a plain matvec function needs n= (the vector length)")
        return op, int(n), torch.float64, torch.device("cpu")
    raise ValueError(f"cannot multiply with a {type(op).__name__}; pass a matrix or a callable")


def random_vector(
    n: int, gen: torch.Generator, dtype, device, kind: str = "normal"
) -> torch.Tensor:
    """The next random vector (normal or Rademacher) of ``gen`` (a CPU generator from
    :func:`analysis.rng.generator`), drawn on the CPU, then moved to ``device``."""
    if kind == "rademacher":
        v = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
    else:
        v = torch.randn(n, generator=gen, dtype=torch.float64)
    return v.to(device=device, dtype=dtype)
