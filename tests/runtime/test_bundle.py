"""Bundle reading: optimum-layout bundles, path safety of everything a bundle names, and clear refusals."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from edgediff.bundle.checksums import sha256_file
from edgediff.bundle.manifest import MANIFEST_NAME, GenerationDefaults, Manifest
from edgediff.bundle.reader import Bundle
from edgediff.bundle.safety import check_external_data, resolve_inside
from edgediff.cli import main
from edgediff.errors import BundleError, BundleNotFound, UnsafePathError


def external_graph(path: Path, location: str) -> None:
    """A one-node graph whose weight is stored as external data at ``location`` (not necessarily existing)."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [1], [0.0])
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "4")):
        e = w.external_data.add()
        e.key, e.value = k, v
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize("location", ["../../outside.bin", "/etc/passwd", "sub/../../../x.bin"])
def test_external_data_escape_is_refused(tmp_path, location):
    (tmp_path / "unet").mkdir()
    external_graph(tmp_path / "unet" / "model.onnx", location)
    with pytest.raises(UnsafePathError, match="unet/model.onnx"):
        check_external_data(tmp_path, "unet/model.onnx")


def test_external_data_symlink_escape_is_refused(tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"\0" * 4)
    root = tmp_path / "bundle"
    (root / "unet").mkdir(parents=True)
    os.symlink(outside, root / "unet" / "weights.bin")
    external_graph(root / "unet" / "model.onnx", "weights.bin")
    with pytest.raises(UnsafePathError, match="outside the bundle"):
        check_external_data(root, "unet/model.onnx")


def test_inside_paths_are_fine(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "model.onnx_data").write_bytes(b"\0" * 4)
    external_graph(tmp_path / "unet" / "model.onnx", "model.onnx_data")
    assert check_external_data(tmp_path, "unet/model.onnx") == ["unet/model.onnx_data"]
    assert resolve_inside(tmp_path, "unet/model.onnx", what="t") == (tmp_path / "unet" / "model.onnx").resolve()


def test_tampered_graph_with_valid_hashes_is_still_refused(bundle_copy):
    """A manifest can be rewritten along with the graph: the path check does not trust it."""
    external_graph(bundle_copy / "unet" / "model.onnx", "../../../../etc/passwd")
    data = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    f = data["components"]["unet"]["files"][0]
    f["size"] = (bundle_copy / "unet" / "model.onnx").stat().st_size
    f["sha256"] = sha256_file(bundle_copy / "unet" / "model.onnx")
    (bundle_copy / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(UnsafePathError, match="escapes the bundle"):
        Bundle.open(bundle_copy).model_path("unet")
    r = CliRunner().invoke(main, ["generate", "x", "-m", str(bundle_copy), "-o", str(bundle_copy / "o.png")])
    assert r.exit_code != 0 and "escapes the bundle" in r.output and "Traceback" not in r.output


def test_manifest_entry_escaping_is_refused_at_open(bundle_copy):
    data = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    data["files"][0]["path"] = "../../somewhere"
    (bundle_copy / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(UnsafePathError):
        Bundle.open(bundle_copy)


def test_optimum_layout_loads_through_the_same_reader(bundle_copy, tiny_sd1_bundle):
    """optimum's ONNX export writes this layout without edgediff.json: the manifest is derived from the graphs."""
    (bundle_copy / MANIFEST_NAME).unlink()
    b = Bundle.open(bundle_copy)
    ours = Bundle.open(tiny_sd1_bundle).manifest
    assert b.derived and "optimum" in b.manifest.provenance.exporter
    assert b.manifest.family == ours.family and b.manifest.scaling_factor == ours.scaling_factor
    for name, comp in ours.components.items():
        derived = b.manifest.components[name]
        assert derived.inputs == comp.inputs and derived.outputs == comp.outputs
        assert derived.files == comp.files and derived.parity is None
    assert b.verify() == []


def test_not_a_bundle_messages(tmp_path, tiny_sd1_source):
    with pytest.raises(BundleNotFound, match="does not exist"):
        Bundle.open(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleNotFound, match="is a file"):
        Bundle.open(tmp_path / "file")
    with pytest.raises(BundleNotFound, match="neither"):
        Bundle.open(tmp_path)
    with pytest.raises(BundleNotFound, match="edgediff export"):
        Bundle.open(tiny_sd1_source)


def test_malformed_manifest(bundle_copy):
    (bundle_copy / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.open(bundle_copy)
    (bundle_copy / MANIFEST_NAME).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(BundleError, match="format_version 99"):
        Bundle.open(bundle_copy)


def test_manifest_validates_values(tiny_sd1_bundle):
    data = json.loads((tiny_sd1_bundle / MANIFEST_NAME).read_text())
    data["family"] = "sd9"
    with pytest.raises(BundleError, match="expected one of"):
        Manifest.from_dict(data)


def test_large_file_hashes_are_cached_on_disk_and_edits_invalidate(tmp_path, monkeypatch):
    import hashlib

    from edgediff.bundle import checksums

    monkeypatch.setattr(checksums, "DISK_CACHE_MIN_BYTES", 1)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"a" * 1000)
    digest = checksums.sha256_file(f)
    (entry,) = (tmp_path / "cache" / "edgediff" / "sha256").iterdir()
    assert entry.read_text().strip() == digest
    checksums._cache.clear()  # what a fresh process sees: only the disk entry
    entry.write_text("0" * 64)  # a planted entry is used, which proves the disk cache is read ...
    assert checksums.sha256_file(f) == "0" * 64
    assert checksums.sha256_file(f, fresh=True) == digest  # ... and fresh=True (inspect --verify) ignores it
    f.write_bytes(b"b" * 1000)  # an edit moves ctime/mtime: a new identity, so the file is hashed again
    checksums._cache.clear()
    assert checksums.sha256_file(f) == hashlib.sha256(b"b" * 1000).hexdigest()
    monkeypatch.setenv("EDGEDIFF_HASH_CACHE", "0")
    assert checksums._disk_dir() is None


def test_recommended_defaults_round_trip_and_are_checked(tiny_sd1_bundle):
    data = json.loads((tiny_sd1_bundle / MANIFEST_NAME).read_text())
    data.pop("defaults", None)  # manifests written before the field existed
    assert Manifest.from_dict(data).defaults == GenerationDefaults()
    data["defaults"] = {"steps": 4, "guidance_scale": 0.0}
    m = Manifest.from_dict(data)
    assert m.defaults == GenerationDefaults(4, 0.0)
    assert Manifest.from_json(m.to_json()).defaults == GenerationDefaults(4, 0.0)
    for bad, message in (({"steps": 0}, "from 1 to 1000"), ({"steps": 2.5}, "from 1 to 1000"),
                         ({"guidance_scale": -1}, "finite number >= 0"), ({"guidance_scale": "nan"}, "finite")):
        with pytest.raises(BundleError, match=message):
            Manifest.from_dict({**data, "defaults": bad})
    with pytest.warns(UserWarning, match="ignoring unknown keys \\['scheduler'\\]"):
        assert Manifest.from_dict({**data, "defaults": {"steps": 4, "scheduler": "lcm"}}).defaults.steps == 4
