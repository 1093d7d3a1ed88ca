r"""Independent random streams: one generator per ``(seed, purpose, stream)``.

Seeding the :math:`i`-th probe of seed :math:`s` with :math:`s + i` makes seed :math:`s+1`'s
first probe seed :math:`s`'s second, so replicate estimates over consecutive seeds share
almost all their draws and spread far less than their standard errors say. Here every
stream is seeded by :class:`numpy.random.SeedSequence` from the entropy
``(seed, crc32(purpose), *stream)``: distinct keys give statistically independent streams,
and one key gives the same stream on every machine and device (draws are made on the CPU).

Purposes used by the toolkit: ``"lanczos"`` and ``"power"`` (stream ``i``: the start
vector of run or pair ``i``), ``"trace"`` and ``"density"`` (probes, drawn in order from
one stream per call), ``"direction"``
(stream ``i``: the ``i``-th random direction of a surface) and ``"m_sharpness"``
(stream ``i``: the noise of the ``i``-th m-batch).

Reference: O'Neill, "PCG: A family of simple fast space-efficient statistically good
algorithms for random number generation", 2014 (the SeedSequence hashing numpy uses).

>>> a = torch.randn(3, generator=generator(0, "trace"))
>>> torch.equal(a, torch.randn(3, generator=generator(0, "trace")))
True
>>> torch.equal(a, torch.randn(3, generator=generator(1, "trace")))
False
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def stream_seed(seed: int, purpose: str, *stream: int) -> int:
    """The 64-bit seed of the stream ``(seed, purpose, *stream)`` (see the module docstring).

    Negative integers are taken modulo :math:`2^{64}`, so every integer key is valid.

    >>> stream_seed(0, "trace") == stream_seed(0, "trace"), stream_seed(0, "trace", 1) == stream_seed(1, "trace", 0)
    (True, False)
    """  # noqa: E501
    key = [int(k) % 2**64 for k in (seed, zlib.crc32(purpose.encode()), *stream)]
    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0])


def generator(seed: int, purpose: str, *stream: int) -> torch.Generator:
    """A CPU ``torch.Generator`` for the stream ``(seed, purpose, *stream)``."""
    return torch.Generator().manual_seed(stream_seed(seed, purpose, *stream))
