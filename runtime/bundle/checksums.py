"""sha256 of bundle files, streamed, with a per-process cache keyed by file identity.

The cache key includes ctime, which a user cannot set back by hand, so an edited file is always re-hashed.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

_CHUNK = 1 << 20
_cache: dict[tuple, str] = {}
_lock = threading.Lock()


def _identity(st: os.stat_result, path: Path) -> tuple:
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def sha256_file(path: Path) -> str:
    """Hex sha256 of ``path``; re-hashes only when the file changed since the last call in this process."""
    path = Path(path)
    st = path.stat()
    key = _identity(st, path.resolve())
    with _lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    with _lock:
        _cache[key] = digest
    return digest


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
