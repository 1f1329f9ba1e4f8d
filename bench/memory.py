"""Peak resident memory of this process over a span of time, sampled from /proc (Linux) in a background thread;
falls back to getrusage's lifetime peak elsewhere."""
from __future__ import annotations

import os
import resource
import threading


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakRss:
    """``with PeakRss(interval=0.005) as p: ...``; then ``p.peak`` in bytes (None where unknown)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def _sample(self) -> None:
        v = rss_bytes()
        if v is not None:
            self.peak = v if self.peak is None else max(self.peak, v)

    def __enter__(self) -> "PeakRss":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        if self.peak is None:  # no /proc: lifetime peak (KiB on Linux, bytes on macOS)
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
