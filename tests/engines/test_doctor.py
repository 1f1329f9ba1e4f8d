"""edgediff doctor and the TensorRT commands on a machine without TensorRT or a GPU: one line each."""
from __future__ import annotations

import importlib.util

import pytest
from click.testing import CliRunner

from edgediff.cli import main

no_trt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")


def test_doctor_reports_every_piece(tmp_path):
    from edgediff.backends.tensorrt.cache import EngineCache, EngineKey

    EngineCache(tmp_path).store(EngineKey("unet", "a" * 64, "10.3.0", "Orin", "8.7"), b"plan")
    r = CliRunner().invoke(main, ["doctor", "--engine-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    for item in ("python", "numpy", "onnxruntime", "tensorrt", "engine unet-"):
        assert item in r.output
    assert "CPUExecutionProvider" in r.output and "Orin" in r.output


@no_trt
def test_build_and_trt_backend_say_what_is_missing(tiny_sd1_bundle, tmp_path):
    r = CliRunner().invoke(main, ["build", str(tiny_sd1_bundle)])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1].startswith("error: TensorRT is not installed: on Jetson")
    r = CliRunner().invoke(main, ["generate", "a", "-m", str(tiny_sd1_bundle), "--backend", "trt",
                                  "-o", str(tmp_path / "x.png")])
    assert r.exit_code != 0 and "pip install 'edgediff[gpu]'" in r.output.strip().splitlines()[-1]
    assert not (tmp_path / "x.png").exists()


def test_build_rejects_bad_options_before_touching_tensorrt(tiny_sd1_bundle):
    r = CliRunner().invoke(main, ["build", str(tiny_sd1_bundle), "--static", "1x64x64", "--profile", "images=1:1:2"])
    assert r.exit_code != 0 and "give --static or --profile, not both" in r.output
    r = CliRunner().invoke(main, ["build", str(tiny_sd1_bundle), "--profile", "height=32:16:64"])
    assert r.exit_code != 0 and "1 <= min <= opt <= max" in r.output
