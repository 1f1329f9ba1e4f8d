"""``edgediff doctor``: one screen that says why something will or will not run here."""
from __future__ import annotations

import platform
import sys
from pathlib import Path


def report(engine_dirs: list[Path]) -> list[tuple[str, str, bool]]:
    """(item, finding, ok) rows. Never raises: a missing piece is a finding."""
    rows: list[tuple[str, str, bool]] = []
    rows.append(("python", f"{platform.python_version()} ({sys.executable})", sys.version_info >= (3, 10)))
    rows.append(("platform", f"{platform.system()} {platform.machine()} {platform.release()}", True))
    try:
        import numpy

        rows.append(("numpy", numpy.__version__, True))
    except ImportError:
        rows.append(("numpy", "not installed: pip install edgediff", False))
    try:
        import onnxruntime as ort

        rows.append(("onnxruntime", f"{ort.__version__}; providers: {', '.join(ort.get_available_providers())}", True))
    except ImportError:
        rows.append(("onnxruntime", "not installed: pip install edgediff (or edgediff[gpu] for CUDA/TensorRT)", False))

    from edgediff.backends.tensorrt import device
    from edgediff.errors import EdgediffError

    trt_version = None
    try:
        trt_version = device.import_tensorrt().__version__
        rows.append(("tensorrt", trt_version, True))
    except EdgediffError as exc:
        rows.append(("tensorrt", str(exc), False))
    gpu = None
    try:
        gpu = device.gpu()
        rows.append(("cuda", f"driver {gpu.driver}, runtime {gpu.runtime}", True))
        rows.append(("gpu", f"{gpu.name}, compute capability {gpu.compute_capability}, "
                            f"{gpu.free_bytes / 2**30:.1f} of {gpu.total_bytes / 2**30:.1f} GiB free", True))
    except EdgediffError as exc:
        rows.append(("cuda / gpu", str(exc), False))
    except Exception as exc:  # cuda-python present but no driver/device: its own error types
        rows.append(("cuda / gpu", f"no usable NVIDIA GPU ({type(exc).__name__}: {str(exc)[:120]})", False))

    from edgediff.backends.tensorrt.cache import EngineCache

    for d in engine_dirs:
        entries = EngineCache(d).entries()
        if not entries:
            rows.append((f"engines {d}", "none cached", True))
        for meta in entries:
            key = meta.get("key") or {}
            label = f"engine {Path(meta['_meta_file']).name.removesuffix('.meta.json')}"
            if "_error" in meta:
                rows.append((label, meta["_error"] + ": rebuild with edgediff build --force", False))
                continue
            problems = []
            if trt_version is not None and key.get("tensorrt") != trt_version:
                problems.append(f"built with TensorRT {key.get('tensorrt')}, this machine has {trt_version}")
            if gpu is not None and (key.get("gpu"), key.get("compute_capability")) != (gpu.name, gpu.compute_capability):
                problems.append(f"built for {key.get('gpu')} (sm {key.get('compute_capability')}), this GPU is "
                                f"{gpu.name} (sm {gpu.compute_capability})")
            plan = Path(meta["_meta_file"]).with_name(Path(meta["_meta_file"]).name.removesuffix(".meta.json") + ".plan")
            if not plan.is_file() or plan.stat().st_size != meta.get("plan_bytes"):
                problems.append("plan file missing or truncated")
            if trt_version is None or gpu is None:
                problems.append("cannot check here (no TensorRT or GPU)")
            status = "; ".join(problems) if problems else "compatible"
            rows.append((label, f"{key.get('component')}: TensorRT {key.get('tensorrt')}, {key.get('gpu')}, "
                                f"{(meta.get('plan_bytes') or 0) / 2**20:.0f} MiB -- {status}", not problems))
    return rows
