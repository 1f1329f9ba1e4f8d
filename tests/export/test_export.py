"""diffusers -> ONNX bundle export: round trip, parity receipts, determinism and every refusal."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgediff.bundle.manifest import MANIFEST_NAME, Manifest
from edgediff.bundle.reader import Bundle
from edgediff.cli import main
from edgediff.errors import ExportError, OutputExistsError

pytest.importorskip("diffusers")


def run_cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("fixture,family", [("tiny_sd1_bundle", "sd1"), ("tiny_sd2v_bundle", "sd2-v")])
def test_export_writes_bundle_with_receipts(fixture, family, request):
    root: Path = request.getfixturevalue(fixture)
    b = Bundle.open(root)
    m = b.manifest
    assert not b.derived
    assert m.family == family
    assert set(m.components) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    assert (m.latent_channels, m.vae_scale_factor, m.scaling_factor) == (4, 2, 0.3)  # from the VAE config
    assert m.default_height == m.default_width == 16
    for comp in m.components.values():
        assert comp.parity is not None and comp.parity.passed, (comp.name, comp.parity)
        assert comp.parity.max_rel < 1e-4
        assert comp.files[0].path == comp.model
    unet = m.components["unet"]
    assert [s.name for s in unet.inputs] == ["sample", "timestep", "encoder_hidden_states"]
    assert unet.input("sample").shape == ("batch", 4, "height", "width")
    assert b.verify() == []
    assert Manifest.from_json(m.to_json()) == m
    assert any(f.path.startswith("tokenizer/") for f in m.files)
    assert any(f.path == "scheduler/scheduler_config.json" for f in m.files)


def test_manifest_json_schema(tiny_sd1_bundle):
    data = json.loads((tiny_sd1_bundle / MANIFEST_NAME).read_text())
    assert data["format_version"] == 1
    assert set(data) >= {"family", "prediction_type", "default_height", "default_width", "latent_channels",
                         "vae_scale_factor", "scaling_factor", "text_max_length", "components", "files", "provenance"}
    unet = data["components"]["unet"]
    assert set(unet) >= {"name", "model", "files", "inputs", "outputs", "precision", "parity"}
    assert set(unet["files"][0]) == {"path", "size", "sha256"}
    assert unet["parity"]["passed"] is True
    assert data["provenance"]["source_class"] == "StableDiffusionPipeline"
    assert "torch" in data["provenance"]["libraries"]


def test_export_is_deterministic(tiny_sd1_source, tiny_sd1_bundle, tmp_path):
    from edgediff.export.pipeline_export import export_pipeline

    again = export_pipeline(tiny_sd1_source, tmp_path / "again")
    a, b = Bundle.open(tiny_sd1_bundle).manifest, Bundle.open(again).manifest
    for name in a.components:
        assert a.components[name].files == b.components[name].files, name


def test_cli_export_and_inspect(tiny_sd1_source, tmp_path):
    out = tmp_path / "b"
    r = run_cli("export", tiny_sd1_source, out)
    assert r.exit_code == 0, r.output
    for stage in ("export", "check", "write"):
        assert stage in r.output
    r = run_cli("inspect", out, "--verify")
    assert r.exit_code == 0, r.output
    assert "parity ok" in r.output and "verified" in r.output and "unet" in r.output
    assert "defaults" not in r.output  # none recorded


def test_cli_export_records_recommended_defaults(tiny_sd1_source, tmp_path):
    from edgediff.bundle.manifest import GenerationDefaults

    out = tmp_path / "b"
    r = run_cli("export", tiny_sd1_source, out, "--default-steps", "4", "--default-guidance", "0")
    assert r.exit_code == 0, r.output
    assert Bundle.open(out).manifest.defaults == GenerationDefaults(steps=4, guidance_scale=0.0)
    for args, message in ((["--default-steps", "0"], "--default-steps 0; expected an integer from 1 to 1000"),
                          (["--default-guidance", "-2"], "--default-guidance -2.0; expected a finite number")):
        r = run_cli("export", tiny_sd1_source, tmp_path / "c", *args)
        assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output, r.output
        assert not (tmp_path / "c").exists()


def test_flipped_byte_fails_verify_and_load(bundle_copy):
    graph = bundle_copy / "unet" / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    r = run_cli("inspect", bundle_copy, "--verify")
    assert r.exit_code != 0
    assert "unet/model.onnx: altered" in r.output
    from edgediff.errors import BundleIntegrityError

    with pytest.raises(BundleIntegrityError, match="unet/model.onnx"):
        Bundle.open(bundle_copy).model_path("unet")


def test_truncated_and_missing_files_are_named(bundle_copy):
    graph = bundle_copy / "vae_decoder" / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:100])
    (bundle_copy / "tokenizer" / "vocab.json").unlink()
    problems = Bundle.open(bundle_copy).verify()
    assert any(p.startswith("vae_decoder/model.onnx: truncated") for p in problems)
    assert "tokenizer/vocab.json: missing" in problems


# -- refusals: one clear line, non-zero exit ----------------------------------------------------------------------
def _error_line(r) -> str:
    assert r.exit_code != 0
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert lines and lines[-1].startswith("error: "), r.output
    assert "Traceback" not in r.output
    return lines[-1]


def test_src_missing(tmp_path):
    assert "does not exist" in _error_line(run_cli("export", tmp_path / "nope", tmp_path / "out"))


def test_src_not_a_pipeline(tmp_path):
    (tmp_path / "src").mkdir()
    assert "not a diffusers pipeline" in _error_line(run_cli("export", tmp_path / "src", tmp_path / "out"))


def test_unsupported_pipeline_class(tiny_sd1_source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_sd1_source, src)
    index = json.loads((src / "model_index.json").read_text())
    index["_class_name"] = "KandinskyV22Pipeline"  # (StableDiffusion3Pipeline, the example until issue 17, exports)
    (src / "model_index.json").write_text(json.dumps(index))
    line = _error_line(run_cli("export", src, tmp_path / "out"))
    assert "KandinskyV22Pipeline" in line and "StableDiffusionPipeline" in line


def test_pickle_weights_need_allow_pickle(tiny_sd1_source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_sd1_source, src)
    import torch
    from safetensors.torch import load_file

    st = src / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(st), src / "unet" / "diffusion_pytorch_model.bin")
    st.unlink()
    line = _error_line(run_cli("export", src, tmp_path / "out"))
    assert "pickle" in line and "--allow-pickle" in line
    r = run_cli("export", src, tmp_path / "out", "--allow-pickle")
    assert r.exit_code == 0, r.output


def test_out_not_empty_needs_overwrite_and_never_deletes_user_files(tiny_sd1_source, tiny_sd1_bundle, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    assert "--overwrite" in _error_line(run_cli("export", tiny_sd1_source, out))
    assert "not a bundle" in _error_line(run_cli("export", tiny_sd1_source, out, "--overwrite"))
    assert (out / "precious.txt").read_text() == "mine"
    # replacing an existing bundle is what --overwrite is for
    shutil.copytree(tiny_sd1_bundle, tmp_path / "old")
    r = run_cli("export", tiny_sd1_source, tmp_path / "old", "--overwrite")
    assert r.exit_code == 0, r.output
    assert Bundle.open(tmp_path / "old").verify() == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial or backup folders left


def test_api_errors_are_typed(tmp_path):
    from edgediff.export.pipeline_export import export_pipeline

    with pytest.raises(ExportError):
        export_pipeline(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputExistsError):
        from edgediff.bundle.writer import check_output

        check_output(tmp_path / "f", overwrite=True)


def test_export_honours_the_umask(tiny_sd1_bundle):
    """The staging folder came from mkdtemp (0700) and was renamed into place as it was, whatever the umask."""
    import os

    from edgediff.bundle.writer import current_umask

    mask = current_umask()
    modes = {os.path.relpath(r, tiny_sd1_bundle): os.stat(r).st_mode & 0o777 for r, _, _ in os.walk(tiny_sd1_bundle)}
    assert modes == dict.fromkeys(modes, 0o777 & ~mask)
    files = {f: f.stat().st_mode & 0o777 for f in tiny_sd1_bundle.rglob("*") if f.is_file()}
    assert files == dict.fromkeys(files, 0o666 & ~mask)

