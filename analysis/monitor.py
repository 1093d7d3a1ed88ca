r"""Sharpness during training: a monitor to call from any loop, invisible to the run.

Every ``every`` steps, :class:`SharpnessMonitor` measures on a fixed probe set the top
eigenvalues :math:`\lambda_1 \ge \dots \ge \lambda_k` of the curvature (Hessian, GGN or
empirical Fisher), and optionally its trace, SAM's one-step sharpness and Adam's
preconditioned sharpness :math:`\lambda_{\max}(P^{-1}H)`, beside the optimizer's stability
threshold (:mod:`analysis.stability`). Lanczos starts from the previous measurement's Ritz
vectors (:func:`analysis.warm_start_vector`), so a measurement after a small change of the
weights takes fewer products than a cold one, with the same residual bound.

The model's weights, buffers, train/eval flags and ``.grad`` tensors, and the random number
generators (torch CPU and CUDA, ``random``, ``numpy``) are left exactly as they were: every
product runs on copies of the weights (:func:`torch.func.functional_call` and
:func:`torch.autograd.grad`, never ``.backward()``), and the generators' states are put back,
so a run with the monitor is bitwise the run without it.

Reference: Cohen et al., "Gradient descent on neural networks typically occurs at the edge
of stability", ICLR 2021 (sharpness tracked during training against :math:`2/\eta`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import random
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from analysis._functional import LossFn, ParamSpec
from analysis._ggn import CURVATURES, curvature_operator
from analysis._lanczos import lanczos, warm_start_vector
from analysis._sharpness import sam_sharpness
from analysis._trace import hutchpp
from analysis.io import atomic_write_text
from analysis.stability import PreconditionedOperator, adam_preconditioner, stability_thresholds

MEASURES = ("lambda_max", "trace", "sam_sharpness", "preconditioned")
_SHARED = ("dtype", "device", "forward_fn", "output_fn")  # operator kwargs sam_sharpness takes


@contextlib.contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Put back the RNG states (torch CPU and CUDA, ``random``, ``numpy``) and every
    submodule's train/eval flag on exit."""
    cuda = torch.cuda.is_initialized()
    states = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None,
              random.getstate(), np.random.get_state())  # fmt: skip
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        if cuda:
            torch.cuda.set_rng_state_all(states[1])
        random.setstate(states[2])
        np.random.set_state(states[3])
        for m, training in flags:
            m.training = training


class SharpnessMonitor:
    r"""Measure the sharpness every ``every`` steps of any training loop; write a CSV.

    Call it after ``optimizer.step()``: ``monitor(step, epoch)`` (or ``.step``) measures when
    ``step % every == 0`` and returns the row (None otherwise). A row holds ``step``,
    ``epoch``, ``lr``, the probe ``loss`` and ``grad_norm`` :math:`\|\nabla L\|`, then per
    measure ``lambda_1`` … ``lambda_k`` (with ``lambda_matvecs``, ``lambda_converged``),
    ``trace`` and ``trace_stderr`` (Hutch++), ``sam_sharpness``, ``preconditioned_sharpness``
    :math:`\lambda_{\max}(P^{-1}H)` (Adam/AdamW, with ``preconditioned_matvecs``), the
    optimizer's ``threshold`` (and ``sam_edge`` for SAM; :func:`stability_thresholds`),
    the curvature products used (``matvecs``) and the ``seconds`` taken. After each
    measurement the whole CSV is rewritten atomically (:func:`analysis.io.atomic_write_text`).

    Args:
        model: the model being trained (only read).
        loss_fn: ``loss_fn(outputs, targets)``, a mean over the batch.
        probe_data: the fixed ``(inputs, targets)`` batches to measure on (read once, here).
        every: measure every ``every`` steps.
        measures: any of ``"lambda_max"``, ``"trace"``, ``"sam_sharpness"``,
            ``"preconditioned"`` (needs an Adam/AdamW ``optimizer``, alone or under SAM).
        k: top eigenvalues per ``"lambda_max"``.
        csv: path of the CSV (None: rows are kept in ``.rows`` only).
        optimizer: the training optimizer: its learning rate and thresholds go in the rows.
        curvature: ``"hessian"``, ``"ggn"`` or ``"fisher"`` (:func:`curvature_operator`).
        tol, max_iter: Lanczos' relative tolerance and product limit (:func:`lanczos`).
        warm_max_iter: products per warm-started measurement at most: a budget for frequent
            measurement (the first, cold one runs to ``tol``). Each Ritz value is then a lower
            bound on :math:`\lambda_1` that the next measurement refines, as restarted
            Lanczos does (``lambda_converged`` says whether ``tol`` was reached).
        trace_matvecs: Hutch++ products per trace (the same probes each time).
        rho: radius of ``"sam_sharpness"``.
        warm: start Lanczos from the previous Ritz vectors (False: cold every time).
        seed: seed of the Lanczos start vectors and trace probes.
        params: which parameters (:class:`analysis.HessianOperator`).
        **operator_kwargs: ``mode``, ``dtype``, ``device``, ``cache`` (default ``"auto"``),
            ``forward_fn``, ``output_fn`` of :class:`analysis.HessianOperator`.

    >>> model = nn.Linear(2, 1, bias=False)
    >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> monitor = SharpnessMonitor(model, nn.MSELoss(), [(X, torch.zeros(2, 1))], every=10)
    >>> monitor(5) is None, round(monitor(10)["lambda_1"], 4)  # H = 2 X^T X / N = diag(1, 4)
    (True, 4.0)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        probe_data: Iterable,
        every: int = 50,
        measures: Iterable[str] = ("lambda_max",),
        k: int = 1,
        *,
        csv: str | os.PathLike | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        curvature: str = "hessian",
        tol: float = 1e-3,
        max_iter: int | None = None,
        warm_max_iter: int | None = None,
        trace_matvecs: int = 30,
        rho: float = 0.05,
        warm: bool = True,
        seed: int = 0,
        params: ParamSpec = None,
        **operator_kwargs,
    ):
        self.measures = tuple(measures)
        _validate(every, self.measures, k, curvature, optimizer)
        self.model, self.loss_fn, self.every, self.k = model, loss_fn, every, k
        self.csv, self.optimizer, self.curvature = csv, optimizer, curvature
        self.tol, self.max_iter, self.warm, self.seed = tol, max_iter, warm, seed
        self.warm_max_iter = warm_max_iter
        self.trace_matvecs, self.rho, self.params = trace_matvecs, rho, params
        self.operator_kwargs = {"cache": "auto", **operator_kwargs}
        with untouched(model):  # a shuffling DataLoader draws from the global generator
            self.probe = list(probe_data)
        self.rows: list[dict[str, Any]] = []
        self._vectors: dict[str, torch.Tensor] = {}  # previous Ritz vectors, per measure

    def step(self, step: int, epoch: int | None = None) -> dict[str, Any] | None:
        """Measure if ``step`` is a multiple of ``every``; return the row (or None)."""
        return self.measure(step, epoch) if step % self.every == 0 else None

    __call__ = step

    def measure(self, step: int, epoch: int | None = None) -> dict[str, Any]:
        """Measure now, append the row to ``rows`` and the CSV, and return it."""
        start = time.perf_counter()
        with untouched(self.model):
            row = self._measure(step, epoch)
        row["seconds"] = time.perf_counter() - start
        self.rows.append(row)
        if self.csv is not None:
            atomic_write_text(self.csv, _csv_text(self.rows))
        return row

    def _measure(self, step: int, epoch: int | None) -> dict[str, Any]:
        kwargs = self.operator_kwargs
        if set(self.measures) <= {"sam_sharpness"}:  # no products: a kept graph would not pay
            kwargs = {**kwargs, "cache": False}
        op = curvature_operator(self.curvature, self.model, self.loss_fn, self.probe,
                                self.params, **kwargs)  # fmt: skip
        loss, g = op.loss_and_gradient()
        row: dict[str, Any] = {"step": step, "epoch": epoch, "loss": loss,
                               "grad_norm": float(g.norm())}  # fmt: skip
        if self.optimizer is not None:
            t = stability_thresholds(self.optimizer, row["grad_norm"])
            row.update(lr=t["lr"], threshold=t["threshold"], sam_edge=t.get("sam_edge"))
        if "lambda_max" in self.measures:
            r = self._top(op, "lambda", self.k)
            row.update({f"lambda_{i + 1}": float(v) for i, v in enumerate(r.values)})
            row.update(lambda_matvecs=r.n_matvecs, lambda_converged=r.converged)
        if "preconditioned" in self.measures:
            r = self._top(self._preconditioned(op), "preconditioned", 1)
            row.update(preconditioned_sharpness=float(r.values[0]),
                       preconditioned_matvecs=r.n_matvecs)  # fmt: skip
        if "trace" in self.measures:
            t = hutchpp(op, self.trace_matvecs, seed=self.seed)
            row.update(trace=t.value, trace_stderr=t.stderr)
        if "sam_sharpness" in self.measures:
            row["sam_sharpness"] = self._sam_sharpness()
        row["matvecs"] = op.n_matvecs
        return row

    def _top(self, op: Any, key: str, k: int):
        """Top-``k`` Lanczos pairs, warm-started from this measure's previous vectors."""
        prev = self._vectors.get(key)
        v0 = warm_start_vector(prev, self.seed) if self.warm and prev is not None else None
        budget = self.warm_max_iter if v0 is not None and self.warm_max_iter else self.max_iter
        r = lanczos(op, k, tol=self.tol, max_iter=budget, seed=self.seed, v0=v0)
        self._vectors[key] = r.vectors
        return r

    def _preconditioned(self, op) -> PreconditionedOperator:
        named = dict(self.model.named_parameters())
        P = adam_preconditioner(self.optimizer, [named[n] for n in op.space.names])
        return PreconditionedOperator(op, P)

    def _sam_sharpness(self) -> float:
        kw = {k: v for k, v in self.operator_kwargs.items() if k in _SHARED}
        r = sam_sharpness(self.model, self.loss_fn, self.probe, self.rho, params=self.params,
                          **kw)  # fmt: skip
        return r.value


def _validate(every, measures, k, curvature, optimizer) -> None:
    if every < 1 or k < 1:
        raise ValueError(f"every and k must be >= 1, got {every}, {k}")
    unknown = [m for m in measures if m not in MEASURES]
    if unknown or not measures:
        raise ValueError(f"measures must be some of {', '.join(MEASURES)}; got {measures}")
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {', '.join(CURVATURES)}; got {curvature!r}")
    thresholds = stability_thresholds(optimizer) if optimizer is not None else {}
    if "preconditioned" in measures and not thresholds.get("preconditioned"):
        raise ValueError("measure 'preconditioned' needs optimizer= an Adam or AdamW")


def _csv_text(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV text, columns in order of first appearance (missing cells empty)."""
    columns = list(dict.fromkeys(c for row in rows for c in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: _cell(v) for c, v in row.items()} for row in rows)
    return buf.getvalue()


def _cell(value: Any) -> Any:
    """CSV cell: None and NaN empty, floats in full precision."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else value
