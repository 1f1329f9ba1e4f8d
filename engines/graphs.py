"""ONNX graph file helpers shared by the engine commands: load/save with external data, static shapes."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Mapping

from edgediff.errors import EngineError

# protobuf cannot hold more than 2 GiB; above this, weights go to one external-data file beside the graph
# ("model.onnx_data", the name optimum uses), always a plain relative name inside the component folder.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
EXTERNAL_DATA_NAME = "model.onnx_data"


def load_model(path: Path, *, weights: bool = True):
    """The graph at ``path``; with ``weights=False`` its external-data tensors stay references (no weight is read)."""
    import onnx

    return onnx.load(str(path), load_external_data=weights)


def save_graph_beside(model, path: Path, source: Path) -> None:
    """Save ``model``, loaded from ``source`` without its weights, as ``path``, and give it ``source``'s external
    data file: a hard link where the filesystem allows (no second copy of the weights on disk), else a copy."""
    import onnx

    path = Path(path)
    onnx.save(model, str(path))
    data = Path(source).parent / EXTERNAL_DATA_NAME
    if data.exists():
        target = path.parent / EXTERNAL_DATA_NAME
        try:
            os.link(data, target)
        except OSError:  # another filesystem, or one without hard links
            shutil.copyfile(data, target)


def weights_bytes(model) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save_model(model, path: Path) -> None:
    """Write ``model`` to ``path``: inline when it fits protobuf, else with one external-data file beside it."""
    import onnx

    path = Path(path)
    big = weights_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if (path.parent / EXTERNAL_DATA_NAME).exists():
        os.remove(path.parent / EXTERNAL_DATA_NAME)  # save_as_external_data appends to an existing file
    if big:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=EXTERNAL_DATA_NAME, size_threshold=1024)
    else:
        onnx.save(model, str(path))


def set_static_dims(model, dims: Mapping[str, Mapping[int, int]]) -> None:
    """Fix input dims in place: ``dims[input_name][axis] = value``. Names of graph inputs not in ``dims`` keep
    their symbolic dims. Shape inference in ONNX Runtime then propagates the fixed sizes through the graph."""
    inputs = {i.name: i for i in model.graph.input}
    for name, axes in dims.items():
        if name not in inputs:
            raise EngineError(f"graph has no input {name!r}; it has {sorted(inputs)}")
        shape = inputs[name].type.tensor_type.shape
        for axis, value in axes.items():
            if axis >= len(shape.dim):
                raise EngineError(f"input {name!r} has rank {len(shape.dim)}; cannot fix axis {axis}")
            d = shape.dim[axis]
            if d.HasField("dim_value") and d.dim_value != value:
                raise EngineError(f"input {name!r} axis {axis} is fixed to {d.dim_value} in the graph; cannot make it "
                                  f"{value}")
            d.Clear()
            d.dim_value = value


def constant_names(graph) -> set[str]:
    """Names of the tensors whose values are fixed in ``graph``: initializers and Constant node outputs."""
    return {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}


def _external_tensors(model):
    """Every tensor of ``model``'s main graph whose bytes may live outside it: initializers and Constant values."""
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t


def adopt_external_data(path: Path) -> Path:
    """Rename the external-data file of the graph at ``path`` (saved by another tool under its own name, e.g.
    ``model.onnx.data``) to the bundle's ``EXTERNAL_DATA_NAME`` and point the graph at it; no weight is read."""
    import onnx

    path = Path(path)
    model = load_model(path, weights=False)
    entries = [e for t in _external_tensors(model) for e in t.external_data if e.key == "location"]
    names = {e.value for e in entries}
    if not names or names == {EXTERNAL_DATA_NAME}:
        return path
    if len(names) > 1:
        raise EngineError(f"{path}: weights in {len(names)} external files ({', '.join(sorted(names))}); expected one")
    os.replace(path.parent / names.pop(), path.parent / EXTERNAL_DATA_NAME)
    for e in entries:
        e.value = EXTERNAL_DATA_NAME
    onnx.save(model, str(path))
    return path


def load_model_qparams(path: Path):
    """The graph at ``path`` with only the scales and zero points of its Q/DQ nodes read (what ``qdq_rules`` checks):
    the weights of a multi-GB graph stay on disk."""
    from onnx import TensorProto
    from onnx.external_data_helper import load_external_data_for_tensor

    path = Path(path)
    model = load_model(path, weights=False)
    qparams = {name for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
               for name in n.input[1:3]}
    for t in model.graph.initializer:
        if t.name in qparams and t.data_location == TensorProto.EXTERNAL:
            load_external_data_for_tensor(t, str(path.parent))
            t.data_location = TensorProto.DEFAULT
            del t.external_data[:]
    return model
