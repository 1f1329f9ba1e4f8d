"""The base weights a bundle stores, read by initializer name without loading the whole graph's weights.

The graph proto is parsed without its external data; an external tensor is a read-only view of a memory map of
its data file (pages come from the page cache and are dropped under pressure, never copied into the process), an
embedded one a view of the proto's bytes. Nothing here writes: the base arrays are never modified in place, every
fused weight is a new array.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle.safety import resolve_inside
from ..errors import BundleError


@dataclass(frozen=True)
class InitializerInfo:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]


class GraphWeights:
    """Initializers of one ONNX graph (``model_path``, whose external data the bundle already checked)."""

    def __init__(self, model_path: Path):
        import onnx  # base dependency; imported here to keep `import edgediff` light

        self.path = Path(model_path)
        try:
            model = onnx.load(str(self.path), load_external_data=False)
        except Exception as exc:  # protobuf's DecodeError and friends
            raise BundleError(f"{self.path}: not a readable ONNX file ({type(exc).__name__}); re-export the "
                              "bundle") from None
        self._tensors = {t.name: t for t in model.graph.initializer}
        self._maps: dict[str, np.memmap] = {}

    def info(self, name: str) -> InitializerInfo | None:
        t = self._tensors.get(name)
        if t is None:
            return None
        return InitializerInfo(name, _np_dtype(t.data_type, self.path, name), tuple(int(d) for d in t.dims))

    def info_or_none(self, name: str) -> InitializerInfo | None:
        """``info`` for float initializers, None for others (integer shape constants and the like)."""
        t = self._tensors.get(name)
        if t is None or t.data_type not in _float_types():
            return None
        return self.info(name)

    def names(self) -> list[str]:
        return list(self._tensors)

    def read(self, name: str) -> np.ndarray:
        """The initializer's values as stored (ONNX layout and dtype); a read-only view, never to be written."""
        from onnx import TensorProto, numpy_helper

        t = self._tensors[name]
        info = self.info(name)
        count = int(np.prod(info.shape, dtype=np.int64))
        if t.data_location == TensorProto.EXTERNAL:
            location, offset, nbytes = self._external(t, info)
            buf = self._map(location)
            if offset + nbytes > buf.size:
                raise BundleError(f"{self.path}: initializer {name!r} lies past the end of its external data; the "
                                  "bundle is truncated (edgediff inspect --verify)")
            a = buf[offset:offset + nbytes].view(info.dtype.newbyteorder("<")).reshape(info.shape)
        elif t.HasField("raw_data"):
            a = np.frombuffer(t.raw_data, dtype=info.dtype.newbyteorder("<"), count=count).reshape(info.shape)
        else:  # typed fields (float_data, ...): small tensors written without raw bytes
            a = numpy_helper.to_array(t)
        a = a.view()
        a.flags.writeable = False
        return a

    def read_copy(self, name: str) -> np.ndarray:
        """A private, writable, C-contiguous copy of the initializer (ONNX layout and dtype). External data is read
        with plain file reads into the new array: no memory map stays mapped, so the process's resident set holds
        only the copies (a map's pages count as resident until it is closed: a whole UNet's worth on a swap)."""
        from onnx import TensorProto

        t = self._tensors[name]
        if t.data_location != TensorProto.EXTERNAL:
            return np.array(self.read(name), order="C", copy=True)
        info = self.info(name)
        location, offset, nbytes = self._external(t, info)
        path = resolve_inside(self.path.parent, location, what=f"{self.path.name} external data")
        a = np.empty(info.shape, dtype=info.dtype.newbyteorder("<"))
        with open(path, "rb") as f:
            f.seek(offset)
            got = f.readinto(memoryview(a).cast("B"))
        if got != nbytes:
            raise BundleError(f"{self.path}: initializer {name!r} lies past the end of its external data; the "
                              "bundle is truncated (edgediff inspect --verify)")
        return a

    def _external(self, t, info: InitializerInfo) -> tuple[str, int, int]:
        """(location, offset, byte count) of an external tensor, its recorded length checked."""
        ext = {e.key: e.value for e in t.external_data}
        offset, length = int(ext.get("offset", 0) or 0), ext.get("length")
        nbytes = int(np.prod(info.shape, dtype=np.int64)) * info.dtype.itemsize
        if length is not None and int(length) != nbytes:
            raise BundleError(f"{self.path}: initializer {t.name!r} has {length} external bytes for "
                              f"{info.dtype} {info.shape}; re-export the bundle")
        return ext.get("location", ""), offset, nbytes

    def _map(self, location: str) -> np.memmap:
        if location not in self._maps:
            path = resolve_inside(self.path.parent, location, what=f"{self.path.name} external data")
            self._maps[location] = np.memmap(path, dtype=np.uint8, mode="r")
        return self._maps[location]


def _float_types() -> dict[int, type]:
    from onnx import TensorProto

    return {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64}


def _np_dtype(data_type: int, path: Path, name: str) -> np.dtype:
    table = _float_types()
    if data_type not in table:
        from onnx import helper

        kind = helper.tensor_dtype_to_string(data_type)
        raise BundleError(f"{path}: weight {name!r} is stored as {kind}; LoRA weights can be added to float32/float16 "
                          "weights only: fuse the LoRA at export and re-quantize")
    return np.dtype(table[data_type])
