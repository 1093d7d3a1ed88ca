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
import pickletools
import re
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks
    fcntl = None

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")
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


@contextlib.contextmanager
def exclusive(lock: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on the file ``lock`` (created) for the block: one writer of
    ``what`` at a time. The lock dies with its process (even after SIGKILL).

    Raises:
        ValueError: another process holds it (one line naming ``what``).
    """
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ValueError(
                    f"{what} is being written by another process; wait for it to finish or "
                    "choose another --out"
                ) from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


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


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
    ("torch", "device"),
    ("builtins", "set"),
    ("__builtin__", "set"),
    ("builtins", "frozenset"),
    ("__builtin__", "frozenset"),
    ("_codecs", "encode"),  # protocol-2 bytes: as large as the text in the file, no larger
}


def _allowed(module: str, name: str) -> bool:
    """Globals a checkpoint of tensors, numbers, strings and containers may name; nothing
    that builds an object of a size chosen in the file (``bytearray(3 * 2**30)``)."""
    if (module, name) in _ALLOWED_GLOBALS:
        return True
    attr = getattr(torch, name, None) if module == "torch" else None
    storage = isinstance(attr, type) and issubclass(
        attr, torch.storage._StorageBase | torch.storage.TypedStorage
    )
    return isinstance(attr, torch.dtype) or storage


def _refused_global(path: Path) -> str | None:
    """The first global of ``path``'s pickle outside :func:`_allowed`, scanned as opcodes
    (nothing is built); None for a clean file or one that is not a torch zip archive."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("data.pkl")]
            if len(names) != 1 or z.getinfo(names[0]).file_size > 2**30:
                return None if not names else "an oversized or ambiguous pickle"
            data = z.read(names[0])
    except (zipfile.BadZipFile, OSError):
        return None  # the legacy format, or not a checkpoint: torch.load decides
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(arg)
            elif op.name in ("GLOBAL", "INST"):
                module, _, name = arg.partition(" ")
                if not _allowed(module, name):
                    return f"{module}.{name}"
            elif op.name == "STACK_GLOBAL" and (
                len(strings) < 2 or not _allowed(strings[-2], strings[-1])
            ):
                return ".".join(strings[-2:]) or "a computed global"
    except Exception:  # a malformed pickle: torch.load names it
        return None
    return None


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``, after a scan of the pickle's opcodes that
    refuses any global but tensors, containers, numbers and strings need (so nothing is
    built at a size the file chooses); any failure becomes a CheckpointError.

    Raises:
        CheckpointError: the file is missing, empty, truncated, corrupt, or a
            pickle that asks for code (refused before anything runs).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    refused = _refused_global(path)
    if refused:
        raise CheckpointError(
            f"{path}: refused: the file asks to build {refused} (not a plain weights file)"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            msg = "refused: the file asks to run code (not a plain weights file)"
        raise CheckpointError(f"{path}: {msg}") from None


STATE_KEYS = ("state_dict", "model", "model_state_dict", "net", "ema", "module", "model_state")
"""Keys under which checkpoints nest their state dict, tried in this order (Lightning's
``.ckpt`` files use ``state_dict``)."""
PREFIXES = ("module.", "model.", "_orig_mod.")
"""Key prefixes stripped where that makes the keys match the model: DataParallel/DDP,
Lightning's ``LightningModule`` attribute, ``torch.compile``."""


def load_state_dict(
    path: str | os.PathLike,
    map_location: Any = "cpu",
    key: str | None = None,
    model: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """A model state dict from a ``.pt``, ``.pth``, ``.ckpt`` or ``.safetensors`` file, safely.

    The file may hold the state dict itself or nest it under one of :data:`STATE_KEYS`
    (``key`` chooses one, dotted for deeper levels: ``"ema.module"``). With ``model``, the
    prefixes of :data:`PREFIXES` are stripped where that makes the keys match the model's.

    Raises:
        CheckpointError: unsafe, unreadable, no state dict of tensors with string keys, or
            no such ``key``.
    """
    path = Path(path)
    obj = _read(path, map_location)
    if key is not None:
        for part in key.split("."):
            if not isinstance(obj, Mapping) or part not in obj:
                have = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
                raise CheckpointError(f"{path}: no key {key!r} (top-level keys: {have})")
            obj = obj[part]
    elif isinstance(obj, Mapping) and not _is_state(obj):
        obj = next((obj[k] for k in STATE_KEYS if _is_state(obj.get(k))), obj)
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: no state dict inside (got {type(obj).__name__})")
    if not _is_state(obj):
        bad = next(k for k, v in obj.items() if not (isinstance(k, str) and _tensor(v)))
        raise CheckpointError(
            f"{path}: not a state dict of tensors (key {bad!r}: {type(obj[bad]).__name__}); "
            f"pick the one inside with --key (keys: {list(obj)[:8]})"
        )
    return match_prefix(dict(obj), model.state_dict().keys()) if model is not None else dict(obj)


def _tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.layout == torch.strided and not v.is_meta


def _is_state(obj: Any) -> bool:
    """A non-empty mapping of string keys to dense tensors."""
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and _tensor(v) for k, v in obj.items())
    )


def _read(path: Path, map_location: Any) -> Any:
    if path.suffix != ".safetensors":
        return safe_torch_load(path, map_location)
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(
            f"{path}: reading .safetensors needs the 'safetensors' package "
            "(pip install safetensors)"
        ) from None
    try:
        return load_file(str(path), device=str(map_location))
    except Exception as e:
        raise CheckpointError(f"{path}: {str(e).splitlines()[0] if str(e) else e!r}") from None


def match_prefix(state: dict[str, Any], want: Iterable[str]) -> dict[str, Any]:
    """``state`` with the prefixes of :data:`PREFIXES` stripped where that makes more of its
    keys match ``want`` (the model's keys); unchanged when nothing matches better.

    >>> match_prefix({"model.module.w": 1}, ["w"])
    {'w': 1}
    """
    want = set(want)
    best, score = state, len(want & set(state))
    frontier = [state]
    for _ in range(3):  # at most three stacked prefixes (e.g. module._orig_mod.model.)
        frontier = [
            {k.removeprefix(p): v for k, v in s.items()}
            for s in frontier
            for p in PREFIXES
            if all(k.startswith(p) for k in s)
        ]
        for s in frontier:
            if len(want & set(s)) > score:
                best, score = s, len(want & set(s))
    return best


def load_checkpoint(
    model: nn.Module, path: str | os.PathLike, key: str | None = None, casts: list | None = None
) -> nn.Module:
    """Load the checkpoint at ``path`` into ``model`` (strictly) and return the model.

    Raises:
        CheckpointError: unreadable or unsafe (:func:`load_state_dict`), a tensor whose
            kind (floating, complex, integer) differs from the model's, or keys that do not
            match (the first missing and the first unexpected one are named).

    A floating-point tensor of another width (float16 into float32, say) is cast, as
    ``nn.Module.load_state_dict`` does; each such ``(key, from, to)`` goes to ``casts``.
    """
    sd = load_state_dict(path, key=key, model=model)
    ref = model.state_dict()
    missing = [k for k in ref if k not in sd]
    unexpected = [k for k in sd if k not in ref]
    if missing or unexpected:
        parts = [f"{len(missing)} missing (first: {missing[0]!r})"] if missing else []
        parts += [f"{len(unexpected)} unexpected (first: {unexpected[0]!r})"] if unexpected else []
        raise CheckpointError(f"{path}: does not match the model: {'; '.join(parts)}")
    for k, r in ref.items():  # load_state_dict would cast int/complex silently
        t = sd[k]
        if (t.is_floating_point(), t.is_complex()) != (r.is_floating_point(), r.is_complex()):
            raise CheckpointError(f"{path}: {k} is {t.dtype}, the model expects {r.dtype}")
        if t.dtype != r.dtype and casts is not None:
            casts.append((k, t.dtype, r.dtype))
        if t.shape != r.shape:
            raise CheckpointError(
                f"{path}: {k} has shape {tuple(t.shape)}, the model expects {tuple(r.shape)}"
            )
    model.load_state_dict(sd, strict=True)
    return model


_EPOCH = re.compile(r"(?:^|[^a-z])(?:epoch|ep)[=_\-]?(\d+)", re.IGNORECASE)


def epoch_from_name(name: str | Path, regex: str | None = None) -> int | None:
    """The epoch a file name states, or None.

    ``epoch=NN``, ``epoch_NN``, ``epoch-NN``, ``epNN`` anywhere in the name, or a name that
    is a bare number; with ``regex``, its first group instead.

    >>> epoch_from_name("resnet18-epoch=01-val_acc=0.91.pt"), epoch_from_name("12.pt")
    (1, 12)
    >>> epoch_from_name("epoch=0-step=22.ckpt"), epoch_from_name("step-3.pt")
    (0, None)
    """
    name = Path(name).name
    if regex is not None:
        m = re.search(regex, name)
        return int(m.group(1)) if m and m.groups() and m.group(1).isdigit() else None
    stem = name.split(".")[0]
    m = _EPOCH.search(stem)
    return int(m.group(1)) if m else int(stem) if stem.isdigit() else None


def checkpoint_epoch(path: str | Path, regex: str | None = None) -> int | None:
    """The epoch of a checkpoint file: from its name (:func:`epoch_from_name`), else from
    the file's own ``epoch`` field when that is a plain integer (Lightning writes one)."""
    epoch = epoch_from_name(path, regex)
    if epoch is not None or regex is not None or Path(path).suffix == ".safetensors":
        return epoch
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable: named when it is analysed
        return None
    field = obj.get("epoch") if isinstance(obj, Mapping) else None
    return field if isinstance(field, int) and not isinstance(field, bool) else None


def find_checkpoints(
    path: str | Path, every: int = 1, regex: str | None = None, notes: list | None = None
) -> list[tuple[int | None, Path]]:
    """``(epoch, file)`` of the checkpoint files of a folder (or of ``RUN_DIR/checkpoints``),
    sorted by epoch (:func:`checkpoint_epoch`; files without one come last, by name).

    Keeps files whose epoch is a multiple of ``every`` (files without an epoch are
    always kept). A symbolic link (it may point anywhere, ``/dev/zero`` too) and a folder
    with a checkpoint's name are not read: each is named in ``notes``, when given.

    Raises:
        ValueError: ``path`` is not a folder, or holds no checkpoint file.
    """
    path = Path(path)
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if not path.is_dir():
        raise ValueError(f"{path}: not a folder of checkpoints or a run directory")
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    files = []
    for p in sorted(folder.iterdir()):
        if p.suffix not in CHECKPOINT_SUFFIXES:
            continue
        if p.is_symlink() or not p.is_file():
            what = "a symbolic link (not followed)" if p.is_symlink() else "not a regular file"
            if notes is not None:
                notes.append((p.name, what))
            continue
        files.append(p)
    if not files:
        raise ValueError(f"{folder}: no checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)})")
    found = [(checkpoint_epoch(p, regex), p) for p in files]
    found.sort(key=lambda ep: (ep[0] is None, ep[0] or 0, ep[1].name))
    return [(e, p) for e, p in found if (e or 0) % every == 0]
