"""Handing freed memory back to the system, for the steps that hold one large network after another."""

from __future__ import annotations

import ctypes
import gc


def return_freed_memory(collect: bool = False) -> None:
    """Let glibc return freed heap pages (after collecting reference cycles, with `collect`): it otherwise
    keeps them for reuse, and a released network's tensors (most under its 32 MB mmap threshold) would
    stay resident."""
    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
