"""Prometheus metrics in the text exposition format (version 0.0.4), written here rather than taken from
prometheus-client: four small types cover what the server reports, each registry belongs to one app (tests start
several servers in one process without a global registry colliding), and the base ``[serve]`` extra stays three
packages.

What is reported (names under ``edgediff_``):
    queue_depth{model}                      gauge      requests admitted and waiting for a denoising slot
    inflight{model}                         gauge      requests being denoised now
    stage_seconds{model,stage}              histogram  queue, start (text encoding / img2img encode), unet (one
                                                       shared denoiser call), finish (VAE decode), encode (image
                                                       files), total (request arrival -> response)
    unet_batch_rows{model}                  histogram  rows of each denoiser call: how much batching happened
    images_total{model}                     counter    images returned
    requests_total{route,status}            counter    HTTP responses by route and status code
    errors_total{kind}                      counter    failures by kind (invalid_request, queue_full, timeout,
                                                       disconnect, shutdown, auth, too_large, internal, ...)
"""
from __future__ import annotations

import math
import threading
from typing import Callable, Iterable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

Labels = tuple[tuple[str, str], ...]


def _labels(values: dict[str, str]) -> Labels:
    return tuple(sorted((k, str(v)) for k, v in values.items()))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(labels: Labels, extra: Iterable[tuple[str, str]] = ()) -> str:
    items = list(labels) + list(extra)
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in items) + "}"


def _fmt_value(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self._lock = threading.Lock()

    def lines(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}", *self.samples()]

    def samples(self) -> list[str]:
        raise NotImplementedError  # abstract: each metric kind writes its own sample lines


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str):
        super().__init__(name, help)
        self._values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = _labels(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(_labels(labels), 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            return [f"{self.name}{_fmt_labels(k)} {_fmt_value(v)}" for k, v in sorted(self._values.items())]


class Gauge(_Metric):
    """A value read when scraped (``fn`` per label set): queue depth and in-flight count live in the engines."""

    kind = "gauge"

    def __init__(self, name: str, help: str):
        super().__init__(name, help)
        self._sources: dict[Labels, Callable[[], float]] = {}

    def track(self, fn: Callable[[], float], **labels: str) -> None:
        with self._lock:
            self._sources[_labels(labels)] = fn

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._sources.items())
        return [f"{self.name}{_fmt_labels(k)} {_fmt_value(fn())}" for k, fn in items]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Iterable[float] = LATENCY_BUCKETS):
        super().__init__(name, help)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._data: dict[Labels, tuple[list[int], list[float]]] = {}  # per label set: bucket counts, [sum]

    def observe(self, value: float, **labels: str) -> None:
        key = _labels(labels)
        with self._lock:
            counts, total = self._data.setdefault(key, ([0] * len(self.buckets), [0.0]))
            for i, upper in enumerate(self.buckets):
                if value <= upper:
                    counts[i] += 1
                    break
            total[0] += value

    def count(self, **labels: str) -> int:
        with self._lock:
            entry = self._data.get(_labels(labels))
            return sum(entry[0]) if entry else 0

    def samples(self) -> list[str]:
        out = []
        with self._lock:
            items = sorted((k, (list(c), s[0])) for k, (c, s) in self._data.items())
        for key, (counts, total) in items:
            running = 0
            for upper, n in zip(self.buckets, counts):
                running += n  # Prometheus buckets are cumulative
                out.append(f"{self.name}_bucket{_fmt_labels(key, [('le', _fmt_value(upper))])} {running}")
            out.append(f"{self.name}_sum{_fmt_labels(key)} {_fmt_value(total)}")
            out.append(f"{self.name}_count{_fmt_labels(key)} {running}")
        return out


class ServerMetrics:
    """Every metric one server reports (see the module doc)."""

    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self) -> None:
        self.queue_depth = Gauge("edgediff_queue_depth", "Requests admitted and waiting for a denoising slot.")
        self.inflight = Gauge("edgediff_inflight", "Requests being denoised now.")
        self.stage_seconds = Histogram("edgediff_stage_seconds", "Latency per stage in seconds.")
        self.unet_rows = Histogram("edgediff_unet_batch_rows", "Rows per denoiser call (batching).", ROW_BUCKETS)
        self.images = Counter("edgediff_images_total", "Images returned.")
        self.requests = Counter("edgediff_requests_total", "HTTP responses by route and status.")
        self.errors = Counter("edgediff_errors_total", "Failed requests by kind.")
        self._all = (self.queue_depth, self.inflight, self.stage_seconds, self.unet_rows, self.images, self.requests,
                     self.errors)

    def render(self) -> str:
        return "\n".join(line for m in self._all for line in m.lines()) + "\n"
