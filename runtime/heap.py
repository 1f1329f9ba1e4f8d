"""Giving freed heap memory back to the operating system after a large model's session is closed.

ONNX Runtime's session threads allocate through glibc's per-thread arenas; when a session is destroyed its
gigabytes are free to malloc but stay in the process's resident set, and a session opened next allocates from
other arenas. Measured on an SD-1.5-shaped UNet (LoRA swaps base -> A -> B -> A -> base): resident memory grew
4.0 -> 8.1 GiB without a trim and stayed within 4.2-4.9 GiB with one after each close/open. ``malloc_trim(0)``
(glibc >= 2.8) returns free pages of every arena; elsewhere (musl, macOS, Windows) this is a no-op.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import lru_cache


@lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim  # glibc only: musl has no such symbol
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the allocator's free pages to the OS; True if the platform could (glibc), False if it cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
