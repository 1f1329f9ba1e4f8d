"""The bundle's graphs as backends: opened once and kept (default), or opened for one stage and closed right
after (low-memory mode, for 8 GB Jetsons: only one component's weights are resident at a time)."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

from .backends import low_memory_options, open_backend
from .backends.base import Backend
from .bundle.reader import Bundle
from .heap import release_free_memory


# opened at load (those the bundle has); the rest on first use
RESIDENT = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae_decoder")


class Components:
    def __init__(self, bundle: Bundle, backend: str, options: Any = None, *, low_memory: bool = False, verify: bool = True,
                 weights: Mapping[str, Mapping[str, Any]] | None = None):
        self.bundle = bundle
        self.backend = backend
        # low-memory mode's session settings where the caller left them: no pre-packed weight copies, the arena
        # given back after each run (backends.low_memory_options)
        self.options = low_memory_options(backend, options) if low_memory else options
        self.low_memory = low_memory
        self.verify = verify
        self._open: dict[str, Backend] = {}
        self._wrap: Callable[[str, Backend], Backend] | None = None
        self._lock = threading.Lock()
        # component -> initializer name -> array used instead of the stored weights (LoRA, runtime/lora/)
        self._weights: dict[str, Mapping[str, Any]] = {k: v for k, v in (weights or {}).items() if v}
        if not low_memory:
            for name in RESIDENT:  # every generation runs these: open them once, now (the encoder only for img2img)
                if bundle.has(name):
                    self._get(name)

    def _load(self, name: str) -> Backend:
        path = self.bundle.model_path(name, verify=self.verify)
        if self._weights.get(name):
            from .lora.backends import open_with_weights

            weights = self._weights[name]
            backend = open_with_weights(self.backend, self.bundle, self.bundle.component(name), path, self.options,
                                        weights)
            if not self.low_memory and hasattr(weights, "release"):
                # the session holds its own copy now; a later reopen recomputes them (runtime/lora/apply.py)
                weights.release()
        else:
            backend = open_backend(self.backend, self.bundle, self.bundle.component(name), path, self.options)
        return backend if self._wrap is None else self._wrap(name, backend)

    def set_weights(self, weights: Mapping[str, Mapping[str, Any]]) -> None:
        """Replace the weight overrides (component -> initializer name -> array; runtime/lora/) and reopen each
        resident component whose overrides are not the same object as before. The old backend is closed before
        the new one opens (one copy of the weights at a time); if opening fails, the component reopens on its
        next use. Not while a generation runs on these components."""
        new = {k: v for k, v in weights.items() if v}
        with self._lock:
            changed = [n for n in dict.fromkeys([*self._weights, *new]) if self._weights.get(n) is not new.get(n)]
            self._weights = new
            reopen = [n for n in changed if n in self._open]
            for name in reopen:
                self._open.pop(name).close()
            release_free_memory()  # the closed sessions' pages, before the new ones allocate (runtime/heap.py)
            for name in reopen:
                self._open[name] = self._load(name)
            release_free_memory()  # what opening them used only transiently

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
            release_free_memory()  # low-memory mode's point: the next stage's weights do not stack on these

    def close(self) -> None:
        with self._lock:
            for b in self._open.values():
                b.close()
            self._open.clear()
            release_free_memory()
