"""Short-lived image files for ``response_format="url"``: the result is kept in memory under an unguessable id and
served by ``GET /v1/files/{id}`` until it expires (``ttl`` seconds) or the store is full (oldest first). The URL
is a capability (whoever has it can fetch the image, as with OpenAI's signed URLs), so it needs no API key; nothing
is written to disk, and a restart forgets every file."""
from __future__ import annotations

import collections
import secrets
import threading
import time


class FileStore:
    def __init__(self, *, ttl: float = 600.0, max_bytes: int = 256 * 2**20):
        self.ttl, self.max_bytes = ttl, max_bytes
        self._lock = threading.Lock()
        self._files: collections.OrderedDict[str, tuple[float, str, bytes]] = collections.OrderedDict()
        self._bytes = 0

    def put(self, data: bytes, media_type: str) -> str:
        file_id = secrets.token_urlsafe(24)
        with self._lock:
            self._evict(time.monotonic(), incoming=len(data))
            self._files[file_id] = (time.monotonic() + self.ttl, media_type, data)
            self._bytes += len(data)
        return file_id

    def get(self, file_id: str) -> tuple[str, bytes] | None:
        with self._lock:
            self._evict(time.monotonic())
            entry = self._files.get(file_id)
        return None if entry is None else (entry[1], entry[2])

    def __len__(self) -> int:
        return len(self._files)

    def _evict(self, now: float, incoming: int = 0) -> None:
        while self._files:
            key, (expires, _, data) = next(iter(self._files.items()))
            if expires > now and self._bytes + incoming <= self.max_bytes:
                break
            del self._files[key]
            self._bytes -= len(data)
