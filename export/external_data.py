"""Gather a graph's external tensors into one data file by copying bytes, never loading the weights.

torch.onnx.export writes a model over 2 GiB (protobuf's limit) as a graph plus one file per tensor. The bundle
stores one ``model.onnx_data`` beside the graph, as optimum does. Loading the tensors to re-save them (``onnx.load``
with external data) would hold a second full copy of the weights next to the PyTorch model still in memory (10 GB
more for SDXL's UNet); this copies them file to file in chunks and rewrites only the small graph proto.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

from edgediff.errors import ExportError

CHUNK = 64 << 20  # bytes per read/write


def has_external_data(model) -> bool:
    from onnx import TensorProto

    return any(t.data_location == TensorProto.EXTERNAL for t in _tensors(model.graph))


def gather_external_data(model, src_dir: Path, dst: Path) -> None:
    """Append the bytes of every external tensor of ``model`` (a ModelProto loaded without external data, whose
    locations are relative to ``src_dir``) to ``dst`` in graph order, and point each tensor at its new place. The
    proto is changed in place; save it next to ``dst`` afterwards."""
    from onnx import TensorProto
    from onnx.external_data_helper import ExternalDataInfo

    src_dir = Path(src_dir).resolve()
    with open(dst, "xb") as out:  # "x": never append to someone else's file
        for tensor in _tensors(model.graph):
            if tensor.data_location != TensorProto.EXTERNAL:
                continue
            info = ExternalDataInfo(tensor)
            src = (src_dir / info.location).resolve()
            if src.parent != src_dir or not src.is_file():  # our own export's files, but check before reading
                raise ExportError(f"{tensor.name}: external data {info.location!r} is not a file of {src_dir}")
            offset = out.tell()
            with open(src, "rb") as f:
                f.seek(info.offset or 0)
                length = _copy(f, out, info.length)
            _point(tensor, dst.name, offset, length)


def _point(tensor, location: str, offset: int, length: int) -> None:
    # onnx's set_external_data wants the bytes in the proto, which is what this module avoids: set the entries
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _copy(src, dst, length: int | None) -> int:
    if length is None:  # the rest of the file
        before = dst.tell()
        shutil.copyfileobj(src, dst, CHUNK)
        return dst.tell() - before
    left = length
    while left:
        block = src.read(min(CHUNK, left))
        if not block:
            raise ExportError(f"external data ends {left} bytes early; the export was cut short")
        dst.write(block)
        left -= len(block)
    return length


def _tensors(graph) -> Iterator:
    """Initializers and tensor-valued attributes, into subgraphs (onnx's own walk, public API only)."""
    from onnx import AttributeProto

    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == AttributeProto.GRAPH:
                yield from _tensors(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _tensors(g)
