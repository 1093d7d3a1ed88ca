"""Analyse a folder of checkpoints into a tidy table, with a resumable on-disk cache.

Table contract (one row per checkpoint x metric; column and metric names are stable):

* ``checkpoint`` (file name), ``epoch`` (last integer in the file stem, or NaN),
  ``metric``, ``value``, ``stderr`` (NaN when n/a), ``status`` (``"ok"``, or why there is
  no value: the skip reason of an unreadable/mismatched checkpoint, ``"nonfinite weights"``,
  ``"n/a: ..."``),
* ``rho``, ``m``, ``kind``, ``steps``, ``adaptive``: the sharpness settings on the
  ``sam_sharpness``/``m_sharpness`` rows (NaN/empty elsewhere). ``m`` is NaN when the
  given batches were used as they are.

Metric names: ``loss``, ``accuracy``, ``lambda_max``, ``lambda_2`` .. ``lambda_k``
(asking for any ``lambda_j`` computes the top ``j`` in one Lanczos run and reports all of
them), ``lambda_min``, ``trace`` (Hutch++), ``sam_sharpness`` (one-step worst case,
rho = 0.05 by default, on the given batches: SAF paper Fig. 4b), ``m_sharpness``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from analysis._functional import reiterable
from analysis._hvp import HessianOperator
from analysis._io import (
    CHECKPOINT_SUFFIXES,
    CheckpointError,
    atomic_write_json,
    atomic_write_text,
    load_state_dict,
)
from analysis._lanczos import lanczos
from analysis._sharpness import m_sharpness
from analysis._trace import hutchpp

BASIC = ("loss", "accuracy", "lambda_max", "lambda_min", "trace", "sam_sharpness", "m_sharpness")
COLUMNS = ("checkpoint", "epoch", "metric", "value", "stderr", "status",
           "rho", "m", "kind", "steps", "adaptive")  # fmt: skip
_LAMBDA = re.compile(r"lambda_(\d+)$")


def epoch_from_name(name: str | Path) -> int | None:
    """The last integer in a file's stem (``epoch_0012.pt`` -> 12), or None.

    >>> epoch_from_name("run3-epoch=07.safetensors"), epoch_from_name("final.pt")
    (7, None)
    """
    nums = re.findall(r"\d+", Path(name).name.split(".")[0])
    return int(nums[-1]) if nums else None


def find_checkpoints(path: str | Path, every: int = 1) -> list[Path]:
    """Checkpoint files of a folder (or of ``RUN_DIR/checkpoints``), sorted by epoch.

    Keeps files whose epoch is a multiple of ``every`` (files without an epoch are
    always kept).

    Raises:
        ValueError: ``path`` is not a folder, or holds no checkpoint file.
    """
    path = Path(path)
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if not path.is_dir():
        raise ValueError(f"{path}: not a folder of checkpoints or a run directory")
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES]
    if not files:
        raise ValueError(f"{folder}: no checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)})")
    key = lambda p: (epoch_from_name(p) is None, epoch_from_name(p) or 0, p.name)  # noqa: E731
    return [p for p in sorted(files, key=key) if (epoch_from_name(p) or 0) % every == 0]


def parse_metrics(metrics: Iterable[str]) -> list[str]:
    """Validate metric names (see the module docstring); keep order, drop duplicates.

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
    """
    out = []
    for m in metrics:
        m = m.strip()
        j = _LAMBDA.match(m)
        if m not in BASIC and not (j and int(j.group(1)) >= 2):
            raise ValueError(
                f"unknown metric {m!r}; choose from {', '.join(BASIC)} or lambda_2, lambda_3, ..."
            )
        if m not in out:
            out.append(m)
    if not out:
        raise ValueError("no metric asked for; e.g. metrics=['lambda_max', 'trace']")
    return out


def analyze_run(
    path: str | Path,
    metrics: Sequence[str] = ("loss", "accuracy", "lambda_max", "trace", "sam_sharpness"),
    *,
    model_factory: Callable[[], nn.Module],
    data: Iterable,
    loss_fn: Callable | None = None,
    every: int = 1,
    epochs: Collection[int] | None = None,
    out: str | Path | None | bool = None,
    device: Any = "cpu",
    dtype: torch.dtype | None = None,
    mode: str = "eval",
    tol: float = 1e-4,
    trace_matvecs: int = 99,
    sam_rho: float = 0.05,
    rho: float = 0.05,
    m: int | None = 128,
    steps: int = 1,
    kind: str = "worst",
    adaptive: bool = False,
    seed: int = 0,
    progress: bool = True,
    log=None,
) -> pd.DataFrame:
    """Measure every checkpoint of a folder; return (and write) a tidy table.

    Contract (other packages rely on it): ``analysis`` never imports ``saf``; the
    caller passes ``model_factory`` (a zero-argument callable returning a fresh
    ``nn.Module``) and ``data`` (iterable of ``(inputs, targets)`` batches).

    Args:
        path: a folder of ``.pt``/``.pth``/``.safetensors`` files (bare state dicts or
            dicts holding one under ``state_dict``/``model``), or a run directory
            (then ``path/checkpoints/`` is read).
        metrics: names from the module docstring.
        model_factory: builds the architecture; each checkpoint is loaded with
            ``load_state_dict(strict=True)``.
        data: the batches every metric uses (loss: mean over all samples).
        loss_fn: ``loss_fn(outputs, targets)``, a batch mean (default: cross-entropy).
        every: keep checkpoints whose epoch is a multiple of ``every``.
        epochs: keep only checkpoints of these epochs (default: all that ``every`` keeps).
        out: CSV path (default ``<path>/analysis.csv``; ``False``: write nothing and
            cache nothing). Finished results are cached in ``.<out name>.cache/``
            beside it, keyed by the checkpoint's content hash and every setting, and
            written atomically after each metric, so a rerun (also after SIGKILL)
            computes only what is missing.
        device, dtype, mode: as in :class:`HessianOperator`.
        tol: Lanczos tolerance for the ``lambda_*`` metrics.
        trace_matvecs: Hutch++ budget for ``trace``.
        sam_rho: radius of ``sam_sharpness``.
        rho, m, steps, kind, adaptive: settings of ``m_sharpness`` (see
            :func:`m_sharpness`; ``m=None`` uses the given batches).
        seed: seed of every random probe.
        progress: a tqdm bar over checkpoints (stderr).
        log: stream for skip messages (default ``sys.stderr``).

    Returns:
        The table (columns ``COLUMNS``); ``df.attrs["skipped"]`` lists
        ``(file name, reason)`` of the checkpoints that could not be used. A
        checkpoint with NaN/Inf weights gives NaN rows (status ``"nonfinite
        weights"``); a corrupt, unsafe or mismatched one is named on ``log``,
        skipped, and the rest analysed.
    """
    names = parse_metrics(metrics)
    files = find_checkpoints(path, every)
    if epochs is not None:
        files = [f for f in files if epoch_from_name(f) in set(epochs)]
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    data = reiterable(data)
    ctx = _Context(
        names=names,
        factory=model_factory,
        data=data,
        loss_fn=loss_fn,
        device=device,
        dtype=dtype,
        mode=mode,
        tol=tol,
        trace_matvecs=trace_matvecs,
        sam_rho=sam_rho,
        rho=rho,
        m=m,
        steps=steps,
        kind=kind,
        adaptive=adaptive,
        seed=seed,
    )
    settings = {k: getattr(ctx, k) for k in _KEYED}  # what the cached numbers depend on
    settings.update(
        n_lambda=sum(n.startswith("lambda_") and n != "lambda_min" for n in _expand(names)),
        loss=repr(loss_fn),
        arch=repr(model_factory()),
        data=_data_hash(data),
        dtype=str(dtype),
    )
    skey = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    if out is None:
        out = Path(path) / "analysis.csv"
    cache_dir = Path(out).parent / f".{Path(out).name}.cache" if out is not False else None
    rows, skipped = [], []
    for f in tqdm(files, desc="analyze", unit="ckpt", disable=not progress):
        got, reason = _one_checkpoint(f, ctx, cache_dir, skey)
        if reason:
            print(f"skipped {f.name}: {reason}", file=log or sys.stderr)
            skipped.append((f.name, reason))
        rows += [{"checkpoint": f.name, "epoch": epoch_from_name(f), **r} for r in got]
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df.attrs["skipped"] = skipped
    if out is not False:
        atomic_write_text(out, df.to_csv(index=False))
    return df


_KEYED = (
    "mode",
    "tol",
    "trace_matvecs",
    "sam_rho",
    "rho",
    "m",
    "steps",
    "kind",
    "adaptive",
    "seed",
)


@dataclass(frozen=True)
class _Context:
    """Everything one checkpoint's measurements need (shared by all checkpoints)."""

    names: Sequence[str]
    factory: Callable[[], nn.Module]
    data: Iterable
    loss_fn: Callable
    device: Any
    dtype: Any
    mode: str
    tol: float
    trace_matvecs: int
    sam_rho: float
    rho: float
    m: int | None
    steps: int
    kind: str
    adaptive: bool
    seed: int


def _data_hash(data: Iterable) -> str:
    """Content hash of every batch (shapes, dtypes and bytes), for the cache key."""
    h = hashlib.sha256()

    def feed(t):
        if isinstance(t, (tuple, list)):
            for u in t:
                feed(u)
            return
        t = t.detach().cpu().contiguous() if isinstance(t, torch.Tensor) else torch.as_tensor(t)
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())

    for batch in data:
        feed(batch)
    return h.hexdigest()[:16]


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _row(metric, value=math.nan, stderr=math.nan, status="ok", **extra) -> dict:
    return {
        "metric": metric,
        "value": float(value),
        "stderr": float(stderr),
        "status": status,
        "rho": math.nan,
        "m": math.nan,
        "kind": "",
        "steps": math.nan,
        "adaptive": "",
    } | extra


def _expand(names: list[str]) -> list[str]:
    """Row names in output order: ``lambda_j`` expands to lambda_max, lambda_2..lambda_K."""
    K = max([int(_LAMBDA.match(n).group(1)) for n in names if _LAMBDA.match(n)] or [1])
    out: list[str] = []
    for n in names:
        if n == "lambda_max" or _LAMBDA.match(n):
            if "lambda_max" not in out:
                out += ["lambda_max"] + [f"lambda_{j}" for j in range(2, K + 1)]
        else:
            out.append(n)
    return out


def _one_checkpoint(path: Path, ctx: _Context, cache_dir, skey) -> tuple[list[dict], str]:
    order = _expand(ctx.names)
    try:
        model = _load(path, ctx)
    except CheckpointError as e:
        reason = str(e).removeprefix(f"{path}: ")
        return [_row(n, status=reason) for n in order], reason
    if not all(
        torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()
    ):
        return [_row(n, status="nonfinite weights") for n in order], ""
    cfile = cache_dir / f"{_file_hash(path)}-{skey}.json" if cache_dir else None
    done = _read_cache(cfile)
    ops: dict = {}
    for group in _groups(ctx.names):
        if not all(n in done for n in group[1]):
            for r in _compute(group[0], model, ctx, ops):
                done[r["metric"]] = r
            if cfile:
                atomic_write_json(cfile, done)
    return [done[n] for n in order], ""


def _load(path: Path, ctx: _Context) -> nn.Module:
    sd = load_state_dict(path)
    model = ctx.factory()
    for k, ref in model.state_dict().items():  # load_state_dict would cast int/complex silently
        t = sd.get(k)
        if t is not None and (t.is_floating_point(), t.is_complex()) != (
            ref.is_floating_point(),
            ref.is_complex(),
        ):
            raise CheckpointError(f"{path}: {k} is {t.dtype}, the model expects {ref.dtype}")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(
            f"{path}: does not match the model ({' '.join(first[1:2]).strip()[:200]})"
        ) from None
    return model.to(ctx.device)


def _read_cache(cfile) -> dict:
    if cfile is None or not cfile.is_file():
        return {}
    try:
        return json.loads(cfile.read_text())
    except ValueError:
        return {}


def _groups(names: list[str]) -> list[tuple[str, list[str]]]:
    """(computation, row names it produces) in a stable order."""
    out = []
    lam = [n for n in _expand(names) if _LAMBDA.match(n) or n == "lambda_max"]
    for key, rows in [
        ("loss", ["loss", "accuracy"]),
        ("lambda", lam),
        ("lambda_min", ["lambda_min"]),
        ("trace", ["trace"]),
        ("sam_sharpness", ["sam_sharpness"]),
        ("m_sharpness", ["m_sharpness"]),
    ]:
        wanted = [r for r in rows if r in _expand(names)]
        if wanted:
            out.append((key, wanted))
    return out


def _compute(key: str, model: nn.Module, ctx: _Context, ops: dict) -> list[dict]:
    if key == "loss":
        return _loss_accuracy(model, ctx)
    if key in ("lambda", "lambda_min", "trace"):
        if "H" not in ops:
            ops["H"] = HessianOperator(
                model,
                ctx.loss_fn,
                ctx.data,
                mode=ctx.mode,
                dtype=ctx.dtype,
                device=ctx.device,
                cache="auto",
            )
        H = ops["H"]
        if key == "trace":
            t = hutchpp(H, ctx.trace_matvecs, seed=ctx.seed)
            return [_row("trace", t.value, t.stderr)]
        if key == "lambda_min":
            return [
                _row(
                    "lambda_min",
                    lanczos(H, 1, which="smallest", tol=ctx.tol, seed=ctx.seed).values[0],
                )
            ]
        names = dict(_groups(ctx.names))["lambda"]
        r = lanczos(H, len(names), tol=ctx.tol, seed=ctx.seed)
        return [_row(n, v) for n, v in zip(names, r.values.tolist(), strict=False)]
    if key == "sam_sharpness":
        rho, m, steps, kind, adaptive = ctx.sam_rho, None, 1, "worst", False
    else:
        rho, m, steps, kind, adaptive = ctx.rho, ctx.m, ctx.steps, ctx.kind, ctx.adaptive
    s = m_sharpness(
        model,
        ctx.loss_fn,
        ctx.data,
        rho,
        m,
        steps,
        kind,
        adaptive,
        dtype=ctx.dtype,
        device=ctx.device,
        seed=ctx.seed,
    )
    return [
        _row(
            key,
            s.value,
            s.stderr,
            rho=rho,
            m=math.nan if m is None else m,
            kind=kind,
            steps=steps,
            adaptive=str(adaptive),
        )
    ]


@torch.no_grad()
def _loss_accuracy(model: nn.Module, ctx: _Context) -> list[dict]:
    from analysis._functional import ParamSpace, model_mode

    space = ParamSpace(model, None, ctx.dtype, ctx.device)
    total = correct = n = 0.0
    labels = True
    with model_mode(model, ctx.mode):
        for batch in ctx.data:
            x, y, nb = space.batch(batch)
            out = space.forward(space.theta, x)
            total += float(ctx.loss_fn(out, y)) * nb
            labels &= out.ndim == 2 and not y.is_floating_point() and y.ndim == 1
            if labels:
                correct += float((out.argmax(1) == y).sum())
            n += nb
    acc = (
        _row("accuracy", correct / n)
        if labels
        else _row("accuracy", status="n/a: targets are not class labels")
    )
    return [_row("loss", total / n), acc]
