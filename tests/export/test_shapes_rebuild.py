"""The built-in model's diffusers source rebuilt from its shipped bundle (export/recipes/shapes/rebuild.py).

References: the shipped bundle's ONNX graphs in ONNX Runtime (each rebuilt model, max_rel <= 1e-4 in fp32 here,
the tool's own proof runs float64 at 1e-5); diffusers 0.42 StableDiffusionPipeline loaded from the rebuilt folder
against the runtime on the shipped bundle, same initial latents (max abs <= 2/255 on images in [0, 1]); and
``edgediff export`` of the rebuilt folder, whose graphs must be the shipped ones byte for byte (torch-folded
constants within 1 ulp where this CPU's exp differs) and whose images must equal the shipped bundle's for the same
seeds.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgediff import Pipeline
from edgediff.builtin_model import default_bundle
from edgediff.cli import main as cli
from edgediff.errors import ExportError, OutputExistsError, ParityError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from edgediff.export.recipes.shapes import rebuild  # noqa: E402

GRAPHS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
PROMPTS = ["a small red circle in the top left corner on a white background", "a big blue square on black"]


@pytest.fixture(scope="module")
def shipped():
    return default_bundle()


@pytest.fixture(scope="module")
def rebuilt(shipped, tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes-rebuild") / "pipe"
    checks = rebuild.rebuild(shipped, out)
    return out, checks


@pytest.fixture(scope="module")
def exported(rebuilt, tmp_path_factory):
    """The brief's command: ``edgediff export DIR OUT --deepcache 0 --default-steps 20 --default-guidance 5.0``."""
    out = tmp_path_factory.mktemp("shapes-export") / "bundle"
    res = CliRunner().invoke(cli, ["export", str(rebuilt[0]), str(out), "--deepcache", "0", "--default-steps", "20",
                                   "--default-guidance", "5.0"])
    assert res.exit_code == 0, res.output
    return out


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_same_graph(new: Path, old: Path) -> None:
    """The same bytes, or -- where torch folded a constant with this CPU's own float32 exp (the UNet's sinusoidal
    time frequencies: 1 ulp apart between an AVX2 AMD EPYC and an AVX-512 Xeon) -- the same graph with every weight
    bit-equal and those constants within 1 ulp."""
    import onnx
    from onnx import numpy_helper

    if _sha(new) == _sha(old):
        return
    a, b = onnx.load(str(new)), onnx.load(str(old))
    assert [t.SerializeToString() for t in a.graph.initializer] == [t.SerializeToString() for t in b.graph.initializer]
    assert len(a.graph.node) == len(b.graph.node)
    for x, y in zip(a.graph.node, b.graph.node):
        if x.SerializeToString() == y.SerializeToString():
            continue
        assert x.op_type == y.op_type == "Constant" and list(x.output) == list(y.output), (x.name, y.name)
        u, v = numpy_helper.to_array(x.attribute[0].t), numpy_helper.to_array(y.attribute[0].t)
        assert u.dtype == v.dtype == np.float32 and u.shape == v.shape, x.name
        np.testing.assert_array_max_ulp(u, v, maxulp=1)
    a.graph.ClearField("node")
    b.graph.ClearField("node")
    assert a.SerializeToString() == b.SerializeToString()


def _copy(shipped, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(shipped, dst)
    return dst


def _edit(path, **changes):
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_folder_is_a_pipeline_with_the_bundle_side_files(rebuilt, shipped):
    out, checks = rebuilt
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for rel in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
                "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json"):
        assert (out / rel).read_bytes() == (shipped / rel).read_bytes(), rel
    for folder in ("text_encoder", "unet", "vae"):
        assert (out / folder / "config.json").is_file()
        assert list((out / folder).glob("*.safetensors")), folder
    assert not list(out.parent.glob(".*partial")), "the staging folder was left behind"
    assert sorted({c.component for c in checks}) == sorted(GRAPHS) and len(checks) == 2 * len(GRAPHS)
    worst = max(checks, key=lambda c: c.max_rel)
    assert worst.max_rel <= rebuild.TOLERANCE, worst


def test_each_rebuilt_model_reproduces_its_bundle_graph(rebuilt, shipped):
    """Independently of the tool's own proof: diffusers/transformers load the folder; fp32 against ONNX Runtime."""
    import onnxruntime as ort
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    out = rebuilt[0]
    g = torch.Generator().manual_seed(123)
    text = CLIPTextModel.from_pretrained(out / "text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(out / "unet").eval()
    vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    ids = torch.randint(0, text.config.vocab_size, (3, 24), generator=g)
    sample, emb = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 24, 64, generator=g)
    t = torch.tensor([999.0, 500.0, 1.0])
    image = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        ref = {
            "text_encoder": ({"input_ids": ids.int().numpy()}, text(ids).last_hidden_state),
            "unet": ({"sample": sample.numpy(), "timestep": t.numpy(), "encoder_hidden_states": emb.numpy()},
                     unet(sample, t, encoder_hidden_states=emb).sample),
            "vae_decoder": ({"latent_sample": sample.numpy()}, vae.decode(sample).sample),
            "vae_encoder": ({"sample": image.numpy()}, vae.encode(image).latent_dist.parameters),
        }
    for name, (feeds, want) in ref.items():
        got = ort.InferenceSession(str(shipped / name / "model.onnx"), providers=["CPUExecutionProvider"]).run(
            None, feeds)[0]
        want = want.numpy()
        err = np.abs(got - want)
        rel = float(err.max() / np.abs(want).max())
        assert rel <= 1e-4, f"{name}: max_rel {rel:.2e} at {np.unravel_index(err.argmax(), err.shape)}"


def test_diffusers_on_the_rebuilt_folder_draws_the_shipped_bundles_images(rebuilt, shipped):
    """diffusers StableDiffusionPipeline (its DPM-Solver++ config from the folder) vs the runtime on the shipped
    bundle: 4 steps, guidance 5, the same initial latents; images within 2/255."""
    from streams import assert_images_close

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.StableDiffusionPipeline.from_pretrained(rebuilt[0], local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(5).standard_normal((2, 4, 16, 16)).astype(np.float32)
    theirs = ref(PROMPTS, num_inference_steps=4, guidance_scale=5.0, latents=torch.from_numpy(latents),
                 output_type="np").images
    with Pipeline.load(shipped) as pipe:
        mine = pipe(PROMPTS, num_inference_steps=4, guidance_scale=5.0, latents=latents, output_type="np")
    assert_images_close(mine.images, theirs, 2 / 255)


def test_export_of_the_rebuilt_folder_gives_the_shipped_graphs_and_images(exported, shipped):
    new, old = json.loads((exported / "edgediff.json").read_text()), json.loads((shipped / "edgediff.json").read_text())
    for name in GRAPHS:  # the same weights through the same exporter: the same graph
        _assert_same_graph(exported / name / "model.onnx", shipped / name / "model.onnx")
    assert {"unet_deepcache_full", "unet_deepcache_shallow_0"} <= set(new["components"])
    assert all(new["components"][c]["parity"]["passed"] for c in new["components"])
    for key in ("defaults", "family", "prediction_type", "scaling_factor", "text_max_length", "default_height",
                "default_width", "vae_scale_factor", "latent_channels"):
        assert new[key] == old[key], key
    kw = dict(num_inference_steps=3, seed=[7, 8], output_type="np")
    with Pipeline.load(shipped) as a, Pipeline.load(exported) as b:
        x, y = np.stack(a(PROMPTS, **kw).images), np.stack(b(PROMPTS, **kw).images)
    err = float(np.abs(x - y).max())
    # 0 when the graphs are the same bytes; 2.4e-6 measured where the time frequencies are 1 ulp apart (AMD EPYC)
    assert err <= 1e-5, f"plain images differ by {err:.2e}"


def test_an_existing_output_is_refused_before_any_work(shipped, tmp_path):
    out = tmp_path / "pipe"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        rebuild.rebuild(shipped, out)
    assert (out / "notes.txt").read_text() == "mine"


def test_a_bundle_missing_a_graph_is_refused_by_name(shipped, tmp_path):
    bundle = _copy(shipped, tmp_path)
    (bundle / "vae_encoder" / "model.onnx").unlink()
    with pytest.raises(ExportError, match="vae_encoder/model.onnx"):
        rebuild.rebuild(bundle, tmp_path / "pipe")
    assert not (tmp_path / "pipe").exists()


def test_a_config_whose_shapes_do_not_fit_the_weights_is_refused(shipped, tmp_path):
    bundle = _copy(shipped, tmp_path)
    _edit(bundle / "text_encoder" / "config.json", intermediate_size=96)
    with pytest.raises(ExportError, match=r"text_encoder: initializer .* has shape .* wants"):
        rebuild.rebuild(bundle, tmp_path / "pipe")
    assert not (tmp_path / "pipe").exists()


def test_differing_vae_configs_are_refused(shipped, tmp_path):
    bundle = _copy(shipped, tmp_path)
    _edit(bundle / "vae_encoder" / "config.json", norm_num_groups=4)
    with pytest.raises(ExportError, match="differ"):
        rebuild.rebuild(bundle, tmp_path / "pipe")


def test_a_config_that_loads_but_computes_otherwise_writes_nothing(shipped, tmp_path):
    """GroupNorm's group count changes no parameter shape: the strict load passes, only the proof can catch it."""
    bundle = _copy(shipped, tmp_path)
    _edit(bundle / "unet" / "config.json", norm_num_groups=8)
    out = tmp_path / "pipe"
    with pytest.raises(ParityError, match=r"unet: .* max_rel .*nothing was written"):
        rebuild.rebuild(bundle, out)
    assert not out.exists() and not list(tmp_path.glob(".*partial"))


def test_weights_no_rule_explains_or_parameters_no_graph_fills_are_named(shipped):
    graph = [shipped / "text_encoder" / "model.onnx"]
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig.from_pretrained(shipped / "text_encoder"))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    full = rebuild.recover_state_dict("text_encoder", expected, graph)
    assert set(full) == set(expected)
    q = "encoder.layers.0.self_attn.q_proj.weight"
    assert q in expected
    with pytest.raises(ExportError, match="unfilled parameters end with 'encoder.layers.0.self_attn.q_proj.weight'"):
        rebuild.recover_state_dict("text_encoder", {k: v for k, v in expected.items() if k != q}, graph)
    with pytest.raises(ExportError, match="does not have"):
        rebuild.recover_state_dict("text_encoder", {k: v for k, v in expected.items() if "final_layer_norm" not in k},
                                   graph)
    with pytest.raises(ExportError, match="1 parameter.*not found.*extra.weight"):
        rebuild.recover_state_dict("text_encoder", {**expected, "extra.weight": (4,)}, graph)


def test_cli_reports_a_refusal_in_one_line(shipped, tmp_path, capsys):
    out = tmp_path / "pipe"
    out.mkdir()
    (out / "x").write_text("")
    assert rebuild.main(["--out", str(out), "--bundle", str(shipped)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "--overwrite" in err
