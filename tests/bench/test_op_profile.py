"""bench's operator profile goes through the Backend seam's optional Profiling capability: ONNX Runtime backends give
per-operator times; a backend without a profiler is refused with one line before any model is loaded."""
from __future__ import annotations

import pytest

from edgediff.bench.runner import BenchConfig, op_profile
from edgediff.errors import InputError


def test_op_profile_ranks_the_denoisers_operators(tiny_sd1_bundle):
    ops = op_profile(BenchConfig(str(tiny_sd1_bundle), steps=2, height=32, width=32), 4)
    assert 1 <= len(ops) <= 4 and {"op", "seconds", "percent"} <= set(ops[0])
    assert [o["seconds"] for o in ops] == sorted((o["seconds"] for o in ops), reverse=True)
    assert 0 < sum(o["percent"] for o in ops) <= 100.0 + 1e-9


def test_op_profile_on_a_backend_without_a_profiler_is_one_line(tiny_sd1_bundle, monkeypatch):
    import edgediff.pipeline

    monkeypatch.setattr(edgediff.pipeline.Pipeline, "load", lambda *a, **k: pytest.fail("loaded a model first"))
    with pytest.raises(InputError, match=r"^--profile-ops needs a backend that can profile: cpu/cuda/tensorrt "
                                         r"\(ONNX Runtime\); 'trt' cannot$"):
        op_profile(BenchConfig(str(tiny_sd1_bundle), backend="trt"), 3)


def test_the_profiled_pipeline_is_never_open_beside_the_measured_one(tiny_sd1_bundle, monkeypatch):
    """bench --profile-ops loads a second pipeline with the profiler on; with the measured one still open, an SDXL
    bench was killed by the OOM killer. At most one pipeline is open at any time, and the profile is reported."""
    from edgediff import Pipeline
    from edgediff.bench.sweep import Axes, Settings, run

    live, most = [], [0]
    load, close = Pipeline.load.__func__, Pipeline.close

    def counting_load(cls, *a, **kw):
        p = load(cls, *a, **kw)
        live.append(p)
        most[0] = max(most[0], len(live))
        return p

    def counting_close(self):
        if self in live:
            live.remove(self)
        return close(self)

    monkeypatch.setattr(Pipeline, "load", classmethod(counting_load))
    monkeypatch.setattr(Pipeline, "close", counting_close)
    result = run([tiny_sd1_bundle], Axes(backend=["cpu"], steps=[2, 3], size=[(32, 32)]),
                   Settings(runs=1, warmup=0, profile_ops=3))
    assert [len(r["ops"]) for r in result.rows] == [3, 3]
    assert most[0] == 1 and live == []
