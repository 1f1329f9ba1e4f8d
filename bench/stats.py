"""Summary statistics of repeated timings. Percentiles use linear interpolation between order statistics
(numpy's default, "type 7"), so p50 of an even count is the mean of the middle two."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence


@dataclass(frozen=True)
class Summary:
    n: int
    min: float
    p50: float
    p90: float
    p99: float
    mean: float
    std: float  # sample standard deviation (n - 1); 0 for a single value
    max: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, linear interpolation."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> Summary:
    v = sorted(float(x) for x in values)
    if not v:
        raise ValueError("summarize needs at least one value")
    mean = sum(v) / len(v)
    var = sum((x - mean) ** 2 for x in v) / (len(v) - 1) if len(v) > 1 else 0.0
    return Summary(n=len(v), min=v[0], p50=percentile(v, 50), p90=percentile(v, 90), p99=percentile(v, 99),
                   mean=mean, std=math.sqrt(var), max=v[-1])
