"""The no-torch-at-inference check every family's tests run: a generation in a fresh interpreter, after which
torch, diffusers and transformers must not be in ``sys.modules`` (non-negotiable 1)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def assert_generates_without_torch(bundle: Path, png: Path, **call) -> None:
    """Generate "a red circle" from ``bundle`` with ``call``'s keywords (repr-able values) in a subprocess, save the
    first image to ``png``, and fail if a heavy library was imported on the way."""
    args = ", ".join(f"{k}={v!r}" for k, v in call.items())
    code = f"""
import sys
from edgediff import Pipeline
r = Pipeline.load({str(bundle)!r})("a red circle", {args})
r.images[0].save({str(png)!r})
heavy = [m for m in ("torch", "diffusers", "transformers") if m in sys.modules]
print("HEAVY", heavy)
sys.exit(1 if heavy else 0)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "HEAVY []" in out.stdout and png.is_file()
