"""Read ``.safetensors`` files with numpy alone (no torch, no new dependency).

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian unsigned header length N, then N
bytes of UTF-8 JSON ``{name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__":
{str: str}}``, then the tensors' raw little-endian bytes, offsets relative to the end of the header. The reader
checks what a hostile or truncated file could get wrong (header size, offsets inside the data and not
overlapping, byte counts matching dtype x shape) and says so in one line; tensors are read one at a time, so a
LoRA file is never held twice.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from ..errors import InputError

MAX_HEADER_BYTES = 100 << 20  # the format's own limit (the reference implementation refuses larger headers)
# safetensors dtype -> numpy dtype (little-endian). BF16 has no numpy dtype: read as uint16 and widened to float32.
DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
          "I8": "i1", "U8": "u1", "BOOL": "?"}


class SafetensorsFile:
    """An open ``.safetensors`` file: ``keys()``, ``shape(k)``, ``dtype(k)``, ``get(k)`` and the ``metadata``
    strings. ``get`` returns a fresh array (float tensors of any width come back as their own dtype; BF16 as
    float32)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._entries, self.metadata, self._data_start = _read_header(self.path)

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> str:
        """The safetensors dtype name (``"F32"``, ``"BF16"``, ...)."""
        return self._entries[key][0]

    def get(self, key: str) -> np.ndarray:
        dtype, shape, begin, end = self._entries[key]
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            raw = f.read(end - begin)
        if len(raw) != end - begin:
            raise InputError(f"{self.path}: truncated: tensor {key!r} ends past the end of the file; re-download it")
        a = np.frombuffer(raw, dtype=DTYPES[dtype]).reshape(shape)
        if dtype == "BF16":  # bfloat16 is the top half of a float32
            return (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(a.dtype.newbyteorder("="), copy=True)

    def tensors(self) -> dict[str, np.ndarray]:
        return {k: self.get(k) for k in self._entries}


def _read_header(path: Path) -> tuple[dict, dict[str, str], int]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{path} is not a safetensors file: {size} bytes, shorter than its 8-byte header "
                                 "length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise InputError(f"{path} is not a safetensors file (its first 8 bytes give a header of {n} bytes, "
                                 f"the file has {size}); LoRAs must be .safetensors files")
            header_bytes = f.read(n)
    except FileNotFoundError:
        raise InputError(f"LoRA file not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a folder; give the LoRA's .safetensors file") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InputError(f"{path} is not a safetensors file (its header is not JSON); LoRAs must be .safetensors "
                         "files") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise InputError(f"{path}: __metadata__ must map strings to strings")
    data_start, data_len = 8 + n, size - 8 - n
    entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    spans = []
    for key, e in header.items():
        if not isinstance(e, dict) or set(e) - {"dtype", "shape", "data_offsets"} or len(e) != 3:
            raise InputError(f"{path}: tensor {key!r} has a malformed header entry")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if dtype not in DTYPES:
            raise InputError(f"{path}: tensor {key!r} has dtype {dtype!r}; readable: {', '.join(DTYPES)}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise InputError(f"{path}: tensor {key!r} has a malformed shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_len):
            raise InputError(f"{path}: tensor {key!r} lies outside the file (offsets {offsets!r}, {data_len} data "
                             "bytes): truncated or not a safetensors file")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
        if nbytes != offsets[1] - offsets[0]:
            raise InputError(f"{path}: tensor {key!r} has {offsets[1] - offsets[0]} bytes for {dtype} {shape} "
                             f"({nbytes} expected)")
        entries[key] = (dtype, tuple(shape), offsets[0], offsets[1])
        spans.append((offsets[0], offsets[1], key))
    spans.sort()
    for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise InputError(f"{path}: tensors {k0!r} and {k1!r} overlap; the file is corrupt")
    return entries, meta, data_start
