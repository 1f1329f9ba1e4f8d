"""The numpy safetensors reader (runtime/lora/safetensors_np.py) against the reference ``safetensors`` package:
files written by the package read back equal, byte for byte, with their metadata; broken files are one line."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from edgediff.errors import InputError
from edgediff.lora.safetensors_np import SafetensorsFile

st_numpy = pytest.importorskip("safetensors.numpy")


def test_reads_what_the_safetensors_package_writes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a.lora_A.weight": rng.standard_normal((4, 32)).astype(np.float32),
        "a.lora_B.weight": rng.standard_normal((32, 4)).astype(np.float16),
        "conv.lora_down.weight": rng.standard_normal((4, 8, 3, 3)).astype(np.float64),
        "conv.alpha": np.array(8.0, dtype=np.float32),  # a 0-d tensor, as kohya writes alphas
        "ids": rng.integers(-5, 5, (3, 2)).astype(np.int64),
        "mask": np.array([True, False]),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    path = tmp_path / "x.safetensors"
    st_numpy.save_file(tensors, str(path), metadata={"format": "pt", "k": "v"})
    f = SafetensorsFile(path)
    assert sorted(f.keys()) == sorted(tensors)
    assert f.metadata == {"format": "pt", "k": "v"}
    for k, v in tensors.items():
        got = f.get(k)
        assert got.dtype == v.dtype and got.shape == v.shape, k
        assert got.tobytes() == v.tobytes(), k
    got = f.get("a.lora_A.weight")
    got[0, 0] = 1.0  # a fresh, writable array: the reader hands out copies


def test_bfloat16_widens_to_float32_exactly(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    t = torch.randn(5, 7).to(torch.bfloat16)
    path = tmp_path / "bf16.safetensors"
    save_file({"w": t}, str(path))
    got = SafetensorsFile(path).get("w")
    assert got.dtype == np.float32
    assert np.array_equal(got, t.to(torch.float32).numpy())


def _write_raw(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("case,match", [
    ("short", "shorter than its 8-byte header"),
    ("huge_header", "is not a safetensors file"),
    ("not_json", "header is not JSON"),
    ("past_end", "lies outside the file"),
    ("bad_dtype", "dtype 'Q8'"),
    ("bad_count", "expected"),
    ("overlap", "overlap"),
    ("bad_metadata", "__metadata__"),
])
def test_broken_files_are_one_line(tmp_path, case, match):
    path = tmp_path / f"{case}.safetensors"
    if case == "short":
        path.write_bytes(b"\x01\x02")
    elif case == "huge_header":
        path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    elif case == "not_json":
        path.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{x")
    elif case == "past_end":
        _write_raw(path, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    elif case == "bad_dtype":
        _write_raw(path, {"w": {"dtype": "Q8", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4)
    elif case == "bad_count":
        _write_raw(path, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16)
    elif case == "overlap":
        _write_raw(path, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)
    elif case == "bad_metadata":
        _write_raw(path, {"__metadata__": {"k": 1}})
    with pytest.raises(InputError, match=match) as info:
        SafetensorsFile(path)
    assert "\n" not in str(info.value)


def test_missing_file_and_folder_are_one_line(tmp_path):
    with pytest.raises(InputError, match="LoRA file not found"):
        SafetensorsFile(tmp_path / "nope.safetensors")
    with pytest.raises(InputError, match="is a folder"):
        SafetensorsFile(tmp_path)
