"""What this machine offers for TensorRT: the tensorrt module, CUDA through cuda-python, the GPU. Every probe
returns facts or raises one typed line (MissingDependency, EngineError) saying what is missing; importing this module
needs neither TensorRT nor a GPU. Used by the TensorRT backend, ``edgediff build`` and ``edgediff doctor``."""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import EngineError, MissingDependency

INSTALL_TRT = ("TensorRT is not installed: on Jetson it comes with JetPack (sudo apt install nvidia-tensorrt, "
               "then use the system python3); on x86_64 with an NVIDIA driver: pip install 'edgediff[gpu]'")
INSTALL_CUDA = ("cuda-python is not installed (edgediff drives the GPU through it, without torch or cupy): "
                "pip install 'edgediff[gpu]' (on Jetson: pip install cuda-python matching JetPack's CUDA)")


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: str  # "8.7"
    total_bytes: int
    free_bytes: int
    driver: str  # CUDA driver API version, e.g. "12.6"
    runtime: str


def import_tensorrt():
    """The tensorrt module, or raise MissingDependency with the install line."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise MissingDependency(INSTALL_TRT) from None
    except OSError as exc:  # the wheel is there but libnvinfer or the driver is not
        raise MissingDependency(f"TensorRT is installed but cannot load its libraries ({exc}); check the NVIDIA "
                                "driver and CUDA libraries (edgediff doctor)") from None
    return tensorrt


def cudart():
    """cuda-python's runtime bindings (module path changed in cuda-python 12.6/13), or MissingDependency."""
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart as runtime  # older cuda-python
        return runtime
    except ImportError:
        raise MissingDependency(INSTALL_CUDA) from None


def check(result, what: str):
    """cuda-python returns (error, *values): raise EngineError on an error, else return the value(s)."""
    err, *values = result
    if int(err) != 0:
        raise EngineError(f"CUDA: {what} failed with {err!r}")
    return values[0] if len(values) == 1 else tuple(values)


def gpu(device: int = 0) -> Gpu:
    rt = cudart()
    prop = check(rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    free, total = check(rt.cudaMemGetInfo(), "cudaMemGetInfo")
    drv = check(rt.cudaDriverGetVersion(), "cudaDriverGetVersion")
    run = check(rt.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")
    name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
    return Gpu(name=name, compute_capability=f"{prop.major}.{prop.minor}", total_bytes=int(total),
               free_bytes=int(free), driver=_cuda_version(drv), runtime=_cuda_version(run))


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"
