"""The native TensorRT backend and what it needs to load and verify a plan, all in the core:

    backend.py  TrtBackend / TrtOptions (``backend="trt"``)
    cache.py    the engine cache: EngineKey, layout, meta verification (and the builder's atomic store), rebuild hint
    device.py   the tensorrt module, cuda-python, the GPU's description

Only plain Python at import: ``tensorrt`` and cuda-python are imported when an engine is opened. The builder
(engines/tensorrt/build.py) imports this package; nothing here imports engines/.
"""
from .backend import TrtBackend, TrtOptions

__all__ = ["TrtBackend", "TrtOptions"]
