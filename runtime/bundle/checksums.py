"""sha256 of bundle files, streamed, cached by file identity.

The cache key is the file's identity: path, device, inode, size, mtime and ctime. ctime cannot be set back by
hand (any write or metadata change moves it), so an edited, replaced or truncated file is always re-hashed. Large
files (the graphs' weights) are also cached on disk under ``$XDG_CACHE_HOME/edgediff/sha256/``, one small file
per identity: a fresh process opening a 3.4 GB SD-1.5 UNet then skips re-reading it, which was most of its cold
start once ONNX Runtime's optimizer no longer runs (docs/engines.md). ``fresh=True`` (used by
``edgediff inspect --verify`` and before deriving a bundle) ignores both caches. ``EDGEDIFF_HASH_CACHE=0`` turns
the disk cache off.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

_CHUNK = 1 << 20
DISK_CACHE_MIN_BYTES = 64 << 20  # smaller files hash in milliseconds
_cache: dict[tuple, str] = {}
_lock = threading.Lock()


def _identity(st: os.stat_result, path: Path) -> tuple:
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def sha256_file(path: Path, *, fresh: bool = False) -> str:
    """Hex sha256 of ``path``; re-hashes only when the file changed since it was last hashed (or ``fresh``)."""
    path = Path(path)
    st = path.stat()
    key = _identity(st, path.resolve())
    if not fresh:
        with _lock:
            hit = _cache.get(key)
        if hit is None and st.st_size >= DISK_CACHE_MIN_BYTES:
            hit = _disk_get(key)
        if hit is not None:
            with _lock:
                _cache[key] = hit
            return hit
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    with _lock:
        _cache[key] = digest
    if st.st_size >= DISK_CACHE_MIN_BYTES:
        _disk_put(key, digest)
    return digest


def _disk_dir() -> Path | None:
    if os.environ.get("EDGEDIFF_HASH_CACHE", "1") == "0":
        return None
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edgediff" / "sha256"


def _disk_entry(key: tuple) -> Path | None:
    d = _disk_dir()
    return None if d is None else d / hashlib.sha256(repr(key).encode()).hexdigest()


def _disk_get(key: tuple) -> str | None:
    entry = _disk_entry(key)
    try:
        text = entry.read_text(encoding="ascii").strip() if entry is not None else ""
    except (OSError, UnicodeDecodeError):
        return None
    return text if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else None


def _disk_put(key: tuple, digest: str) -> None:
    """Best effort: a read-only or full cache folder only costs the next process a re-hash."""
    entry = _disk_entry(key)
    if entry is None:
        return
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        tmp.write_text(digest + "\n", encoding="ascii")
        os.replace(tmp, entry)
    except OSError:
        pass


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
