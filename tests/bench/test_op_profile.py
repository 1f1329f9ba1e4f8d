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
