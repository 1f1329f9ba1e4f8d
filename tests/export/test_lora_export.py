"""LoRA at export (``edgediff export --lora``, export/lora.py) and the weights map every export writes
(export/weights_map.py) for hot-swap.

Reference: diffusers StableDiffusionPipeline with ``load_lora_weights`` + ``set_adapters`` + ``fuse_lora``, same
latents and noise; images within 1e-3. The map is checked against the PyTorch weights themselves.
"""
from __future__ import annotations


import numpy as np
import pytest
from click.testing import CliRunner

from edgediff import Pipeline
from edgediff.bundle.reader import Bundle
from edgediff.cli import main
from edgediff.errors import ExportError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from lora_fixtures import compare, ours, reference  # noqa: E402


@pytest.fixture(scope="module")
def loras(tiny_sd1_source, tmp_path_factory):
    from lora_fixtures import example_loras

    return example_loras(tiny_sd1_source, tmp_path_factory.mktemp("loras"))


def test_every_linear_and_conv_weight_is_mapped_exactly(tiny_sd1_source, tiny_sd1_bundle):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from edgediff.lora.onnx_weights import GraphWeights
    from edgediff.lora.weights_map import load_weights_map

    b = Bundle.open(tiny_sd1_bundle)
    models = {"unet": UNet2DConditionModel.from_pretrained(tiny_sd1_source, subfolder="unet"),
              "text_encoder": CLIPTextModel.from_pretrained(tiny_sd1_source / "text_encoder")}
    for name, model in models.items():
        wmap = load_weights_map(b, name)
        graph = GraphWeights(b.model_path(name))
        weights = {f"{n}.weight": m.weight.detach().numpy() for n, m in model.named_modules()
                   if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        assert set(wmap.weights) == set(weights) and not wmap.unmapped
        transposed = 0
        for param, entry in wmap.weights.items():
            stored = graph.read(entry.initializer)
            assert np.array_equal(stored.T if entry.transposed else stored, weights[param]), param
            transposed += entry.transposed
        assert transposed > 0  # Linear weights under MatMul: the case the map exists for
    assert "vae_decoder/weights_map.json" not in {f.path for f in b.manifest.files}


def test_equal_weights_stored_once_are_told_apart_or_refused(tmp_path):
    """torch.onnx stores equal tensors once: both weights then map to the one initializer, and a LoRA on one of
    them alone is refused at run time (WeightsMap.sharing)."""
    from edgediff.export.weights_map import derive, fingerprints

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (torch.nn.Linear(8, 8, bias=False) for _ in range(3))
            with torch.no_grad():
                self.b.weight.copy_(self.a.weight)

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)

    net = Net().eval()
    path = tmp_path / "model.onnx"
    torch.onnx.export(Wrap(net), (torch.randn(2, 8),), str(path), dynamo=False, do_constant_folding=True)
    wmap = derive("unet", fingerprints("unet", net), path)
    assert set(wmap.weights) | set(wmap.unmapped) == {"a.weight", "b.weight", "c.weight"}
    a, b, c = (wmap.weights[f"{n}.weight"] for n in "abc")
    if a.initializer == b.initializer:  # torch 2.x deduplicates equal initializers (b reads it through an Identity)
        assert wmap.sharing(a.initializer) == ("a.weight", "b.weight")
    else:
        assert wmap.sharing(a.initializer) == ("a.weight",) and wmap.sharing(b.initializer) == ("b.weight",)
    assert c.initializer not in (a.initializer, b.initializer) and wmap.sharing(c.initializer) == ("c.weight",)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_export_with_two_weighted_loras_matches_diffusers(tiny_sd1_source, loras, tmp_path):
    out = tmp_path / "fused"
    r = cli("export", tiny_sd1_source, out, "--lora", f"{loras['a']}:0.7", "--lora", f"{loras['b']}:1.3")
    assert r.exit_code == 0, r.output
    with Pipeline.load(out) as pipe:
        mine = ours(pipe)
    compare(mine, reference(tiny_sd1_source, [(loras["a"], 0.7), (loras["b"], 1.3)]))
    transforms = Bundle.open(out).manifest.provenance.transforms
    assert transforms[0].startswith("export --lora a.safetensors:0.7 (sha256 ")
    assert transforms[1].startswith("export --lora b.safetensors:1.3 (sha256 ")
    # the fused bundle's own weights map describes its fused weights: hot-swap on top of it works
    with Pipeline.load(out, loras={loras["b"]: -1.3}) as pipe:
        compare(ours(pipe), reference(tiny_sd1_source, [(loras["a"], 0.7)]))


def test_export_with_a_kohya_file_matches_diffusers(tiny_sd1_source, loras, tmp_path):
    from edgediff.export.pipeline_export import export_pipeline

    out = export_pipeline(tiny_sd1_source, tmp_path / "k", loras={loras["a_kohya"]: 0.8})
    with Pipeline.load(out) as pipe:
        compare(ours(pipe), reference(tiny_sd1_source, [(loras["a_kohya"], 0.8)]))


@pytest.fixture(scope="module")
def bad_export_files(tmp_path_factory):
    from lora_fixtures import bad_files

    return bad_files(tmp_path_factory.mktemp("bad_export"))


@pytest.mark.parametrize("case,match", [
    ("unmatched", "4 of its 5 layers match no layer of the source's unet"),
    ("sdxl", "has text_encoder_2 layers, which StableDiffusionPipeline .*SDXL"),
    ("loha", "is a LyCORIS LoHa"),
    ("shape", r"is \(32, 64\) in the LoRA but \(32, 32\)"),
    ("missing", "LoRA file not found"),
    ("sgm", "diffusers (placed 0 of its 1 unet layers|could not fuse)"),  # diffusers converts SGM names, or fails
])
def test_bad_loras_at_export_are_one_line_and_write_nothing(tiny_sd1_source, bad_export_files, tmp_path, case, match):
    from edgediff.export.pipeline_export import export_pipeline

    path = bad_export_files[case][0]
    with pytest.raises(ExportError, match=match) as info:
        export_pipeline(tiny_sd1_source, tmp_path / "api", loras={path: 1.0})
    assert "\n" not in str(info.value)
    r = cli("export", tiny_sd1_source, tmp_path / "cli", "--lora", path)
    lines = [ln for ln in r.output.splitlines() if ln.strip() and not ln.startswith(("exporting", "  "))]
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert not (tmp_path / "api").exists() and not (tmp_path / "cli").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
