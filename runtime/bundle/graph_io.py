"""Read a component's I/O signature from its ONNX graph (names, dtypes, symbolic dims) without loading weights."""
from __future__ import annotations

from pathlib import Path

from ..errors import BundleError
from .manifest import TensorSpec

# onnx.TensorProto element types -> numpy dtype names
_ELEM = {1: "float32", 10: "float16", 16: "bfloat16", 6: "int32", 7: "int64", 9: "bool", 2: "uint8", 3: "int8"}


def graph_io(model_path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError etc.
        raise BundleError(f"{model_path}: not a readable ONNX file ({type(exc).__name__}); re-export the bundle") from None
    init_names = {t.name for t in model.graph.initializer}

    def spec(v) -> TensorSpec:
        tt = v.type.tensor_type
        if tt.elem_type not in _ELEM:
            raise BundleError(f"{model_path}: tensor {v.name!r} has unsupported element type {tt.elem_type}")
        dims = tuple(d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?") for d in tt.shape.dim)
        return TensorSpec(name=v.name, dtype=_ELEM[tt.elem_type], shape=dims)

    inputs = tuple(spec(v) for v in model.graph.input if v.name not in init_names)
    outputs = tuple(spec(v) for v in model.graph.output)
    return inputs, outputs
