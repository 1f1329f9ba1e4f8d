"""export/pipeline_export.py's child-process path (ISOLATE_BYTES): each source model traced in its own process, the
graphs checked in the exporting one. It must write the same bytes as the in-process path, and every failure in a child
must reach the user as one ExportError line."""
from __future__ import annotations

import hashlib
import shutil
import signal
import sys
from pathlib import Path

import pytest

from edgediff.errors import EngineError, ExportError, MissingDependency

pytest.importorskip("diffusers")


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_tiny_models_stay_in_process(tiny_sd1_source):
    from edgediff.export import pipeline_export as pe

    assert max(pe._weights_bytes(pe.inspect_source(tiny_sd1_source), f) for f in ("text_encoder", "unet", "vae")) \
        < pe.ISOLATE_BYTES


def test_isolated_export_writes_the_same_bytes(tiny_sd1_source, tiny_sd1_bundle, tmp_path, monkeypatch):
    """Every file, the manifest and its parity receipts included, equals the in-process export's; the children's
    progress lines arrive here."""
    from edgediff.export import pipeline_export as pe

    monkeypatch.setattr(pe, "ISOLATE_BYTES", 0)  # every model in a child
    events: list[tuple[str, str]] = []
    out = pe.export_pipeline(tiny_sd1_source, tmp_path / "iso", progress=lambda s, c, t: events.append((s, c)))
    assert _digests(out) == _digests(tiny_sd1_bundle)
    assert sorted(events) == sorted([
        ("load", "text_encoder"), ("export", "text_encoder"), ("check", "text_encoder"), ("map", "text_encoder"),
        ("load", "unet"), ("export", "unet"), ("check", "unet"), ("map", "unet"),
        ("load", "vae"), ("export", "vae_decoder"), ("check", "vae_decoder"), ("export", "vae_encoder"),
        ("check", "vae_encoder"), ("write", "bundle")])
    assert events.index(("load", "unet")) < events.index(("export", "unet")) < events.index(("check", "unet"))


def test_an_error_in_a_child_is_the_same_export_error(tiny_sd1_source, tmp_path, monkeypatch):
    from edgediff.export import pipeline_export as pe

    src = Path(shutil.copytree(tiny_sd1_source, tmp_path / "src"))
    weights = src / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short: the UNet's child cannot load it
    monkeypatch.setattr(pe, "ISOLATE_BYTES", 0)
    with pytest.raises(ExportError) as info:
        pe.export_pipeline(src, tmp_path / "out")
    msg = str(info.value)
    assert msg.startswith(f"cannot load the pipeline's weights from {src}") and "\n" not in msg
    assert not (tmp_path / "out").exists()


def test_a_killed_child_is_one_export_error_line(monkeypatch):
    """The OOM killer's SIGKILL on a child (engines/isolate.py says so as an EngineError) reaches the user as an
    ExportError naming the model, not as an engine error."""
    from edgediff.engines import isolate
    from edgediff.export import pipeline_export as pe

    def killed(fn, *args, what, **kwargs):
        raise EngineError(isolate._death(what, -signal.SIGKILL))

    monkeypatch.setattr(isolate, "run_isolated", killed)
    with pytest.raises(ExportError) as info:
        pe._trace_isolated(None, Path("."), 17, "unet", ["unet"], (), lambda *a: None)
    assert type(info.value) is ExportError
    msg = str(info.value)
    assert msg.startswith("exporting unet was killed by the operating system (SIGKILL), most likely out of memory")
    assert "\n" not in msg


def test_missing_diffusers_is_named_before_any_work(tiny_sd1_source, tmp_path, monkeypatch):
    from edgediff.export.pipeline_export import export_pipeline

    monkeypatch.setitem(sys.modules, "diffusers", None)  # what importlib reports for a package that is not there
    with pytest.raises(MissingDependency, match="edgediff export needs 'diffusers'"):
        export_pipeline(tiny_sd1_source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
