"""Analyse a folder of checkpoints into a tidy table, with a resumable on-disk cache.

Table contract (one row per checkpoint x metric; column and metric names are stable):

* ``checkpoint`` (file or model folder name), ``epoch`` (from the name or the file's
  own ``epoch`` field: :func:`analysis.io.checkpoint_epoch`; NaN when neither says),
  ``step`` (the training step the name states: ``step_N``, ``step=N``, a Trainer folder
  ``checkpoint-N``; :func:`analysis.io.checkpoint_step`; NaN otherwise), ``metric``,
  ``value``, ``stderr`` (NaN when n/a), ``status`` (``"ok"``, or why there is no value:
  the skip reason of an unreadable/mismatched checkpoint, ``"nonfinite weights"``,
  ``"n/a: ..."``),
* ``rho``, ``m``, ``kind``, ``steps``, ``adaptive``: the sharpness settings on the
  ``sam_sharpness``/``m_sharpness`` rows (NaN/empty elsewhere). ``m`` is NaN when the
  given batches were used as they are.
* ``matvecs``: Hessian-vector products the row's computation used (the one Lanczos run
  of all the ``lambda_*`` rows, ``lambda_min``, ``trace``; NaN elsewhere), and
  ``warm``: whether that Lanczos started from the previous checkpoint's vectors.

Metric names: ``loss``, ``accuracy``, ``lambda_max``, ``lambda_2`` .. ``lambda_k``
(asking for any ``lambda_j`` computes the top ``j`` in one Lanczos run and reports all of
them), ``lambda_min``, ``trace`` (Hutch++), ``sam_sharpness`` (one-step worst case,
rho = 0.05 by default, on the given batches: SAF paper Fig. 4b), ``m_sharpness``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import sys
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from analysis._eigen import jackknife
from analysis._functional import ParamSpace
from analysis._ggn import CURVATURES, curvature_operator
from analysis._hvp import HessianOperator
from analysis._lanczos import lanczos, warm_start_vector
from analysis._sharpness import m_sharpness
from analysis._trace import hutchpp
from analysis.batches import (
    Call,
    batch_mean,
    batch_size,
    loss_and_accuracy,
    model_mode,
    reiterable,
)
from analysis.io import (
    CheckpointError,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    checkpoint_step,
    exclusive,
    find_checkpoints,
    load_checkpoint,
    printable_name,
    safe_torch_load,
    uncompiled,
)
from analysis.losses import check_loss, loss_function

BASIC = ("loss", "accuracy", "lambda_max", "lambda_min", "trace", "sam_sharpness", "m_sharpness")
COLUMNS = ("checkpoint", "epoch", "step", "metric", "value", "stderr", "status",
           "rho", "m", "kind", "steps", "adaptive", "matvecs", "warm")  # fmt: skip
_LAMBDA = re.compile(r"lambda_(\d+)$")


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


@dataclass(frozen=True)
class AnalysisSettings:
    r"""How :func:`analyze_run` measures every metric; all of it keys the result cache.

    Attributes:
        mode: ``"eval"`` (BatchNorm running statistics, dropout off) or ``"train"``.
        dtype: compute dtype, e.g. ``torch.float64`` (None: the model's).
        tol: Lanczos tolerance of the ``lambda_*`` metrics.
        trace_matvecs: Hutch++ budget of ``trace``.
        sam_rho: radius of ``sam_sharpness``.
        rho, m, steps, kind, adaptive: settings of ``m_sharpness`` (see
            :func:`analysis.m_sharpness`; ``m=None`` uses the given batches).
        seed: seed of every random probe.
        lambda_se_groups: with :math:`G \ge 2`, the ``lambda_*`` rows get a ``stderr``, the
            delete-a-group jackknife over :math:`G` groups of the batches (see
            :func:`analysis.hessian_eigenvalues`; :math:`G` more solves, warm-started).
        warm_start: start each checkpoint's top-eigenvalue Lanczos (the ``lambda_*``
            metrics) from the Ritz vectors of the checkpoint before it, mixed with the
            cold start vector (:func:`warm_start_vector`): consecutive epochs change
            slowly, so fewer products reach the same tolerance. The stopping bound is the
            same, so the values agree with cold starts within ``tol``.
        curvature: the matrix of the ``lambda_*`` and ``trace`` metrics: ``"hessian"``,
            ``"ggn"`` (Gauss–Newton) or ``"fisher"`` (empirical Fisher;
            :func:`analysis.curvature_operator`).
    """

    mode: str = "eval"
    dtype: torch.dtype | None = None
    tol: float = 1e-4
    trace_matvecs: int = 99
    sam_rho: float = 0.05
    rho: float = 0.05
    m: int | None = 128
    steps: int = 1
    kind: str = "worst"
    adaptive: bool = False
    seed: int = 0
    lambda_se_groups: int = 0
    warm_start: bool = False
    curvature: str = "hessian"

    def __post_init__(self) -> None:
        if self.mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train', got {self.mode!r}")
        if self.kind not in ("worst", "average"):
            raise ValueError(f"kind must be 'worst' or 'average', got {self.kind!r}")
        for name in ("tol", "sam_rho", "rho"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        if self.trace_matvecs < 3 or self.steps < 1 or (self.m is not None and self.m < 1):
            raise ValueError("trace_matvecs must be >= 3, steps >= 1 and m >= 1 (or None)")
        if self.curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {self.curvature!r}")
        if self.lambda_se_groups == 1 or self.lambda_se_groups < 0:
            raise ValueError(f"lambda_se_groups must be 0 or >= 2, got {self.lambda_se_groups}")

    def key(self) -> dict:
        """The settings as JSON-ready values (part of the cache key). Options added later
        are left out at their defaults, so caches written before them stay valid."""
        later = {"lambda_se_groups": 0, "warm_start": False, "curvature": "hessian"}
        kept = {k: v for k, v in asdict(self).items() if later.get(k, object()) != v}
        return {**kept, "dtype": str(self.dtype)}


@dataclass(frozen=True)
class _Job:
    """What every checkpoint of one :func:`analyze_run` call is measured with."""

    names: Sequence[str]
    factory: Callable[[], nn.Module]
    data: Iterable
    loss_fn: Callable
    device: Any
    s: AnalysisSettings
    call: Call
    key: str | None
    prefix: str | None = None


def analyze_run(
    path: str | Path,
    metrics: Sequence[str] = ("loss", "accuracy", "lambda_max", "trace", "sam_sharpness"),
    *,
    model_factory: Callable[[], nn.Module],
    data: Iterable,
    loss_fn: Callable | str | None = None,
    settings: AnalysisSettings | None = None,
    every: int = 1,
    epochs: Collection[int] | None = None,
    out: str | Path | None | bool = None,
    device: Any = "cpu",
    progress: bool = True,
    log=None,
    forward_fn: Callable | None = None,
    output_fn: Callable | None = None,
    key: str | None = None,
    epoch_regex: str | None = None,
    strip_prefix: str | None = None,
) -> pd.DataFrame:
    """Measure every checkpoint of a folder; return (and write) a tidy table.

    The caller passes ``model_factory`` (a zero-argument callable returning a fresh
    ``nn.Module``) and ``data`` (iterable of ``(inputs, targets)`` batches, the
    :mod:`analysis.batches` convention); nothing here knows the trainer.

    Args:
        path: a folder of checkpoint files or model folders (Hugging Face
            ``save_pretrained``, Trainer ``checkpoint-N/``; see
            :func:`analysis.io.find_checkpoints`), or a run directory (then
            ``path/checkpoints/`` is read). Rows come in epoch, then step order.
        metrics: names from the module docstring.
        model_factory: builds the architecture (a ``torch.compile`` wrapper is measured
            as the module inside); each checkpoint is loaded strictly
            (:func:`analysis.io.load_checkpoint`: keys matched under any wrapper's prefix,
            tied weights the file leaves out taken from their twin).
        data: the batches every metric uses (loss: mean over all samples).
        loss_fn: ``loss_fn(outputs, targets)``, a batch mean, or a name of
            :data:`analysis.losses.LOSSES` (default: cross-entropy). It is checked against
            the data on the first batch before any work (:func:`analysis.losses.check_loss`).
        settings: how each metric is measured (:class:`AnalysisSettings`).
        every: keep checkpoints whose epoch is a multiple of ``every``.
        epochs: keep only checkpoints of these epochs (default: all that ``every`` keeps).
        out: CSV path (default ``<path>/analysis.csv``; ``False``: write nothing and
            cache nothing). Finished results are cached in ``.<out name>.cache/``
            beside it, keyed by the checkpoint's content hash and every setting, and
            written atomically after each metric, so a rerun (also after SIGKILL)
            computes only what is missing. With ``settings.warm_start`` the cache also
            keeps the last computed checkpoint's Ritz vectors, so a resumed run starts
            where the killed one would have (the same numbers, bit for bit).
        device: where to compute.
        progress: a tqdm bar over checkpoints (stderr).
        log: stream for skip messages (default ``sys.stderr``).
        forward_fn, output_fn: hooks for models outside the batch convention
            (:class:`analysis.batches.Call`).
        key: where each file keeps its state dict (see :func:`analysis.io.load_state_dict`;
            default: found among :data:`analysis.io.STATE_KEYS`).
        epoch_regex: a regular expression whose first group is the epoch in a file name
            (default: :func:`analysis.io.checkpoint_epoch`).
        strip_prefix: the prefix to remove from every key (``"net."``; default: the one
            that makes the keys match the model's, :func:`analysis.io.match_prefix`).

    Returns:
        The table (columns ``COLUMNS``: ``epoch`` and ``step`` say which index a
        checkpoint's name or file gives, NaN where it gives none; the module docstring);
        with a token loss (``"lm"``), ``loss`` and ``accuracy`` are means over the counted
        tokens. ``df.attrs["skipped"]`` lists
        ``(file name, reason)`` of the checkpoints that could not be used. A
        checkpoint with NaN/Inf weights gives NaN rows (status ``"nonfinite
        weights"``); a corrupt, unsafe or mismatched one is named on ``log``,
        skipped, and the rest analysed.

    Raises:
        ValueError: before any work, when the loss does not fit the data, or a metric asks
            for more than the data or the model has (``m`` above the sample count,
            ``lambda_K`` above the parameter count).
    """
    names = parse_metrics(metrics)
    s = settings or AnalysisSettings()
    odd: list = []
    files = find_checkpoints(path, every, epoch_regex, notes=odd)
    if epochs is not None:
        files = [(e, f) for e, f in files if e in set(epochs)]
    loss_fn = loss_function(loss_fn) if loss_fn is not None else nn.CrossEntropyLoss()
    data = reiterable(data)

    def factory() -> nn.Module:  # a torch.compile wrapper: the module inside
        return uncompiled(model_factory())

    call = Call(forward_fn, output_fn)
    job = _Job(names, factory, data, loss_fn, device, s, call, key, strip_prefix)
    _check_fit(job)
    n_batches = sum(1 for _ in data) if s.lambda_se_groups else 0
    if s.lambda_se_groups > n_batches and any(_LAMBDA.match(n) or n == "lambda_max" for n in names):
        raise ValueError(f"lambda_se_groups={s.lambda_se_groups} needs at least that many "
                         f"batches, got {n_batches}; pass smaller batches")  # fmt: skip
    key = {  # what the cached numbers depend on
        **s.key(),
        "n_lambda": sum(n.startswith("lambda_") and n != "lambda_min" for n in _expand(names)),
        "loss": _describe(loss_fn),
        "hooks": [_describe(forward_fn), _describe(output_fn)],
        "arch": repr(factory()),
        "data": _data_hash(data),
    }
    skey = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    if out is None:
        out = Path(path) / "analysis.csv"
    cache_dir = Path(out).parent / f".{Path(out).name}.cache" if out is not False else None
    lock = exclusive(Path(out).parent / f".{Path(out).name}.lock", str(out)) if out else None
    with lock or contextlib.nullcontext():  # one writer per table (and its cache)
        rows, skipped = [], list(odd)
        odd = [(printable_name(name), why) for name, why in odd]
        for name, why in odd:
            print(f"skipped {name}: {why}", file=log or sys.stderr)
        warm = _Warm(cache_dir / f"warm-{skey}.pt" if cache_dir else None) if s.warm_start else None
        for epoch, f in tqdm(files, desc="analyze", unit="ckpt", disable=not progress):
            got, reason = _one_checkpoint(f, job, cache_dir, skey, warm)
            name = printable_name(f.name)  # the table is UTF-8, one line per row
            if reason:
                reason = printable_name(reason)
                got = [{**r, "status": printable_name(r["status"])} for r in got]
                print(f"skipped {name}: {reason}", file=log or sys.stderr)
                skipped.append((name, reason))
            step = checkpoint_step(f)
            rows += [{"checkpoint": name, "epoch": epoch, "step": step, **r} for r in got]
        df = pd.DataFrame(rows, columns=list(COLUMNS))
        df.attrs["skipped"] = skipped
        if out is not False:
            atomic_write_text(out, df.to_csv(index=False))
    return df


def _check_fit(job: _Job) -> None:
    """The loss against the data, on the first batch through a freshly built model; the
    metrics' sizes against the data's and the model's."""
    first = next(iter(job.data), None)
    if first is None:
        raise ValueError("data has no batches; pass at least one (inputs, targets) batch")
    model = job.factory()
    space = ParamSpace(model, None, job.s.dtype, "cpu", job.call)
    _check_sizes(job, space.n)
    with torch.no_grad(), model_mode(model, "eval"):
        b = space.batch(first)
        try:
            out = space.output(space.theta, b)
        except Exception as e:  # shapes, dtypes, a forward of the caller's own
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ValueError(f"the model does not run on the data's first batch: {why}") from None
        check_loss(job.loss_fn, out, b[1])


def _check_sizes(job: _Job, n_params: int) -> None:
    """``m`` within the samples and ``lambda_K`` within the parameters, else one line."""
    K = sum(_LAMBDA.match(n) is not None or n == "lambda_max" for n in _expand(job.names))
    if n_params < K:
        raise ValueError(
            f"lambda_{K} asks for {K} eigenvalues of a model with {n_params} parameters; "
            f"ask for at most lambda_{n_params}"
        )
    m = job.s.m
    if "m_sharpness" in job.names and m is not None:
        n = sum(batch_size(b) for b in job.data)
        if m > n:
            raise ValueError(
                f"m_sharpness: m={m} (--m) is more than the {n} samples of the data; "
                f"choose m <= {n} or pass more data"
            )


def _describe(fn: Any) -> str:
    """A name for the cache key that is the same in every process (a function's repr holds
    its address)."""
    if fn is None:
        return ""
    name = getattr(fn, "__qualname__", None)
    return f"{fn.__module__}.{name}" if name and hasattr(fn, "__module__") else repr(fn)


def _data_hash(data: Iterable) -> str:
    """Content hash of every batch (shapes, dtypes and bytes), for the cache key."""
    h = hashlib.sha256()

    def feed(t):
        if isinstance(t, Mapping):
            for k in sorted(t):
                h.update(str(k).encode())
                feed(t[k])
            return
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
        "matvecs": math.nan,
        "warm": "",
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


class _Warm:
    """The Ritz vectors of the last checkpoint whose top eigenvalues were computed, by the
    content hash of that checkpoint; kept in memory and (atomically) in ``path``."""

    def __init__(self, path: Path | None):
        self.path, self.source, self.vectors = path, None, None
        self.previous: str | None = None  # hash of the checkpoint before the current one

    def start(self) -> torch.Tensor | None:
        """The previous checkpoint's vectors, if they are at hand."""
        if self.previous is None:
            return None
        if self.source != self.previous and self.path is not None and self.path.is_file():
            try:
                saved = safe_torch_load(self.path)
                self.source, self.vectors = saved["source"], saved["vectors"]
                if not (isinstance(self.vectors, torch.Tensor) and self.vectors.dim() == 2):
                    raise ValueError("not a (k, n) tensor of vectors")
            except Exception:  # an unreadable file or another shape: start cold
                self.source = self.vectors = None
        return self.vectors if self.source == self.previous else None

    def keep(self, source: str, vectors: torch.Tensor) -> None:
        self.source, self.vectors = source, vectors.detach().cpu()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save({"source": source, "vectors": self.vectors}, self.path)


def _one_checkpoint(
    path: Path, job: _Job, cache_dir, skey, warm: _Warm | None = None
) -> tuple[list[dict], str]:
    hasher = hashlib.sha256()  # fed the very bytes loaded: one opened file per file
    order = _expand(job.names)
    casts: list = []
    try:
        model = load_checkpoint(job.factory(), path, job.key, casts, job.prefix, hasher)
    except CheckpointError as e:
        if warm is not None:
            warm.previous = ""
        reason = str(e).removeprefix(f"{path}: ")
        return [_row(n, status=reason) for n in order], reason
    fhash = hasher.hexdigest()[:16]
    try:
        return _measure(path, model.to(job.device), fhash, job, cache_dir, skey, warm, casts)
    finally:
        if warm is not None:
            warm.previous = fhash


def _measure(
    path: Path, model: nn.Module, fhash: str, job: _Job, cache_dir, skey, warm, casts: list
) -> tuple[list[dict], str]:
    order = _expand(job.names)
    if casts:
        kinds = sorted({f"{a} -> {b}".replace("torch.", "") for _, a, b in casts})
        print(f"note {path.name}: {len(casts)} tensors cast ({', '.join(kinds)})", file=sys.stderr)
    if not all(
        torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()
    ):
        return [_row(n, status="nonfinite weights") for n in order], ""
    cfile = cache_dir / f"{fhash}-{skey}.json" if cache_dir and fhash else None
    done = _read_cache(cfile)
    ops: dict = {}
    for group in _groups(job.names):
        if not all(n in done for n in group[1]):
            try:
                rows = _compute(group[0], model, job, ops, warm, fhash)
            except Exception as e:  # the model's forward, a shape, a dtype: this file's skip
                why = (str(e).strip().splitlines() or [""])[0][:200]
                reason = f"failed while computing {group[0]}: {type(e).__name__}: {why}"
                return [done.get(n) or _row(n, status=reason) for n in order], reason
            for r in rows:
                done[r["metric"]] = r
            if cfile:
                atomic_write_json(cfile, done)
    return [done[n] for n in order], ""


def _read_cache(cfile) -> dict:
    """The cached rows ``{metric: row}``; anything else (damaged, another shape) is no cache."""
    if cfile is None or not cfile.is_file():
        return {}
    try:
        done = json.loads(cfile.read_text())
    except (ValueError, RecursionError):
        return {}
    if not isinstance(done, dict):
        return {}
    return {k: r for k, r in done.items() if isinstance(r, dict) and r.get("metric") == k}


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


def _compute(key: str, model: nn.Module, job: _Job, ops: dict, warm=None, fhash="") -> list[dict]:
    s = job.s
    if key == "loss":
        return _loss_accuracy(model, job)
    if key in ("lambda", "lambda_min", "trace"):

        def operator(data) -> HessianOperator:
            return curvature_operator(
                s.curvature, model, job.loss_fn, data, mode=s.mode, dtype=s.dtype,
                device=job.device, cache="auto", forward_fn=job.call.forward_fn,
                output_fn=job.call.output_fn,
            )  # fmt: skip

        if "H" not in ops:
            ops["H"] = operator(job.data)
        H = ops["H"]
        if key == "trace":
            t = hutchpp(H, s.trace_matvecs, seed=s.seed)
            return [_row("trace", t.value, t.stderr, matvecs=t.n_matvecs)]
        if key == "lambda_min":
            r = lanczos(H, 1, which="smallest", tol=s.tol, seed=s.seed)
            return [_row("lambda_min", r.values[0], matvecs=r.n_matvecs, warm="False")]
        names = dict(_groups(job.names))["lambda"]
        old = warm.start() if warm is not None else None
        fits = old is not None and old.shape[-1] == H.n_params
        v0 = warm_start_vector(old, s.seed) if fits else None
        k = len(names)
        r = lanczos(H, k, tol=s.tol, seed=s.seed, v0=v0)
        if warm is not None:
            warm.keep(fhash, r.vectors)
        if s.lambda_se_groups:
            part = lambda b, start: lanczos(operator(b), k, tol=s.tol, seed=s.seed, v0=start)  # noqa: E731
            r = jackknife(r, part, list(job.data), s.lambda_se_groups, s.seed)
        se = r.stderr.tolist() if r.stderr is not None else [math.nan] * len(r.values)
        extra = dict(matvecs=r.n_matvecs, warm=str(v0 is not None))
        values = zip(names, r.values.tolist(), se, strict=False)
        return [_row(n, v, e, **extra) for n, v, e in values]
    if key == "sam_sharpness":
        rho, m, steps, kind, adaptive = s.sam_rho, None, 1, "worst", False
    else:
        rho, m, steps, kind, adaptive = s.rho, s.m, s.steps, s.kind, s.adaptive
    r = m_sharpness(
        model, job.loss_fn, job.data, rho, m, steps, kind, adaptive, dtype=s.dtype,
        device=job.device, seed=s.seed, forward_fn=job.call.forward_fn,
        output_fn=job.call.output_fn,
    )  # fmt: skip
    extra = dict(rho=rho, m=math.nan if m is None else m, kind=kind, steps=steps)
    return [_row(key, r.value, r.stderr, adaptive=str(adaptive), **extra)]


@torch.no_grad()
def _loss_accuracy(model: nn.Module, job: _Job) -> list[dict]:
    space = ParamSpace(model, None, job.s.dtype, job.device, job.call)

    def one(batch):
        b = space.batch(batch)
        return loss_and_accuracy(job.loss_fn, space.output(space.theta, b), b[1])

    with model_mode(model, job.s.mode):
        loss, acc = batch_mean(one, job.data, loss_fn=job.loss_fn).tolist()
    if math.isnan(acc):
        return [_row("loss", loss), _row("accuracy", status="n/a: targets are not class labels")]
    return [_row("loss", loss), _row("accuracy", acc)]
