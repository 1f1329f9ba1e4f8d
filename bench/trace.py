"""Chrome / Perfetto trace (the JSON "traceEvents" format) of one generation: one complete event per span."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from edgediff.timing import Span


def trace_events(spans: Sequence[Span], *, pid: int = 1) -> list[dict]:
    if not spans:
        return []
    t0 = min(s.start for s in spans)
    events = []
    for s in spans:
        lane = {"total": 1, "step": 2}.get(s.name, 3)  # whole call / steps / stages on their own rows
        ev = {"name": s.name if s.step is None else f"{s.name} {s.step}", "cat": s.name, "ph": "X", "pid": pid,
              "tid": lane, "ts": (s.start - t0) * 1e6, "dur": (s.end - s.start) * 1e6}
        if s.step is not None:
            ev["args"] = {"step": s.step}
        events.append(ev)
    return events


def write_trace(path: Path, spans: Sequence[Span], *, overwrite: bool = False) -> None:
    from edgediff.outputs import write_atomic

    doc = {"traceEvents": trace_events(spans), "displayTimeUnit": "ms",
           "metadata": {"tids": {"1": "call", "2": "steps", "3": "stages"}}}
    write_atomic(Path(path), json.dumps(doc).encode(), overwrite=overwrite)
