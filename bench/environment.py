"""What a benchmark result was measured on: recorded with every result so numbers can be compared across machines."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata

NOT_MEASURED = (
    "GPU kernel time separately from host time (wall clock only)",
    "energy and thermals; CPU frequency scaling was not controlled",
    "image quality (see the default model's eval for adherence)",
    "PNG encoding and file writes",
)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info() -> list[dict]:
    """GPUs through NVML (nvidia-ml-py), or [] where there is none or NVML is not installed."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound / DriverNotLoaded: no NVIDIA GPU here
        return []
    out = []
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            out.append({"name": pynvml.nvmlDeviceGetName(h), "driver": driver, "compute_capability": f"{major}.{minor}",
                        "memory_total": int(mem.total)})
    finally:
        pynvml.nvmlShutdown()
    return out


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def record(*, providers: list[str] | None = None, bundle_digest: str | None = None, precision: str | None = None) -> dict:
    import onnxruntime

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "gpus": gpu_info(),
        "packages": {name: _version(name) for name in ("edgediff", "onnxruntime", "onnxruntime-gpu", "numpy",
                                                        "tensorrt", "tokenizers")},
        "providers_available": onnxruntime.get_available_providers(),
        "providers": providers or [],
        "precision": precision,
        "bundle": bundle_digest,
        "command": sys.argv,
        "git_commit": git_commit(),
        "not_measured": list(NOT_MEASURED),
    }
