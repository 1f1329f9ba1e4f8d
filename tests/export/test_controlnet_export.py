"""ControlNet export: export --controlnet DIR[:NAME] and a StableDiffusionControlNetPipeline folder's own controlnet/
add controlnet_<name> graphs and the residual UNet, each with a passing parity receipt; the plain unet graph keeps
its inputs; every unfit ControlNet folder is refused with one line before any model loads."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from edgediff.bundle.reader import Bundle
from edgediff.errors import ExportError

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_sd1_source):
    from controlnet_fixtures import tiny_controlnet_bundle

    return tiny_controlnet_bundle(tmp_path_factory, tiny_sd1_source)


def test_bundle_holds_each_controlnet_and_the_residual_unet(built, tiny_sd1_bundle):
    from edgediff.export.components_controlnet import residual_count

    b = Bundle.open(built.bundle)
    comps = b.manifest.components
    assert {"controlnet_canny", "controlnet_depth", "controlnet_pool", "unet_controlnet"} <= set(comps)
    for name in ("controlnet_canny", "controlnet_depth", "controlnet_pool", "unet_controlnet", "unet"):
        r = comps[name].parity
        assert r is not None and r.passed and r.max_rel <= 1e-4, (name, r)
        assert "ControlNetModel" in r.reference or name.startswith("unet")
    r_count = residual_count(b.unet_config)
    assert r_count == 5  # conv_in + 2 layers + 1 downsampler, then the mid block
    net = comps["controlnet_canny"]
    assert [s.name for s in net.inputs] == ["sample", "timestep", "encoder_hidden_states", "controlnet_cond",
                                           "conditioning_scale"]
    assert net.input("conditioning_scale").shape == (r_count,)
    assert [s.name for s in net.outputs] == [*(f"down_block_res_sample_{i}" for i in range(r_count - 1)),
                                            "mid_block_res_sample"]
    res = comps["unet_controlnet"]
    assert [s.name for s in res.inputs][3:] == [*(f"down_block_additional_residual_{i}" for i in range(r_count - 1)),
                                               "mid_block_additional_residual"]
    # the plain UNet is the graph it is without ControlNet: same inputs and outputs
    plain = Bundle.open(tiny_sd1_bundle).component("unet")
    assert comps["unet"].inputs == plain.inputs and comps["unet"].outputs == plain.outputs
    assert json.loads((built.bundle / "controlnet_pool" / "config.json").read_text())["global_pool_conditions"]
    assert Bundle.open(built.bundle).verify() == []


def test_a_controlnet_pipeline_folder_exports_its_controlnet(built, tmp_path):
    import warnings

    import diffusers

    from edgediff.export.pipeline_export import export_pipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = diffusers.DiffusionPipeline.from_pretrained(built.source, safety_checker=None,
                                                           requires_safety_checker=False, local_files_only=True)
        net = diffusers.ControlNetModel.from_pretrained(built.nets["canny"])
        pipe = diffusers.StableDiffusionControlNetPipeline(**base.components, controlnet=net)
    src = tmp_path / "src"
    pipe.save_pretrained(src, safe_serialization=True)
    shutil.rmtree(src / "tokenizer")
    shutil.copytree(built.source / "tokenizer", src / "tokenizer")
    out = export_pipeline(src, tmp_path / "bundle")
    comps = Bundle.open(out).manifest.components
    assert "controlnet_default" in comps and "unet_controlnet" in comps
    assert comps["controlnet_default"].parity.passed


def _config_copy(folder: Path, dst: Path, **changes) -> Path:
    shutil.copytree(folder, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_unfit_controlnets_are_refused_in_one_line(built, tmp_path):
    from edgediff.export.pipeline_export import export_pipeline

    good = built.nets["canny"]
    cases = [
        ([(tmp_path / "nope", None)], "not a folder; give a diffusers ControlNetModel folder"),
        ([(built.source / "unet", None)], "holds a 'UNet2DConditionModel', not a diffusers ControlNetModel"),
        ([(_config_copy(good, tmp_path / "wide", cross_attention_dim=64), None)],
         "has cross_attention_dim 64 and the pipeline's UNet 32: it was made for another model"),
        ([(_config_copy(good, tmp_path / "deep", conditioning_embedding_out_channels=[16, 32, 96, 256]), None)],
         "downsamples the control image by 8 and the pipeline's VAE by 2"),
        ([(_config_copy(good, tmp_path / "layers", layers_per_block=2), None)],
         "makes 7 residuals and the pipeline's UNet takes 5"),
        ([(_config_copy(good, tmp_path / "xl", addition_embed_type="text_time"), None)],
         "is an SDXL ControlNet and the pipeline an SD 1.x/2.x one"),
        ([(good, "a"), (built.nets["depth"], "a")], "two ControlNets are named 'a'"),
        ([(good, "Bad Name")], "--controlnet name 'Bad Name'"),
    ]
    for given, message in cases:
        out = tmp_path / "out"
        with pytest.raises(ExportError) as exc:
            export_pipeline(built.source, out, controlnets=given)
        assert message in str(exc.value) and "\n" not in str(exc.value), str(exc.value)
        assert not out.exists()
    pickled = tmp_path / "pickled"
    shutil.copytree(good, pickled)
    (pickled / "diffusion_pytorch_model.safetensors").rename(pickled / "diffusion_pytorch_model.bin")
    with pytest.raises(ExportError, match="is a pickle file"):
        export_pipeline(built.source, tmp_path / "out", controlnets=[(pickled, None)])


def test_refiners_and_controlnets_of_another_family_are_refused(built, tiny_sdxl_base):
    from edgediff.export.components_controlnet import with_controlnets
    from edgediff.export.plan import _model_config
    from edgediff.export.source import inspect_source

    xl = inspect_source(tiny_sdxl_base.source)
    unet, vae = _model_config(xl, "unet"), _model_config(xl, "vae")
    refiner = replace(xl, index={**xl.index, "requires_aesthetics_score": True})
    with pytest.raises(ExportError, match="an SDXL refiner .* has no ControlNets"):
        with_controlnets(refiner, [(built.nets["canny"], None)], unet, vae)
    with pytest.raises(ExportError, match="is an SD 1.x/2.x ControlNet and the pipeline an SDXL one"):
        with_controlnets(xl, [(built.nets["canny"], None)], unet, vae)


def test_controlnet_option_parsing(tmp_path):
    from edgediff.export.components_controlnet import default_name, parse_option

    assert parse_option("/m/sd-controlnet-canny:canny") == (Path("/m/sd-controlnet-canny"), "canny")
    assert parse_option("/m/sd-controlnet-canny") == (Path("/m/sd-controlnet-canny"), None)
    odd = tmp_path / "x:y"
    odd.mkdir()
    assert parse_option(str(odd)) == (odd, None)  # an existing folder whose name has a colon
    assert default_name(Path("/m/SD ControlNet Canny")) == "sd-controlnet-canny"


def test_cli_export_refuses_a_bad_controlnet_in_one_line(built, tmp_path):
    from click.testing import CliRunner

    from edgediff.cli import main

    r = CliRunner().invoke(main, ["export", str(built.source), str(tmp_path / "out"), "--controlnet",
                                  f"{built.source / 'unet'}:x"])
    assert r.exit_code != 0 and "not a diffusers ControlNetModel" in r.output
    assert "internal error" not in r.output and not (tmp_path / "out").exists()
