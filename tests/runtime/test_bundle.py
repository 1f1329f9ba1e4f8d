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
from edgediff.errors import BundleError, BundleIntegrityError, BundleNotFound, ConfigError, UnsafePathError


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


def optimum_like(root: Path, *, rename_dims: bool = True) -> None:
    """Make an edgediff export look as optimum writes it: no edgediff.json, component configs saved by diffusers'
    save_config (which records _diffusers_version), graphs whose batch axis is named 'batch_size'."""
    (root / MANIFEST_NAME).unlink()
    for name in ("unet", "vae_decoder", "vae_encoder"):
        cfg = json.loads((root / name / "config.json").read_text())
        cfg["_diffusers_version"] = "0.42.1"
        (root / name / "config.json").write_text(json.dumps(cfg, indent=2))
    if rename_dims:
        optimum_names = {"batch": "batch_size", "sequence": "sequence_length"}
        for graph in root.glob("*/model.onnx"):
            model = onnx.load(str(graph))
            for v in [*model.graph.input, *model.graph.output]:
                for dim in v.type.tensor_type.shape.dim:
                    dim.dim_param = optimum_names.get(dim.dim_param, dim.dim_param)
            onnx.save(model, str(graph))


def test_optimum_layout_loads_through_the_same_reader(bundle_copy, tiny_sd1_bundle):
    """optimum's ONNX export writes this layout without edgediff.json: the manifest is derived from the graphs."""
    optimum_like(bundle_copy)
    b = Bundle.open(bundle_copy)
    ours = Bundle.open(tiny_sd1_bundle).manifest
    assert b.derived and "optimum" in b.manifest.provenance.exporter
    assert b.manifest.family == ours.family and b.manifest.scaling_factor == ours.scaling_factor
    for name, comp in ours.components.items():
        derived = b.manifest.components[name]
        assert [(s.name, s.dtype, len(s.shape)) for s in derived.inputs] == [
            (s.name, s.dtype, len(s.shape)) for s in comp.inputs]
        assert [f.path for f in derived.files] == [f.path for f in comp.files] and derived.parity is None
    assert derived.inputs[0].shape[0] == "batch_size"
    b.model_path("unet")  # loads, trusted as found


def test_optimum_bundle_has_nothing_to_verify_against(bundle_copy):
    """(b) verify of a bundle without edgediff.json never reads as "verified": there is nothing to check against."""
    optimum_like(bundle_copy)
    with pytest.raises(BundleIntegrityError, match="nothing to verify its files against"):
        Bundle.open(bundle_copy).verify()
    r = CliRunner().invoke(main, ["inspect", str(bundle_copy), "--verify"])
    assert r.exit_code != 0 and "nothing to verify" in r.output and "verified" not in r.output, r.output


@pytest.mark.parametrize("replace", ["delete", "folder"])
def test_edgediff_bundle_without_its_manifest_is_refused(bundle_copy, replace):
    """(b) Deleting edgediff.json (or putting a folder in its place) used to switch to trust on first use: a flipped
    UNet byte then verified. The folder is recognised as edgediff's and refused."""
    (bundle_copy / MANIFEST_NAME).unlink()
    if replace == "folder":
        (bundle_copy / MANIFEST_NAME).mkdir()
    p = bundle_copy / "unet" / "model.onnx"
    data = bytearray(p.read_bytes())
    data[-10] ^= 0x01
    p.write_bytes(bytes(data))
    match = "edgediff wrote this bundle" if replace == "delete" else "not a regular file"
    with pytest.raises(BundleError, match=match):
        Bundle.open(bundle_copy)
    r = CliRunner().invoke(main, ["inspect", str(bundle_copy), "--verify"])
    assert r.exit_code == 1 and "verified" not in r.output and "internal error" not in r.output, r.output


def test_edgediff_graphs_without_a_manifest_are_refused(bundle_copy):
    """(b) The graphs' own dim names give an edgediff export away even when its configs were re-saved."""
    optimum_like(bundle_copy, rename_dims=False)
    with pytest.raises(BundleIntegrityError, match="names its batch axis 'batch'"):
        Bundle.open(bundle_copy)


def test_symlinked_manifest_is_refused(bundle_copy, tmp_path):
    """(d) edgediff.json must be a file of the bundle, not a link to one elsewhere."""
    elsewhere = tmp_path / "elsewhere.json"
    (bundle_copy / MANIFEST_NAME).rename(elsewhere)
    os.symlink(elsewhere, bundle_copy / MANIFEST_NAME)
    with pytest.raises(BundleError, match="is a symlink"):
        Bundle.open(bundle_copy)
    r = CliRunner().invoke(main, ["inspect", str(bundle_copy), "--verify"])
    assert r.exit_code == 1 and "verified" not in r.output


def _rewrite(bundle: Path, edit) -> None:
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    edit(data)
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))


def _repin(bundle: Path, rel: str) -> None:
    """Pin ``rel`` as it is now (as a manifest rewritten along with the file would)."""
    def edit(data):
        entries = [*data["files"], *(f for c in data["components"].values() for f in c["files"])]
        entry = next((e for e in entries if e["path"] == rel), None)
        if entry is None:
            entry = {"path": rel}
            data["files"].append(entry)
        entry.update(size=(bundle / rel).stat().st_size, sha256=sha256_file(bundle / rel, fresh=True))
    _rewrite(bundle, edit)


def test_failing_parity_receipt_is_reported_and_refused(bundle_copy):
    """(c) A receipt that records an error above its tolerance: verify says so and the component is not loaded."""
    def fail(data):
        data["components"]["unet"]["parity"].update(max_rel=0.25, passed=True)  # "passed" is derived, not trusted
    _rewrite(bundle_copy, fail)
    b = Bundle.open(bundle_copy)
    (line,) = b.verify()
    assert line.startswith("unet: its parity receipt records a failure (max_rel 0.25 over the tolerance 0.0005")
    with pytest.raises(BundleIntegrityError, match=r"unet: .*failure \(max_rel 0.25 over the tolerance 0.0005"):
        b.model_path("unet")
    r = CliRunner().invoke(main, ["inspect", str(bundle_copy), "--verify"])
    assert r.exit_code == 1 and "parity FAILED" in r.output and "verified" not in r.output


def test_receipt_with_an_accepted_larger_tolerance_passes(bundle_copy):
    """(c) `quantize --tolerance 0.5` records the bound it applied: such a receipt passes."""
    def loose(data):
        data["components"]["unet"]["parity"].update(max_rel=0.25, tolerance=0.5)
    _rewrite(bundle_copy, loose)
    b = Bundle.open(bundle_copy)
    assert b.verify() == [] and b.model_path("unet").is_file()


def test_quantized_receipt_without_its_metric_value_fails(bundle_copy):
    def no_value(data):
        data["components"]["unet"]["parity"].update(metric="rel_l2", rel_l2=None)
    _rewrite(bundle_copy, no_value)
    with pytest.raises(BundleError, match="rel_l2 is missing"):
        Bundle.open(bundle_copy)


def test_external_data_outside_the_bundle_fails_verify(bundle_copy):
    """(d) verify used to say "verified" for a graph whose external data lies outside the bundle; load refused it."""
    external_graph(bundle_copy / "unet" / "model.onnx", "../../outside.bin")
    _repin(bundle_copy, "unet/model.onnx")
    problems = Bundle.open(bundle_copy).verify()
    assert any("escapes the bundle" in p for p in problems), problems
    r = CliRunner().invoke(main, ["inspect", str(bundle_copy), "--verify"])
    assert r.exit_code == 1 and "escapes the bundle" in r.output and "verified" not in r.output


def test_unpinned_external_data_is_refused(bundle_copy):
    """Every file the runtime reads is pinned: external data inside the bundle but absent from the manifest too."""
    (bundle_copy / "unet" / "weights.bin").write_bytes(b"\0" * 4)
    external_graph(bundle_copy / "unet" / "model.onnx", "weights.bin")
    _repin(bundle_copy, "unet/model.onnx")
    b = Bundle.open(bundle_copy)
    assert b.verify() == ["unet/model.onnx: external data unet/weights.bin is not pinned by edgediff.json"]
    with pytest.raises(BundleIntegrityError, match="unet/weights.bin is not pinned"):
        b.model_path("unet")


def test_altered_model_index_refuses_the_bundle(bundle_copy):
    """(e) A flipped byte in model_index.json was caught by verify while generation ran anyway: it is read at
    open, so it is checked at open."""
    p = bundle_copy / "model_index.json"
    p.write_bytes(p.read_bytes().replace(b"Pipeline", b"Pipelinf", 1))
    with pytest.raises(BundleIntegrityError, match="model_index.json: altered"):
        Bundle.open(bundle_copy)
    from edgediff.pipeline import Pipeline

    with pytest.raises(BundleIntegrityError, match="model_index.json: altered"):
        Pipeline.load(bundle_copy)


def _swapped_tokenizer_json(tok_dir: Path, a: str, b: str) -> None:
    """Plant tokenizer.json: the bundle's own vocabulary with tokens ``a`` and ``b`` exchanged."""
    from edgediff.tokenizer import ClipTokenizer

    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    planted = tok_dir.parent / "planted"
    planted.mkdir()
    for name in ("merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        if (tok_dir / name).exists():
            shutil.copy(tok_dir / name, planted / name)
    (planted / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    ClipTokenizer.from_dir(planted)._tok.save(str(tok_dir / "tokenizer.json"))
    shutil.rmtree(planted)


def test_unpinned_tokenizer_json_is_never_read(bundle_copy):
    """(a) An unpinned tokenizer/tokenizer.json used to override the pinned vocab.json/merges.txt (verify passed
    and a red square became blue). The bundle's tokenizer reads only pinned files; a scan of the folder refuses."""
    from edgediff.tokenizer import ClipTokenizer

    clean = ClipTokenizer.from_files(Bundle.open(bundle_copy).tokenizer_files())
    ids = clean.encode(["a red circle"])[0]
    first, second = (clean._tok.id_to_token(int(i)) for i in ids[1:3])
    _swapped_tokenizer_json(bundle_copy / "tokenizer", first, second)
    planted = ClipTokenizer.from_dir(bundle_copy / "tokenizer")  # what reading the folder gave before
    assert (planted.encode(["a red circle"])[0] != ids).any()

    b = Bundle.open(bundle_copy)
    assert "tokenizer.json" not in b.tokenizer_files()
    assert (ClipTokenizer.from_files(b.tokenizer_files()).encode(["a red circle"])[0] == ids).all()
    with pytest.raises(BundleIntegrityError, match="tokenizer/tokenizer.json: not pinned"):
        b.tokenizer_dir()
    assert b.verify() == ["tokenizer/tokenizer.json: not pinned by edgediff.json, and the tokenizer would read it"]


def test_pipeline_ignores_or_refuses_an_unpinned_tokenizer_json(bundle_copy, tiny_sd1_bundle):
    """(a) end to end: the planted file changes nothing a generation reads (refused, or the image is unchanged)."""
    from edgediff.pipeline import Pipeline
    from edgediff.tokenizer import ClipTokenizer

    clean = ClipTokenizer.from_files(Bundle.open(tiny_sd1_bundle).tokenizer_files())
    ids = clean.encode(["a red circle"])[0]
    _swapped_tokenizer_json(bundle_copy / "tokenizer", *(clean._tok.id_to_token(int(i)) for i in ids[1:3]))
    with Pipeline.load(tiny_sd1_bundle) as p:
        want = p("a red circle", num_inference_steps=2, seed=0, height=32, width=32, output_type="np").images
    try:
        with Pipeline.load(bundle_copy) as p:
            got = p("a red circle", num_inference_steps=2, seed=0, height=32, width=32, output_type="np").images
    except BundleIntegrityError as exc:
        assert "tokenizer/tokenizer.json: not pinned" in str(exc)
    else:
        np.testing.assert_array_equal(got, want)


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


# -- the manifest's schema: types and ranges, one line naming the field ------------------------------------------
def _set(path: str, value):
    def edit(data):
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return edit


@pytest.mark.parametrize("path, value, message", [
    ("default_height", "big", "default_height 'big'; expected an integer from 1 to 16384"),
    ("default_width", True, "default_width True; expected an integer"),  # bool is an int to Python: refused
    ("default_height", -64, "default_height -64; expected an integer"),
    ("default_height", 65, "default_height 65 is not a multiple of vae_scale_factor"),
    ("latent_channels", -4, "latent_channels -4; expected an integer from 1 to 256"),
    ("vae_scale_factor", 0, "vae_scale_factor 0; expected a power of two"),
    ("vae_scale_factor", 6, "vae_scale_factor 6; expected a power of two"),
    ("scaling_factor", 0, "scaling_factor 0; expected a finite number > 0"),
    ("scaling_factor", "0.18", "scaling_factor '0.18'; expected a finite number"),
    ("text_max_length", 2.0, "text_max_length 2.0; expected an integer from 3"),
    ("family", ["sd1"], "family a list; expected one of"),
    ("components", [], "components is a list; expected a JSON object"),
    ("components.unet.name", "vae_decoder", "components.unet.name 'vae_decoder'; expected 'unet'"),
    ("components.unet.model", "unet/other.onnx", "components.unet.model 'unet/other.onnx' is not its first pinned"),
    ("components.unet.files.0.size", -1, r"components.unet.files\[0\].size -1; expected an integer from 0"),
    ("components.unet.files.0.path", 5, r"components.unet.files\[0\].path 5; expected a string"),
    ("components.unet.files.0.path", "unet/\x00", "expected a printable path"),
    ("components.unet.files.0.sha256", "abc", r"files\[0\].sha256 'abc'; expected 64 lowercase hex digits"),
    ("components.unet.inputs.0.shape", ["batch", -4, "height"], r"inputs\[0\].shape\[1\] -4; expected an integer"),
    ("components.unet.inputs.0.shape", ["batch", 4.0], r"inputs\[0\].shape\[1\] 4.0"),
    ("components.unet.inputs.0.shape", "batch", r"inputs\[0\].shape is 'batch'; expected a JSON list"),
    ("components.unet.inputs.0.dtype", "float64", r"inputs\[0\].dtype 'float64'; expected one of"),
    ("components.unet.parity.max_rel", float("nan"), "parity.max_rel nan; expected a finite number >= 0"),
    ("components.unet.parity.tolerance", float("inf"), "parity.tolerance inf; expected a finite number > 0"),
    ("components.unet.precision", 32, "precision 32; expected one of"),
    ("files.0.sha256", "A" * 64, "expected 64 lowercase hex digits"),
    ("files.1.path", "model_index.json", "is pinned twice"),
    ("provenance.transforms", "optimize", "provenance.transforms is 'optimize'; expected a JSON list"),
    ("provenance.parent", "x", "provenance.parent 'x'; expected ''"),
    ("defaults", [4], "defaults is a list; expected a JSON object"),
])
def test_manifest_schema_names_the_field(bundle_copy, path, value, message):
    if path == "files.1.path":
        value = json.loads((bundle_copy / MANIFEST_NAME).read_text())["files"][0]["path"]
    _rewrite(bundle_copy, _set(path, value))
    with pytest.raises(BundleError, match=message) as info:
        Bundle.open(bundle_copy)
    assert str(info.value).startswith(str(bundle_copy / MANIFEST_NAME)) and "\n" not in str(info.value)


def test_manifest_missing_key_and_unknown_key(bundle_copy):
    _rewrite(bundle_copy, lambda d: d.pop("latent_channels"))
    with pytest.raises(BundleError, match="manifest: required key 'latent_channels' is missing"):
        Bundle.open(bundle_copy)
    _rewrite(bundle_copy, lambda d: d.update(latent_channels=4, future_field={"x": 1}))
    with pytest.warns(UserWarning, match=r"ignoring unknown keys \['future_field'\]"):
        assert Bundle.open(bundle_copy).manifest.latent_channels == 4


@pytest.mark.parametrize("raw, message", [
    (lambda t: t.replace(b'"sd1"', b'"sd\xff1"'), r"not UTF-8 text \(byte \d+: invalid start byte\)"),
    (lambda t: t[:-1] + b', "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (lambda t: t.replace(b'"latent_channels": 4', b'"latent_channels": ' + b"9" * 5000), "cannot represent"),
    (lambda t: t.replace(b'"latent_channels": 4', b'"latent_channels": NaN'), "latent_channels nan"),
    (lambda t: b"[1, 2]", "must be a JSON object"),
    (lambda t: b"{", "not valid JSON"),
])
def test_manifest_bytes_that_are_not_a_manifest(bundle_copy, raw, message):
    text = json.dumps(json.loads((bundle_copy / MANIFEST_NAME).read_text())).encode()
    (bundle_copy / MANIFEST_NAME).write_bytes(raw(text))
    with pytest.raises(BundleError, match=message):
        Bundle.open(bundle_copy)


@pytest.mark.parametrize("content, message", [
    (b'{"block_out_channels": [32, 64], "x": "\xff"}', "not UTF-8 text"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b"[1, 2]", "must hold a JSON object, not list"),
    (b'{"a": ' + b"1" * 5000 + b"}", "cannot be read"),
])
def test_configs_the_runtime_reads_are_checked(bundle_copy, content, message):
    """Config files (here the UNet's, re-pinned as a rewritten manifest would) read to one typed line."""
    from edgediff.config import read_json

    rel = "unet/config.json"
    (bundle_copy / rel).write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        read_json(bundle_copy / rel, what=rel)
    _repin(bundle_copy, rel)
    with pytest.raises(BundleError, match=message):
        Bundle.open(bundle_copy).config(rel)
