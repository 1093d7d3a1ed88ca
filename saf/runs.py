"""The run directory: a self-describing record of one training run.

Layout (format ``saf-run/1``)::

    RUN_DIR/
      run.json                 method, every hyperparameter, model {"name", "kwargs"},
                               data {"name", "data_dir", "num_classes", "in_shape"}, seed,
                               device, package versions, "format": "saf-run/1"
      metrics.csv              one row per completed epoch (columns: METRIC_COLUMNS)
      checkpoints/epoch_0000.pt  initial weights; epoch_000e.pt after e completed epochs:
                               ``model.state_dict()`` only (loadable with weights_only=True)
      state.pt                 resume state (optimizer, scheduler, store, EMA, RNG, epoch);
                               plain tensors/dicts/lists/numbers, weights_only-loadable

Every file is written atomically (:mod:`analysis.io`); at an epoch boundary the checkpoint
and metrics are written before ``state.pt``, so a crash leaves a consistent resume point.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from analysis.io import atomic_torch_save, atomic_write_json, atomic_write_text, safe_torch_load
from saf.config import is_spec
from saf.data import DATASETS
from saf.models import MODELS, build_model

FORMAT = "saf-run/1"
METRIC_COLUMNS = (
    "epoch", "train_ce", "traj_loss", "train_loss", "train_acc",
    "test_loss", "test_acc", "lr", "seconds", "images_per_s",
)  # fmt: skip
REQUIRED = ("format", "method", "model", "data", "seed", "hparams")
OPTIONAL = ("device", "versions", "config")


def checkpoint_path(run_dir, epoch: int) -> Path:
    """``RUN_DIR/checkpoints/epoch_{epoch:04d}.pt``."""
    return Path(run_dir) / "checkpoints" / f"epoch_{epoch:04d}.pt"


RUN_JSON_MAX_BYTES = 1 << 20
"""The largest ``run.json`` read (ours are about 2 KB)."""


def regular_file(path: str | Path) -> os.stat_result:
    """``path``'s stat, refused (ValueError) when it is not a regular file: a FIFO would
    block its reader forever, a device never end. OSError (absent, unreadable) passes on."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("not a regular file")
    return st


def _read_json(path: Path) -> Any:
    """A small JSON file, refused (ValueError) when it is not a regular file
    (:func:`regular_file`), larger than :data:`RUN_JSON_MAX_BYTES`, or nested too deeply."""
    st = regular_file(path)  # FileNotFoundError: the caller says what is missing
    if st.st_size > RUN_JSON_MAX_BYTES:
        raise ValueError(f"{st.st_size} bytes, more than a run description's {RUN_JSON_MAX_BYTES}")
    try:
        with open(path, "rb") as f:
            return json.loads(f.read(RUN_JSON_MAX_BYTES + 1))
    except RecursionError:  # json nests by recursion: a file of deep brackets
        raise ValueError("nested too deeply") from None


def is_run_dir(path) -> bool:
    """True when ``path`` is a folder holding a ``run.json`` of this format."""
    try:
        return _read_json(Path(path) / "run.json").get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _load_json(run_dir) -> tuple[Path, dict]:
    path = Path(run_dir) / "run.json"
    try:
        run = _read_json(path)
    except FileNotFoundError:
        raise ValueError(
            f"{path}: not found; is {run_dir} a run directory of `saf train`?"
        ) from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None
    if not isinstance(run, dict) or run.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} run description")
    return path, run


def _unusable(run: dict, custom_ok: bool = False) -> str | None:
    """Why the run's model and data cannot be rebuilt from it (None when they can).

    A model or data set that was the caller's own code is only named in the file: it is
    never imported from it (``custom_ok``: accept that, the caller brings the code)."""
    missing = [k for k in ("model", "data") if k not in run]
    if missing:
        return f"missing fields {missing}"
    model, data = run["model"], run["data"]
    for what, d in (("model", model), ("data", data)):
        name = d.get("name") if isinstance(d, dict) else None
        if is_spec(name) and not custom_ok:
            return f"the run's {what} is your own code ({name}); give --{what} to rebuild it"
    if custom_ok and isinstance(model, dict) and is_spec(model.get("name")):
        model = {**model, "name": next(iter(MODELS))}  # checked by the caller's own factory
    if custom_ok and isinstance(data, dict) and is_spec(data.get("name")):
        data = {**data, "name": DATASETS[0]}
    if not (isinstance(model, dict) and isinstance(model.get("name"), str)
            and model["name"] in MODELS and isinstance(model.get("kwargs"), dict)):  # fmt: skip
        return f"model must be {{'name': one of {', '.join(MODELS)}, 'kwargs': {{...}}}}"
    shape = data.get("in_shape") if isinstance(data, dict) else None
    if not (isinstance(data, dict) and isinstance(data.get("name"), str)
            and data["name"] in DATASETS
            and _positive_int(data.get("num_classes")) and isinstance(shape, list)
            and shape and all(map(_positive_int, shape))):  # fmt: skip
        return (
            f"data needs name (one of {', '.join(DATASETS)}), num_classes and in_shape "
            "(integers >= 1)"
        )
    return None


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def read_run(run_dir, custom_ok: bool = False) -> dict:
    """Read and validate ``RUN_DIR/run.json`` (every required key, a buildable model).

    Args:
        custom_ok: accept a model or data set named as code (``pkg.mod:fn``), which the
            caller rebuilds itself (it is never imported from the file).

    Raises:
        ValueError: missing, unreadable or incomplete file (the message names it).
    """
    path, run = _load_json(run_dir)
    missing = [k for k in REQUIRED if k not in run]
    why = f"missing fields {missing}" if missing else _unusable(run, custom_ok)
    if why:
        raise ValueError(f"{path}: {why}")
    return run


def read_run_lenient(run_dir) -> tuple[dict | None, str | None, list[str]]:
    """``run.json`` for tools that need only its model and data descriptions.

    Returns:
        ``(run, error, notes)``: ``run`` is None and ``error`` says why when the model or
        data cannot be rebuilt from it; ``notes`` name other missing or unknown keys.

    Raises:
        ValueError: no readable ``run.json`` of this format.
    """
    path, run = _load_json(run_dir)
    why = _unusable(run)
    if why:
        return None, f"{path}: {why}", []
    missing = sorted(set(REQUIRED) - set(run))
    unknown = sorted(set(run) - set(REQUIRED) - set(OPTIONAL))
    parts = [f"{what} keys {keys}" for what, keys in (("missing", missing), ("unknown", unknown))
             if keys]  # fmt: skip
    return run, None, [f"{path}: {', '.join(parts)} (ignored)"] if parts else []


def write_run(run_dir, run: dict) -> None:
    """Write ``run.json`` atomically (adds the format tag)."""
    atomic_write_json(Path(run_dir) / "run.json", {**run, "format": FORMAT})


def model_from_run(run: dict | str | Path) -> nn.Module:
    """The run's architecture, freshly built (weights are *not* loaded).

    Args:
        run: a dict from :func:`read_run`, or a run directory.
    """
    run = run if isinstance(run, dict) else read_run(run)
    d = run["data"]
    return build_model(
        run["model"]["name"], d["num_classes"], tuple(d["in_shape"]), **run["model"]["kwargs"]
    )


def list_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """``[(epoch, path), ...]`` of ``RUN_DIR/checkpoints/epoch_*.pt``, sorted by epoch."""
    out = []
    for p in (Path(run_dir) / "checkpoints").glob("epoch_*.pt"):
        try:
            out.append((int(p.stem.split("_", 1)[1]), p))
        except ValueError:
            continue
    return sorted(out)


def read_metrics(run_dir) -> pd.DataFrame:
    """``metrics.csv`` as a DataFrame (an empty frame with the columns if none yet).

    A damaged file (unparsable, other columns, missing or non-numeric values, epochs not
    1..n) is named on stderr and replaced by the copy of its rows kept in ``state.pt``.

    Raises:
        ValueError: damaged, and no readable ``state.pt`` to rebuild it from.
    """
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return pd.DataFrame(columns=list(METRIC_COLUMNS))
    try:
        return _checked_metrics(pd.read_csv(path))
    except ValueError as e:  # pandas' parser errors are ValueErrors too
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
    try:
        rows = load_state(run_dir)["metrics"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: damaged ({why}) and no state.pt to rebuild it from") from None
    print(f"saf: warning: {path}: damaged ({why}); using the rows kept in state.pt",
          file=sys.stderr)  # fmt: skip
    return pd.DataFrame(rows, columns=list(METRIC_COLUMNS))


def _checked_metrics(m: pd.DataFrame) -> pd.DataFrame:
    if list(m.columns) != list(METRIC_COLUMNS):
        raise ValueError(f"columns {list(m.columns)}, expected {list(METRIC_COLUMNS)}")
    numeric = len(m) == 0 or all(pd.api.types.is_numeric_dtype(m[c]) for c in m)
    if m.isna().any().any() or not numeric:
        raise ValueError("missing or non-numeric values")
    if m["epoch"].tolist() != list(range(1, len(m) + 1)):
        raise ValueError(f"epochs {m['epoch'].tolist()} are not 1..{len(m)}")
    return m


def write_metrics(run_dir, rows: list[dict]) -> None:
    """Rewrite ``metrics.csv`` atomically from all rows so far."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(METRIC_COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r[k] for k in METRIC_COLUMNS})
    atomic_write_text(Path(run_dir) / "metrics.csv", buf.getvalue())


def save_checkpoint(run_dir, epoch: int, model: nn.Module) -> Path:
    """Write the weights after ``epoch`` completed epochs (CPU tensors, state dict only)."""
    path = checkpoint_path(run_dir, epoch)
    atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    return path


def save_state(run_dir, state: dict) -> None:
    """Write the resume state ``state.pt`` atomically."""
    atomic_torch_save(state, Path(run_dir) / "state.pt")


def load_state(run_dir) -> dict:
    """Read ``state.pt`` with ``weights_only=True``."""
    return safe_torch_load(Path(run_dir) / "state.pt")
