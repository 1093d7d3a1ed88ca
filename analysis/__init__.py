"""Curvature and sharpness measures on any PyTorch model and any checkpoint.

Imports point one way: ``landscape`` may import ``analysis``; ``analysis``
never imports ``saf`` or ``landscape``.
"""

from analysis._io import (
    CHECKPOINT_SUFFIXES,
    CheckpointError,
    atomic_open,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    load_state_dict,
    safe_torch_load,
)

__all__ = [
    # safe I/O
    "CHECKPOINT_SUFFIXES",
    "CheckpointError",
    "atomic_open",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "load_state_dict",
    "safe_torch_load",
]
