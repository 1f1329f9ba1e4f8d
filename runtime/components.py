"""The bundle's graphs as backends: opened once and kept (default), or opened for one stage and closed right
after (low-memory mode, for 8 GB Jetsons: only one component's weights are resident at a time)."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from .backends import open_backend
from .backends.base import Backend
from .bundle.reader import Bundle


RESIDENT = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")  # opened at load; the rest on first use


class Components:
    def __init__(self, bundle: Bundle, backend: str, options: Any = None, *, low_memory: bool = False, verify: bool = True):
        self.bundle = bundle
        self.backend = backend
        self.options = options
        self.low_memory = low_memory
        self.verify = verify
        self._open: dict[str, Backend] = {}
        self._wrap: Callable[[str, Backend], Backend] | None = None
        self._lock = threading.Lock()
        if not low_memory:
            for name in RESIDENT:  # every generation runs these: open them once, now (the encoder only for img2img)
                if bundle.has(name):
                    self._get(name)

    def _load(self, name: str) -> Backend:
        path = self.bundle.model_path(name, verify=self.verify)
        backend = open_backend(self.backend, self.bundle, self.bundle.component(name), path, self.options)
        return backend if self._wrap is None else self._wrap(name, backend)

    def wrap(self, fn: Callable[[str, Backend], Backend]) -> None:
        """Put ``fn(name, backend)`` around every backend, open now or later: the seam for tools that watch the
        graphs' inputs (calibration for quantization, the profiler) without touching the denoising loop."""
        with self._lock:
            self._wrap = fn
            self._open = {name: fn(name, b) for name, b in self._open.items()}

    def get(self, name: str) -> Backend:
        """The resident backend for ``name`` (default mode), for tools such as the profiler."""
        return self._get(name)

    def _get(self, name: str) -> Backend:
        with self._lock:
            if name not in self._open:
                self._open[name] = self._load(name)
            return self._open[name]

    @contextmanager
    def use(self, name: str) -> Iterator[Backend]:
        """The backend for ``name`` for the duration of a stage."""
        if not self.low_memory:
            yield self._get(name)
            return
        backend = self._load(name)
        try:
            yield backend
        finally:
            backend.close()

    def close(self) -> None:
        with self._lock:
            for b in self._open.values():
                b.close()
            self._open.clear()
