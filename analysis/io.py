"""Atomic writes and safe checkpoint reading, shared by every package.

Three promises live here:

* **Atomic writes.** Every file is written to a temporary sibling, flushed,
  fsynced and moved over the target with :func:`os.replace`. A crash (even
  SIGKILL) leaves either the old file or the new one, never half of one.
* **A checkpoint is data, never code.** :func:`load_state_dict` uses
  ``torch.load(..., weights_only=True)`` (or safetensors), so a pickle that
  would run code is refused before anything runs.
* **A file cannot choose its memory.** Every load (the epoch lookup too) goes through one
  opened file: it is refused unless it is a regular file, a torch zip archive whose members
  are stored and whose headers agree, with a pickle that parses and names only tensors,
  containers, numbers and strings, and declared sizes within :func:`load_budget`; only
  then is it loaded, from the same descriptor (so the bytes hashed, scanned and loaded
  are one version).
* **A checkpoint fits its model or is refused**, naming why: :func:`load_checkpoint`
  loads strictly and never casts an integer tensor to float or back.

Layouts read: a file (``.pt``, ``.pth``, ``.ckpt``, ``.safetensors``, timm's ``.pth.tar``),
or a Hugging Face model folder (``save_pretrained`` or a Trainer ``checkpoint-N/``:
``model.safetensors``, ``pytorch_model.bin`` or a sharded ``*.index.json``; the Trainer's
``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth`` beside them are not checkpoints).
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import pickletools
import re
import stat
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from analysis.memory import budget_bytes, parse_size

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks
    fcntl = None

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".pth.tar")
MODEL_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
"""The weights of a Hugging Face model folder, tried in this order."""
TRAINER_FILES = re.compile(
    r"(optimizer|scheduler|scaler|rng_state(_\d+)?|training_args)\.(pt|pth|bin)"
)
"""Files a training loop keeps beside its weights; never read as checkpoints."""
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


class StoredNamespace:
    """What an ``argparse.Namespace`` in a checkpoint (timm keeps its training arguments in
    one) is read as: its attributes as data, no method of ``argparse`` and no import."""


_STUBS = {("argparse", "Namespace"): StoredNamespace}
_STUBS_READABLE = hasattr(torch.serialization, "safe_globals") and tuple(
    int(x) for x in re.findall(r"\d+", torch.__version__)[:2]
) >= (2, 6)  # torch 2.6 maps a stored class name to a stand-in


def _allowed(module: str, name: str) -> bool:
    """Globals a checkpoint of tensors, numbers, strings and containers may name; nothing
    that builds an object of a size chosen in the file (``bytearray(3 * 2**30)``)."""
    if (module, name) in _ALLOWED_GLOBALS or (_STUBS_READABLE and (module, name) in _STUBS):
        return True
    attr = getattr(torch, name, None) if module == "torch" else None
    storage = isinstance(attr, type) and issubclass(
        attr, torch.storage._StorageBase | torch.storage.TypedStorage
    )
    return isinstance(attr, torch.dtype) or storage


LOAD_BUDGET_ENV = "SAF_LOAD_BUDGET"
"""The environment variable that sets :func:`load_budget` (bytes, or with a K, M or G suffix)."""
LOAD_CAP = 16 * 2**30
"""The default load budget's fixed cap (16 GiB)."""
PICKLE_CAP = 2**28
"""The largest ``data.pkl`` read (256 MiB): it holds structure, the tensors are beside it."""


def load_budget() -> int:
    """The most memory one checkpoint (file or model folder) may make a load allocate, in
    bytes: ``$SAF_LOAD_BUDGET`` (``"512M"``, ``"4G"``, bytes) when set, else the smaller of
    :data:`LOAD_CAP` (16 GiB) and half of the free memory (:func:`analysis.memory.budget_bytes`).

    Every size a file declares (zip members, a safetensors header, a folder's shards) is
    checked against it *before* anything is inflated or allocated.

    Raises:
        ValueError: ``$SAF_LOAD_BUDGET`` is not a size.
    """
    text = os.environ.get(LOAD_BUDGET_ENV)
    if text is None:
        return min(LOAD_CAP, budget_bytes("cpu"))
    return parse_size(text, LOAD_BUDGET_ENV)


def _over_budget(path: Path, nbytes: int, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: refused: {what} {nbytes / 2**20:.1f} MiB, more than the load budget of "
        f"{load_budget() / 2**20:.1f} MiB; raise {LOAD_BUDGET_ENV} (e.g. 32G) if the file is "
        "trusted and the memory is there"
    )


@contextlib.contextmanager
def _open_regular(path: Path) -> Iterator[IO[bytes]]:
    """``path`` opened for reading, or a CheckpointError when it is not a regular file (a
    FIFO is opened without blocking and refused, never waited on)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be opened ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{path}: not a regular file (a FIFO, device or socket)")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        yield f


def _stamp(f: IO[bytes]) -> tuple:
    st = os.fstat(f.fileno())
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _unchanged(f: IO[bytes], stamp: tuple, path: Path) -> None:
    """Refuse a file written to (in place) while it was read: its bytes may be mixed."""
    if _stamp(f) != stamp:
        raise CheckpointError(f"{path}: changed while it was read; rerun when its writer is done")


def _scan(f: IO[bytes], path: Path, size: int) -> None:
    """Check an opened torch zip archive before ``torch.load`` reads it: every member
    stored (torch never compresses; an inflated size could not be bounded), local and
    central headers agreeing (torch reads one, :mod:`zipfile` the other), the declared
    sizes within the file and within :func:`load_budget`, and every opcode of the one
    ``data.pkl`` parsed with no global outside :func:`_allowed`. Nothing is inflated or
    built.

    Raises:
        CheckpointError: refused, naming why (one line).
    """

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: refused: {why}")

    try:
        z = zipfile.ZipFile(f)
        infos = z.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        raise refuse("not a torch zip archive (a legacy pre-1.6 pickle cannot be scanned, "
                     "re-save it with torch.save; or the file is damaged)") from None  # fmt: skip
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        raise refuse("a zip archive with two members of one name")
    total = 0
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise refuse(f"a compressed member {info.filename} (torch.save stores them whole)")
        if info.header_offset + info.file_size > size:
            raise refuse(f"member {info.filename} declares more bytes than the file has")
        try:
            z.open(info).close()  # reads and compares the local header, inflates nothing
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError) as e:
            raise refuse(f"inconsistent zip headers ({str(e)[:80]})") from None
        total += info.file_size
    if total > load_budget():
        raise _over_budget(path, total, "its tensors declare")
    pkl = [i for i in infos if i.filename.endswith("data.pkl")]
    if len(pkl) != 1 or pkl[0].file_size > PICKLE_CAP:
        raise refuse("no single data.pkl of at most 256 MiB (not a torch checkpoint)")
    with z.open(pkl[0]) as member:
        _scan_pickle(member.read(PICKLE_CAP + 1), refuse)


def _scan_pickle(data: bytes, refuse: Callable[[str], CheckpointError]) -> None:
    """Every opcode of ``data`` parsed (as :mod:`pickletools` does, building nothing);
    any global outside :func:`_allowed`, or a pickle that does not parse, refused."""
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(arg)
            elif op.name in ("GLOBAL", "INST"):
                module, _, name = arg.partition(" ")
                if not _allowed(module, name):
                    raise refuse(_asks_to_build(f"{module}.{name}"))
            elif op.name == "STACK_GLOBAL" and (
                len(strings) < 2 or not _allowed(strings[-2], strings[-1])
            ):
                raise refuse(_asks_to_build(".".join(strings[-2:]) or "a computed global"))
    except CheckpointError:
        raise
    except Exception as e:  # cannot be scanned, so it is not read
        raise refuse(f"a pickle that does not parse ({str(e)[:80] or type(e).__name__})") from None


def _asks_to_build(name: str) -> str:
    hint = ("; upgrade to torch >= 2.6, which reads it as data" if name in
            {".".join(n) for n in _STUBS} else "")  # fmt: skip
    return f"the file asks to build {name} (not a plain weights file){hint}"


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu", hasher: Any = None) -> Any:
    """``torch.load`` with ``weights_only=True`` of a torch zip archive, through one opened
    file that is scanned first (:func:`_scan`: only tensors, containers, numbers and
    strings; declared sizes within :func:`load_budget`; nothing inflated), so the bytes
    scanned are the bytes loaded. Any failure becomes a CheckpointError.

    Args:
        path: the file.
        map_location: as for ``torch.load``.
        hasher: a :mod:`hashlib` object fed the file's bytes (read from the same opened
            file: a file replaced meanwhile is not mixed in).

    Raises:
        CheckpointError: the file is missing, not a regular file, empty, truncated,
            corrupt, a legacy (non-zip) pickle, over the budget, changed while read, or a
            pickle that asks for code (refused before anything runs).
    """
    path = Path(path)
    with _open_regular(path) as f:
        return _load_opened(f, path, map_location, hasher)


def _load_opened(f: IO[bytes], path: Path, map_location: Any, hasher: Any = None, **kw) -> Any:
    stamp = _stamp(f)
    if stamp[0] == 0:
        raise CheckpointError(f"{path}: empty file")
    if hasher is not None:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            hasher.update(chunk)
    _scan(f, path, stamp[0])
    f.seek(0)
    try:
        obj = _torch_load(f, map_location, **kw)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            msg = "refused: the file asks to run code (not a plain weights file)"
        raise CheckpointError(f"{path}: {msg}") from None
    _unchanged(f, stamp, path)
    return obj


def _torch_load(f: Any, map_location: Any, skip_data: bool = False) -> Any:
    """``torch.load(weights_only=True)``, with the stand-ins of ``_STUBS`` for the classes
    they replace (``skip_data``: no tensor's bytes are read)."""
    stubs = [(cls, ".".join(name)) for name, cls in _STUBS.items()] if _STUBS_READABLE else []
    with contextlib.ExitStack() as stack:
        if stubs:
            stack.enter_context(torch.serialization.safe_globals(stubs))
        if skip_data:
            stack.enter_context(torch.serialization.skip_data())
        return torch.load(f, map_location=map_location, weights_only=True)


STATE_KEYS = ("state_dict", "model", "model_state_dict", "net", "ema", "module", "model_state")
"""Keys under which checkpoints nest their state dict, tried in this order (Lightning's
``.ckpt`` files use ``state_dict``)."""


def load_state_dict(
    path: str | os.PathLike,
    map_location: Any = "cpu",
    key: str | None = None,
    model: nn.Module | None = None,
    prefix: str | None = None,
    hasher: Any = None,
) -> dict[str, torch.Tensor]:
    """A model state dict from a checkpoint file or model folder (module docstring), safely.

    The file may hold the state dict itself or nest it under one of :data:`STATE_KEYS`
    (``key`` chooses one, dotted for deeper levels: ``"ema.module"``). With ``model``, the
    keys are matched to the model's (:func:`match_prefix`; ``prefix``: remove exactly it).
    ``hasher`` (a :mod:`hashlib` object) is fed the bytes loaded, from the same opened file.

    Raises:
        CheckpointError: unsafe, unreadable, no state dict of tensors with string keys,
            no such ``key`` or ``prefix``.
    """
    path = Path(path)
    obj = _read(path, map_location, hasher)
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
    if model is None and prefix is None:
        return dict(obj)
    try:
        return match_prefix(dict(obj), model.state_dict() if model is not None else (), prefix)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.layout == torch.strided and not v.is_meta


def _is_state(obj: Any) -> bool:
    """A non-empty mapping of string keys to dense tensors."""
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and _tensor(v) for k, v in obj.items())
    )


def _model_file(folder: Path) -> Path | None:
    """The first of :data:`MODEL_FILES` in ``folder``, or None (not a model folder)."""
    return next((folder / n for n in MODEL_FILES if (folder / n).is_file()), None)


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The files a checkpoint is read from: the file itself, or a Hugging Face model
    folder's weights (every shard its ``*.index.json`` names).

    Raises:
        CheckpointError: a folder without weights, or an index that names anything but
            files beside it.
    """
    path = Path(path)
    if not path.is_dir():
        return [path]
    first = _model_file(path)
    if first is None:
        raise CheckpointError(f"{path}: a folder without {' or '.join(MODEL_FILES[:2])}")
    return [path / n for n in _shards(first)] if first.name.endswith(".json") else [first]


def _shards(index: Path) -> list[str]:
    """The shard file names a sharded checkpoint's index names (plain names, no paths)."""
    if index.stat().st_size > 2**26:
        raise CheckpointError(f"{index}: an index of over 64 MiB is not one of weights")
    try:
        names = set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{index}: not a checkpoint index (no weight_map)") from None
    bad = [n for n in names if not (isinstance(n, str) and Path(n).name == n
                                    and n.endswith((".safetensors", ".bin")))]  # fmt: skip
    if bad or not names:
        raise CheckpointError(
            f"{index}: shards must be .safetensors or .bin file names beside it, got {bad[:1]}"
        )
    return sorted(names)


def _read(path: Path, map_location: Any, hasher: Any = None) -> Any:
    """A file's or model folder's contents, through the bounded reader (one opened file
    per file: scanned, hashed and loaded from the same descriptor)."""
    if path.is_dir():
        return _read_folder(path, map_location, hasher)
    if path.suffix != ".safetensors":
        return safe_torch_load(path, map_location, hasher)
    try:
        from safetensors.torch import load
    except ImportError:
        raise CheckpointError(
            f"{path}: reading .safetensors needs the 'safetensors' package "
            "(pip install safetensors)"
        ) from None
    with _open_regular(path) as f:
        stamp = _stamp(f)
        if 2 * stamp[0] > load_budget():  # the file's bytes, then the tensors copied out
            raise _over_budget(path, 2 * stamp[0], "reading it needs")
        data = f.read()
        if hasher is not None:
            hasher.update(data)
        _check_safetensors(path, data)
        try:
            state = load(data)
        except Exception as e:
            raise CheckpointError(f"{path}: {str(e).splitlines()[0] if str(e) else e!r}") from None
        _unchanged(f, stamp, path)
    return {k: v.to(map_location) for k, v in state.items()}


_ST_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
             "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
             "C64": 8}  # fmt: skip


def _check_safetensors(path: Path, data: bytes) -> None:
    """A safetensors file's header against its length: a header of at most 100 MiB within
    the file, and each tensor's dtype and shape filling exactly its byte range."""
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 < n <= min(len(data) - 8, 100 * 2**20):
        raise CheckpointError(f"{path}: refused: a safetensors header longer than the file")
    body = len(data) - 8 - n
    try:
        header = json.loads(data[8 : 8 + n])
        for k, v in header.items():
            if k == "__metadata__":
                continue
            a, b = v["data_offsets"]
            numel = 1
            for d in v["shape"]:
                numel *= d if isinstance(d, int) and d >= 0 else -(2**62)
            if not (0 <= a <= b <= body and numel * _ST_BYTES[v["dtype"]] == b - a):
                raise ValueError(k)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(
            f"{path}: refused: a safetensors header whose sizes do not match the file "
            f"({str(e)[:60]})"
        ) from None


def _read_folder(path: Path, map_location: Any, hasher: Any = None) -> dict[str, torch.Tensor]:
    """The state dict of a model folder: its weights file, or every shard merged (all of
    them within :func:`load_budget`)."""
    state: dict[str, torch.Tensor] = {}
    files = checkpoint_files(path)
    total = sum(f.stat().st_size for f in files if f.is_file() and not f.is_symlink())
    if total > load_budget():
        raise _over_budget(path, total, "its shards hold")
    for f in files:
        if f.is_symlink():
            raise CheckpointError(f"{f}: a symbolic link (not followed)")
        part = _read(f, map_location, hasher)
        if not _is_state(part):
            raise CheckpointError(f"{f}: not a state dict of tensors")
        state.update(part)
    return state


def match_prefix(
    state: dict[str, Any], want: Iterable[str], prefix: str | None = None
) -> dict[str, Any]:
    """``state``'s keys under the dotted prefix whose removal makes most of them match
    ``want`` (the model's keys), that prefix removed; unchanged when none matches better.

    Any wrapper's prefix is found: DataParallel's ``module.``, ``torch.compile``'s
    ``_orig_mod.``, a ``LightningModule``'s attribute (``net.``), stacked ones. Keys
    outside the prefix (a wrapper's other modules) are left out.

    Args:
        state: a state dict.
        want: the model's keys.
        prefix: remove exactly this prefix instead (``"net."``), keeping only its keys.

    Raises:
        CheckpointError: no key under ``prefix``, or two prefixes match equally well
            (``student.`` and ``teacher.``): choose one with ``prefix``.

    >>> match_prefix({"model.module.w": 1}, ["w"]), match_prefix({"net.w": 1, "loss.c": 2}, ["w"])
    ({'w': 1}, {'w': 1})
    """
    if prefix is None:
        prefix = _best_prefix(state, set(want))
    kept = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not kept:
        raise CheckpointError(f"no key starts with {prefix!r} (first key: {next(iter(state))!r})")
    return kept


def _best_prefix(state: Mapping[str, Any], want: set[str]) -> str:
    """The dotted prefix of ``state``'s keys whose removal matches most keys of ``want``
    (``""``: none, or removing nothing matches as many)."""
    score: Counter = Counter()
    for k in state:
        cuts = [0] + [i + 1 for i, c in enumerate(k) if c == "."]
        score.update(k[:i] for i in cuts if k[i:] in want)
    top = max(score.values(), default=0)
    best = sorted(p for p, n in score.items() if n == top)
    if not best or best[0] == "":
        return ""
    if len(best) > 1:
        raise CheckpointError(
            f"the keys match the model under {best[0]!r} and {best[1]!r}; choose one with "
            "--strip-prefix"
        )
    return best[0]


def uncompiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (its ``_orig_mod``), else ``model`` itself.

    Raises:
        ValueError: a compiled wrapper without the module inside.
    """
    if type(model).__name__ != "OptimizedModule":
        return model
    inner = getattr(model, "_orig_mod", None)
    if not isinstance(inner, nn.Module):
        raise ValueError("the model is a torch.compile wrapper without _orig_mod; return the "
                         "module itself from the factory, not torch.compile(module)")  # fmt: skip
    return inner


def _with_tied(sd: dict[str, torch.Tensor], ref: Mapping[str, torch.Tensor]) -> dict:
    """``sd`` plus each key it lacks whose tensor the model ties to (shares with) a key
    ``sd`` has: the tied copy a file leaves out (GPT-2's ``lm_head.weight``)."""
    where: dict[tuple, list[str]] = {}
    for k, t in ref.items():
        if t.numel():
            where.setdefault((t.data_ptr(), t.shape, t.stride()), []).append(k)
    out = dict(sd)
    for k, t in ref.items():
        tied = where.get((t.data_ptr(), t.shape, t.stride()), []) if k not in sd else []
        source = next((j for j in tied if j in sd), None)
        if source is not None:
            out[k] = sd[source]
    return out


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    key: str | None = None,
    casts: list | None = None,
    prefix: str | None = None,
    hasher: Any = None,
) -> nn.Module:
    """Load the checkpoint at ``path`` into ``model`` (strictly) and return the model.

    A key the file leaves out is taken from the one the model ties it to (both names hold
    one tensor, as GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``); any other
    missing key refuses the file. A ``torch.compile`` wrapper is loaded and returned as the
    module inside (:func:`uncompiled`). ``key``, ``prefix``, ``hasher``: see
    :func:`load_state_dict`.

    Raises:
        CheckpointError: unreadable or unsafe (:func:`load_state_dict`), a tensor whose
            kind (floating, complex, integer) differs from the model's, or keys that do not
            match (the first missing and the first unexpected one are named).

    A floating-point tensor of another width (float16 into float32, say) is cast, as
    ``nn.Module.load_state_dict`` does; each such ``(key, from, to)`` goes to ``casts``.
    """
    model = uncompiled(model)
    ref = model.state_dict()
    sd = load_state_dict(path, key=key, model=model, prefix=prefix, hasher=hasher)
    sd = _with_tied(sd, ref)
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


def printable_name(name: str) -> str:
    r"""``name`` as one line of UTF-8 text: bytes that are not UTF-8 (a file name may hold
    any) as ``\xNN``, control characters (a carriage return) as their escapes.

    >>> printable_name("epoch\udcff\r.pt")
    'epoch\\xff\\r.pt'
    """
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


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
    the file's own ``epoch`` field when that is a plain integer (Lightning writes one), read
    through the bounded reader (:func:`safe_torch_load`'s scan) without any tensor's bytes."""
    epoch = epoch_from_name(path, regex)
    if epoch is not None or regex is not None or Path(path).suffix == ".safetensors":
        return epoch
    if Path(path).is_dir():
        return None
    try:
        with _open_regular(Path(path)) as f:
            obj = _load_opened(f, Path(path), "cpu", skip_data=True)
    except Exception:  # unreadable or refused: named when it is analysed
        return None
    field = obj.get("epoch") if isinstance(obj, Mapping) else None
    return field if isinstance(field, int) and not isinstance(field, bool) else None


_STEP = re.compile(r"(?:^|[^a-z])(?:step|iter|iteration)[=_\-]?(\d+)", re.IGNORECASE)
_TRAINER_DIR = re.compile(r"checkpoint-(\d+)")


def checkpoint_step(path: str | Path) -> int | None:
    """The training step a checkpoint's name states, or None: ``step=NN``, ``step_NN``,
    ``global_stepNN``, ``iter_NN`` anywhere in the name, or a Trainer folder ``checkpoint-NN``
    (timm's files ``checkpoint-NN.pth.tar`` count epochs, and say so inside).

    >>> checkpoint_step("epoch=0-step=22.ckpt"), checkpoint_step("global_step500.pt")
    (22, 500)
    """
    path = Path(path)
    m = _STEP.search(path.name.split(".")[0])
    if m is None and path.is_dir():
        m = _TRAINER_DIR.fullmatch(path.name)
    return int(m.group(1)) if m else None


def _natural(name: str) -> list:
    """A sort key that orders the numbers in names by value (``ckpt-9`` before ``ckpt-10``)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def find_checkpoints(
    path: str | Path, every: int = 1, regex: str | None = None, notes: list | None = None
) -> list[tuple[int | None, Path]]:
    """``(epoch, checkpoint)`` of the checkpoints of a folder (or of ``RUN_DIR/checkpoints``):
    files with a name of :data:`CHECKPOINT_SUFFIXES` and model folders (module docstring),
    in order of epoch (:func:`checkpoint_epoch`), then step (:func:`checkpoint_step`), then
    name, numbers by value. A folder that is itself a model folder comes with them.

    Keeps checkpoints whose epoch is a multiple of ``every`` (those without an epoch are
    always kept). A symbolic link (it may point anywhere, ``/dev/zero`` too) and a folder
    with a checkpoint's name are not read: each is named in ``notes``, when given.
    :data:`TRAINER_FILES` are left out without a note.

    Raises:
        ValueError: ``path`` is not a folder, or holds no checkpoint.
    """
    path = Path(path)
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if not path.is_dir():
        raise ValueError(f"{path}: not a folder of checkpoints or a run directory")
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = [(checkpoint_epoch(p, regex), p) for p in _candidates(folder, notes)]
    if not found:
        raise ValueError(
            f"{folder}: no checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)}) or model folders"
        )

    def order(ep: tuple[int | None, Path]) -> tuple:
        step = checkpoint_step(ep[1])
        return (ep[0] is None, ep[0] or 0, step is None, step or 0, _natural(ep[1].name))

    found.sort(key=order)
    return [(e, p) for e, p in found if (e or 0) % every == 0]


def _candidates(folder: Path, notes: list | None) -> list[Path]:
    """The checkpoints of ``folder``, unsorted; odd entries go to ``notes``."""
    own = [folder] if _model_file(folder) is not None else []
    found = []
    for p in sorted(folder.iterdir()):
        model_dir = p.is_dir() and _model_file(p) is not None
        named = p.name.endswith(CHECKPOINT_SUFFIXES) and not TRAINER_FILES.fullmatch(p.name)
        if (own and not model_dir) or not (named or model_dir):
            continue  # a model folder's own files are its weights, not checkpoints
        if p.is_symlink() or not (p.is_file() or model_dir):
            what = "a symbolic link (not followed)" if p.is_symlink() else "not a regular file"
            if notes is not None:
                notes.append((p.name, what))
            continue
        found.append(p)
    return own + found
