"""Atomic writes and safe checkpoint reading, shared by every package.

Three promises live here:

* **Atomic writes.** Every file is written to a temporary sibling, flushed,
  fsynced and moved over the target with :func:`os.replace`. A crash (even
  SIGKILL) leaves either the old file or the new one, never half of one.
* **A checkpoint is data, never code.** :func:`load_state_dict` uses
  ``torch.load(..., weights_only=True)`` (or safetensors), so a pickle that
  would run code is refused before anything runs.
* **A checkpoint fits its model or is refused**, naming why: :func:`load_checkpoint`
  loads strictly and never casts an integer tensor to float or back.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unsafe, corrupt, truncated or mismatched."""


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path``; on success, move it over ``path``.

    Args:
        path: final destination.
        mode: ``"wb"`` or ``"w"``.

    Yields:
        The open temporary file. If the block raises, the temporary file is
        removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # mkstemp makes 0600; honour the umask
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _sweep_stale_temps(path)


_STALE_S = 600.0  # a temporary file untouched this long has lost its writer (e.g. SIGKILL)


def _sweep_stale_temps(path: Path) -> None:
    """Remove temporary siblings of ``path`` left by a killed writer.

    A live writer keeps touching its file; one untouched for ``_STALE_S`` seconds
    belongs to a process that died between ``mkstemp`` and ``os.replace``.
    """
    now = time.time()
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):  # gone already, or not ours to remove
            if now - tmp.stat().st_mtime > _STALE_S:
                tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (serialised in memory first)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_with(path: str | os.PathLike, writer: Callable[[IO[bytes]], None]) -> None:
    """Call ``writer(file)`` on a temporary file, then move it over ``path``."""
    with atomic_open(path, "wb") as f:
        writer(f)


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``; any failure becomes a CheckpointError.

    Raises:
        CheckpointError: the file is missing, empty, truncated, corrupt, or a
            pickle that asks for code (refused before anything runs).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            msg = "refused: the file asks to run code (not a plain weights file)"
        raise CheckpointError(f"{path}: {msg}") from None


def load_state_dict(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, torch.Tensor]:
    """Load a model state dict from ``.pt``/``.pth``/``.safetensors``, safely.

    Accepts a bare state dict or a dict holding one under ``"state_dict"``,
    ``"model"`` or ``"model_state"``. A ``"module."`` prefix (DataParallel/DDP)
    is stripped.

    Raises:
        CheckpointError: unsafe, unreadable, or no tensor state dict inside.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(
                f"{path}: reading .safetensors needs the 'safetensors' package "
                "(pip install safetensors)"
            ) from None
        try:
            obj: Any = load_file(str(path), device=str(map_location))
        except Exception as e:
            raise CheckpointError(f"{path}: {str(e).splitlines()[0] if str(e) else e!r}") from None
    else:
        obj = safe_torch_load(path, map_location)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: no state dict inside (got {type(obj).__name__})")
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the checkpoint at ``path`` into ``model`` (strictly) and return the model.

    Raises:
        CheckpointError: unreadable or unsafe (:func:`load_state_dict`), a tensor whose
            kind (floating, complex, integer) differs from the model's, or missing,
            unexpected or mis-shaped keys.
    """
    sd = load_state_dict(path)
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
    return model


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
