"""Statistics of the bench harness, checked against numpy."""
import numpy as np
import pytest

from edgediff.bench.stats import percentile, summarize


@pytest.mark.parametrize("values", [[3.0], [1.0, 2.0], [5, 1, 4, 2, 3], list(np.random.default_rng(0).random(101))])
def test_summary_matches_numpy(values):
    s = summarize(values)
    v = np.asarray(values, float)
    assert s.n == len(v) and s.min == v.min() and s.max == v.max()
    for q, got in ((50, s.p50), (90, s.p90), (99, s.p99)):
        assert got == pytest.approx(np.percentile(v, q))
    assert s.mean == pytest.approx(v.mean())
    assert s.std == pytest.approx(v.std(ddof=1) if len(v) > 1 else 0.0)


def test_percentile_interpolates():
    assert percentile([0.0, 10.0], 50) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)


def test_empty_is_an_error():
    with pytest.raises(ValueError):
        summarize([])
