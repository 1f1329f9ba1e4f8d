"""TensorRT optimization profiles derived from manifests (SD1, SD2-v fixtures and SDXL-shaped specs)."""
from __future__ import annotations

import dataclasses

import pytest

from edgediff.bundle.manifest import Component, TensorSpec
from edgediff.bundle.reader import Bundle
from edgediff.engines.tensorrt.profiles import (ShapeRange, default_range, parse_profile, profile_shapes,
                                                static_range)
from edgediff.errors import EngineError, InputError


@pytest.fixture(scope="module", params=["sd1", "sd2v"])
def manifest(request, tiny_sd1_bundle, tiny_sd2v_bundle):
    return Bundle.open(tiny_sd1_bundle if request.param == "sd1" else tiny_sd2v_bundle).manifest


def test_unet_profile_doubles_the_batch_for_cfg_and_divides_the_size(manifest):
    f, L = manifest.vae_scale_factor, manifest.text_max_length
    r = ShapeRange(images=(1, 1, 4), height=(32, 64, 96), width=(32, 64, 128))
    shapes = profile_shapes(manifest.components["unet"], manifest, r)
    d = manifest.components["unet"].input("encoder_hidden_states").shape[2]
    assert shapes["sample"] == ((1, 4, 32 // f, 32 // f), (2, 4, 64 // f, 64 // f), (8, 4, 96 // f, 128 // f))
    assert shapes["encoder_hidden_states"] == ((1, L, d), (2, L, d), (8, L, d))
    assert shapes["timestep"][2] == (8,)


def test_vae_and_text_encoder_profiles(manifest):
    r = ShapeRange(images=(1, 2, 3), height=(32, 64, 64), width=(32, 64, 64))
    vae = profile_shapes(manifest.components["vae_decoder"], manifest, r)
    f = manifest.vae_scale_factor
    assert vae["latent_sample"] == ((1, 4, 32 // f, 32 // f), (2, 4, 64 // f, 64 // f), (3, 4, 64 // f, 64 // f))
    enc = profile_shapes(manifest.components["vae_encoder"], manifest, r)
    assert enc["sample"][2] == (3, 3, 64, 64)
    text = profile_shapes(manifest.components["text_encoder"], manifest, r)
    assert text["input_ids"] == ((1, manifest.text_max_length), (4, manifest.text_max_length), (6, manifest.text_max_length))


def test_static_profile_is_one_point_with_cfg(manifest):
    shapes = profile_shapes(manifest.components["unet"], manifest, static_range(1, 64, 64))
    lo, opt, hi = shapes["sample"]
    assert lo == opt == hi and lo[0] == 2


def test_sdxl_shaped_specs():
    """SDXL's extra denoiser inputs (pooled text embeddings, time ids) follow the batch."""
    from edgediff.bundle.manifest import Manifest, Provenance

    unet = Component(name="unet", model="unet/model.onnx", files=(), inputs=(
        TensorSpec("sample", "float16", ("batch", 4, "height", "width")),
        TensorSpec("timestep", "float16", ("batch",)),
        TensorSpec("encoder_hidden_states", "float16", ("batch", "sequence", 2048)),
        TensorSpec("text_embeds", "float16", ("batch", 1280)),
        TensorSpec("time_ids", "float16", ("batch", 6))), outputs=())
    m = Manifest(family="sdxl", prediction_type="epsilon", default_height=1024, default_width=1024,
                 latent_channels=4, vae_scale_factor=8, scaling_factor=0.13025, text_max_length=77,
                 components={"unet": unet}, files=(), provenance=Provenance(exporter="test"))
    r = default_range(m, 64)
    assert r.height == (512, 1024, 1536) and r.images == (1, 1, 4)
    shapes = profile_shapes(unet, m, r)
    assert shapes["text_embeds"] == ((1, 1280), (2, 1280), (8, 1280))
    assert shapes["time_ids"][1] == (2, 6) and shapes["sample"][1] == (2, 4, 128, 128)


def test_optimum_dim_names_are_aliased_and_unknown_ones_refused(manifest):
    unet = manifest.components["unet"]
    renamed = dataclasses.replace(unet, inputs=tuple(
        dataclasses.replace(s, shape=tuple("batch_size" if d == "batch" else d for d in s.shape)) for s in unet.inputs))
    assert profile_shapes(renamed, manifest, static_range(1, 64, 64))["sample"][0][0] == 2
    odd = dataclasses.replace(unet, inputs=(TensorSpec("sample", "float32", ("frames", 4, "height", "width")),))
    with pytest.raises(EngineError, match="symbolic dim 'frames' has no known meaning"):
        profile_shapes(odd, manifest, static_range(1, 64, 64))


def test_profile_parsing_and_bad_ranges(manifest):
    r = parse_profile("images=1:2:2,height=32:64:64", manifest, 16)
    assert r.images == (1, 2, 2) and r.height == (32, 64, 64)
    with pytest.raises(InputError, match="NAME=MIN:OPT:MAX"):
        parse_profile("heights=1:2:3", manifest, 16)
    with pytest.raises(InputError, match="multiples of 16"):
        parse_profile("height=30:64:64", manifest, 16)
    with pytest.raises(InputError, match="1 <= min <= opt <= max"):
        ShapeRange(images=(2, 1, 4))


def test_build_shape_rules(tiny_sd1_bundle):
    """What `edgediff build` builds for, from --static / --profile / --no-cfg (engines/tensorrt/profiles.py)."""
    from edgediff.engines.tensorrt.profiles import shape_range_for

    b = Bundle.open(tiny_sd1_bundle)
    assert shape_range_for(b, static="2x16x32") == static_range(2, 16, 32)
    assert shape_range_for(b) == default_range(b.manifest, b.size_multiple)
    assert shape_range_for(b, cfg=False).cfg is False
    assert shape_range_for(b, static="1x16x16", cfg=False).cfg is False
    with pytest.raises(InputError, match="--static or --profile, not both"):
        shape_range_for(b, static="1x16x16", profile="images=1:1:2")


def _transformer_manifest(family: str, max_sequence_length: int | None):
    """SD3- or FLUX-shaped transformer and T5 specs as the exporters write them (every text axis is "sequence")."""
    from edgediff.bundle.manifest import Manifest, Provenance

    extra = (TensorSpec("guidance", "float32", ("batch",)),) if family == "flux" else ()
    transformer = Component(name="transformer", model="transformer/model.onnx", files=(), inputs=(
        TensorSpec("sample", "float32", ("batch", 16, "height", "width")),
        TensorSpec("timestep", "float32", ("batch",)),
        TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", 4096)),
        TensorSpec("pooled_projections", "float32", ("batch", 2048)), *extra), outputs=())
    t5 = "text_encoder_2" if family == "flux" else "text_encoder_3"
    ids = (TensorSpec("input_ids", "int32", ("batch", "sequence")),)
    comps = {"transformer": transformer, "text_encoder": Component("text_encoder", "text_encoder/model.onnx", (), ids, ()),
             t5: Component(t5, f"{t5}/model.onnx", (), ids, ())}
    return Manifest(family=family, prediction_type="flow", default_height=1024, default_width=1024,
                    latent_channels=16, vae_scale_factor=8, scaling_factor=1.5, text_max_length=77,
                    components=comps, files=(), provenance=Provenance(exporter="test"),
                    max_sequence_length=max_sequence_length)


@pytest.mark.parametrize("limit", [256, 512, None])
def test_sd3_transformer_takes_clip_plus_t5_tokens_and_doubles_for_cfg(limit):
    m = _transformer_manifest("sd3", limit)
    r = ShapeRange(images=(1, 1, 2), height=(512, 1024, 1024), width=(512, 1024, 1024))
    shapes = profile_shapes(m.components["transformer"], m, r)
    top = limit or 256  # a T5-less SD3 folder still feeds 256 zero rows, as diffusers does
    assert shapes["encoder_hidden_states"] == ((1, 78, 4096), (2, 77 + 256, 4096), (4, 77 + top, 4096))
    assert shapes["sample"] == ((1, 16, 64, 64), (2, 16, 128, 128), (4, 16, 128, 128))
    assert profile_shapes(m.components["text_encoder_3"], m, r)["input_ids"] == ((1, 1), (2, 256), (4, top))
    assert profile_shapes(m.components["text_encoder"], m, r)["input_ids"] == ((1, 77), (2, 77), (4, 77))
    static = profile_shapes(m.components["transformer"], m, static_range(1, 1024, 1024))
    assert {s[0] for s in static["sample"]} == {2}  # images fixed, the T5 length still per call
    assert [s[1] for s in static["encoder_hidden_states"]] == [78, 333, 77 + top]


def test_flux_never_doubles_the_batch_and_its_t5_is_text_encoder_2():
    m = _transformer_manifest("flux", 512)
    r = ShapeRange(images=(1, 1, 2), height=(512, 1024, 1024), width=(512, 1024, 1024))
    shapes = profile_shapes(m.components["transformer"], m, r)  # guidance is an input, not a second batch
    assert shapes["sample"][2][0] == 2 and shapes["guidance"] == ((1,), (1,), (2,))
    assert shapes["encoder_hidden_states"] == ((1, 1, 4096), (1, 256, 4096), (2, 512, 4096))
    assert profile_shapes(m.components["text_encoder_2"], m, r)["input_ids"] == ((1, 1), (1, 256), (2, 512))


def test_optimize_static_leaves_the_t5_sequence_dynamic():
    from types import SimpleNamespace

    from edgediff.engines.optimize import Static, _static_dims

    m = _transformer_manifest("sd3", 256)
    bundle = SimpleNamespace(manifest=m, component=lambda n: m.components[n])
    dims = _static_dims("transformer", Static(1, 512, 512), bundle)
    assert dims["encoder_hidden_states"] == {0: 2} and dims["sample"] == {0: 2, 2: 64, 3: 64}
    assert _static_dims("text_encoder_3", Static(1, 512, 512), bundle) == {}  # text encoders keep a dynamic batch


def test_deepcache_graphs_are_built_by_default_with_the_denoiser_s_batch_and_their_feature_s_size(
        tiny_sd1_deepcache_bundle):
    """DeepCache's UNets (export --deepcache) run in the unet's place with cache_interval, so build makes engines
    for them by default; their batch doubles with guidance and the shallow graph's cached feature is the latent
    size halved (rounded up, as a stride-2 convolution rounds) once per down block above the branch's."""
    from edgediff.engines.tensorrt.build import default_components
    from edgediff.engines.tensorrt.profiles import dim_values

    b = Bundle.open(tiny_sd1_deepcache_bundle)
    m, f = b.manifest, b.manifest.vae_scale_factor
    assert default_components(b)[-3:] == ["unet_deepcache_full", "unet_deepcache_shallow_0", "unet_deepcache_shallow_1"]
    r = ShapeRange(images=(1, 1, 2), height=(32, 64, 96), width=(32, 64, 128))
    shallow = profile_shapes(m.components["unet_deepcache_shallow_1"], m, r)
    full = profile_shapes(m.components["unet_deepcache_full"], m, r)
    assert shallow["sample"] == full["sample"] == profile_shapes(m.components["unet"], m, r)["sample"]
    channels = m.components["unet_deepcache_shallow_1"].input("deep_feature").shape[1]
    assert shallow["deep_feature"] == ((1, channels, 32 // f, 32 // f), (2, channels, 64 // f, 64 // f),
                                       (4, channels, 96 // f, 128 // f))
    deeper = dim_values("unet_deepcache_shallow_4", m, 1, 9 * f, 16 * f, True)  # block 1: one halving
    assert (deeper["batch"], deeper["feature_height"], deeper["feature_width"]) == (2, 5, 8)
    assert "feature_height" not in dim_values("unet", m, 1, 64, 64, True)
