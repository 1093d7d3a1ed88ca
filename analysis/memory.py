"""How much memory is free, and a one-line refusal for an allocation that cannot fit.

Every buffer whose size a user's option chooses (the SAF store: samples x classes x lag,
Hutch++'s sketch: matvecs/3 x parameters, a cached Hessian graph) is checked here *before*
it is allocated, so a flag such as ``--saf-lag 1e9`` or ``--trace-matvecs 1e9`` is one line
(a ``ValueError``) instead of a ``MemoryError`` traceback or a machine swapping for hours.

The budget is a share (default one half) of what is free: ``MemAvailable`` from
``/proc/meminfo`` on a CPU, ``torch.cuda.mem_get_info`` on a CUDA device; where neither
can be read, :data:`FALLBACK_BYTES`. ``$SAF_MEMORY_BUDGET`` (``"512M"``, ``"4G"``, bytes)
sets it outright.

>>> fits(1024, "a tiny buffer")  # nothing to say
>>> fits(2**62, "a huge buffer")  # doctest: +ELLIPSIS
Traceback (most recent call last):
ValueError: a huge buffer needs 4294967296.0 GiB, more than the budget of ... GiB (...)
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

FALLBACK_BYTES = 2 * 2**30
"""The free memory assumed where it cannot be read (2 GiB)."""
MEMORY_BUDGET_ENV = "SAF_MEMORY_BUDGET"
_SIZE = re.compile(r"\s*(\d+)\s*([KMG]?)i?B?\s*", re.IGNORECASE)


def parse_size(text: str, what: str) -> int:
    """Bytes from ``"123"``, ``"512M"``, ``"4G"``, ``"4GiB"`` (binary units).

    Raises:
        ValueError: not a size (``what`` names where it came from).

    >>> parse_size("4G", "x"), parse_size("512k", "x")
    (4294967296, 524288)
    """
    m = _SIZE.fullmatch(text)
    if not m:
        raise ValueError(f"{what}={text!r} is not a size; use bytes or e.g. 4G, 512M")
    return int(m.group(1)) * 1024 ** " KMG".index(m.group(2).upper() or " ")


def available_bytes(device: Any = None) -> int:
    """Free memory on ``device`` in bytes (CPU: ``MemAvailable``; 0 where it cannot be read)."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def budget_bytes(device: Any = None, share: float = 0.5) -> int:
    """``share`` of the free memory on ``device`` (of :data:`FALLBACK_BYTES` where unknown),
    or ``$SAF_MEMORY_BUDGET`` when set."""
    text = os.environ.get(MEMORY_BUDGET_ENV)
    if text is not None:
        return parse_size(text, MEMORY_BUDGET_ENV)
    return int(share * (available_bytes(device) or FALLBACK_BYTES))


def fits(nbytes: float, what: str, device: Any = None, hint: str = "") -> None:
    """Refuse, in one line, an allocation of ``nbytes`` beyond :func:`budget_bytes`.

    Raises:
        ValueError: ``"<what> needs X GiB, more than the budget of Y GiB ...; <hint>"``.
    """
    budget = budget_bytes(device)
    if nbytes > budget:
        raise ValueError(
            f"{what} needs {nbytes / 2**30:.1f} GiB, more than the budget of "
            f"{budget / 2**30:.1f} GiB (half the free memory, or ${MEMORY_BUDGET_ENV})"
            f"{'; ' + hint if hint else ''}"
        )
