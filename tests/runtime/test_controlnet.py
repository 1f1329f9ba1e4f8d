"""ControlNet parity with diffusers: same weights, same noise stream, same images.

Reference: diffusers StableDiffusionControlNetPipeline / StableDiffusionControlNetImg2ImgPipeline (installed
version) with ControlNetModel or MultiControlNetModel built from the same tiny random ControlNet folders the bundle
was exported from (tests/controlnet_fixtures.py), output_type="np": max abs difference <= 1e-3 on pixels in [0, 1].
Every case is also checked to differ from the same call without ControlNet by far more than that, so the residuals
really reach the UNet.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from edgediff import Pipeline
from edgediff.errors import BundleError, InputError

from streams import StreamFrom, assert_images_close  # noqa: E402

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-3
CLASSES = {"euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler", "pndm": "PNDMScheduler",
           "euler_a": "EulerAncestralDiscreteScheduler"}


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_sd1_source):
    from controlnet_fixtures import tiny_controlnet_bundle

    return tiny_controlnet_bundle(tmp_path_factory, tiny_sd1_source)


@pytest.fixture(scope="module")
def ours(built):
    return Pipeline.load(built.bundle)


@pytest.fixture(scope="module")
def base(built):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return diffusers.DiffusionPipeline.from_pretrained(built.source, safety_checker=None,
                                                           requires_safety_checker=False, local_files_only=True)


def reference(base, built, names, scheduler, cls=None):
    nets = [diffusers.ControlNetModel.from_pretrained(built.nets[n]) for n in names]
    net = nets[0] if len(nets) == 1 else diffusers.MultiControlNetModel(nets)
    cls = cls or diffusers.StableDiffusionControlNetPipeline
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = cls(**base.components, controlnet=net)
    extra = {"skip_prk_steps": True} if scheduler == "pndm" else {}
    pipe.scheduler = getattr(diffusers, CLASSES[scheduler]).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def picture(size=(16, 16), seed=5, mode="RGB"):
    from PIL import Image

    w, h = size
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8), mode=mode)


CASES = [  # (nets, scheduler, guidance, steps, options as diffusers names them)
    (["canny"], "euler", 6.0, 5, {}),
    (["canny"], "ddim", 6.0, 6, {"guess_mode": True}),
    (["canny"], "euler", 6.0, 8, {"controlnet_conditioning_scale": 0.7, "control_guidance_start": 0.2,
                                  "control_guidance_end": 0.7}),
    (["canny"], "euler_a", 1.0, 5, {"guess_mode": True, "controlnet_conditioning_scale": 1.5}),
    (["depth"], "pndm", 7.5, 5, {}),  # BGR channel order; PNDM runs steps + 1 model calls (keep over all of them)
    (["canny", "depth"], "euler", 6.0, 6, {"controlnet_conditioning_scale": [0.8, 1.3],
                                           "control_guidance_start": [0.0, 0.3],
                                           "control_guidance_end": [0.6, 1.0]}),
    (["canny", "depth"], "ddim", 5.0, 5, {"guess_mode": True}),
    (["pool"], "euler", 6.0, 5, {}),  # global_pool_conditions: guess mode forced, as diffusers' pipeline does
]


@pytest.mark.parametrize("nets,scheduler,guidance,steps,options", CASES)
def test_controlnet_matches_diffusers(nets, scheduler, guidance, steps, options, ours, base, built):
    # control images of another size than the generation (resized as diffusers does), one of them grayscale
    images = [picture((24, 24), seed=3), picture((32, 32), seed=4, mode="L")][:len(nets)]
    ref = reference(base, built, nets, scheduler)
    theirs = ref("a red apple", image=images if len(nets) > 1 else images[0], height=16, width=16,
                 num_inference_steps=steps, guidance_scale=guidance, negative_prompt="blurry",
                 generator=torch.Generator().manual_seed(7), output_type="np", **options).images
    call = dict(height=16, width=16, num_inference_steps=steps, guidance_scale=guidance, scheduler=scheduler,
                output_type="np")
    mine = ours("a red apple", "blurry", control_image=images, controlnets=nets, rng=StreamFrom(7), **call, **options)
    assert_images_close(mine.images, theirs, TOL)
    plain = ours("a red apple", "blurry", rng=StreamFrom(7), **call)
    assert np.abs(np.stack(plain.images) - theirs).max() > 20 * TOL  # the ControlNet changed the image
    assert [c["name"] for c in mine.parameters["controlnets"]] == nets
    assert mine.parameters["guess_mode"] == (options.get("guess_mode", False) or nets == ["pool"])


def test_img2img_with_controlnet_matches_diffusers(ours, base, built):
    ref = reference(base, built, ["canny"], "euler", cls=diffusers.StableDiffusionControlNetImg2ImgPipeline)
    init, control = picture((16, 16), seed=8), picture((16, 16), seed=9)
    theirs = ref("a red apple", image=init, control_image=control, height=16, width=16, strength=0.6,
                 num_inference_steps=8, guidance_scale=6.0, negative_prompt="blurry",
                 controlnet_conditioning_scale=0.9, generator=torch.Generator().manual_seed(11),
                 output_type="np").images
    mine = ours("a red apple", "blurry", image=init, control_image=control, controlnets="canny", strength=0.6,
                num_inference_steps=8, guidance_scale=6.0, controlnet_conditioning_scale=0.9, scheduler="euler",
                rng=StreamFrom(11), output_type="np")
    assert_images_close(mine.images, theirs, TOL)


def test_several_images_per_prompt_get_the_control_image_each(ours, base, built):
    ref = reference(base, built, ["canny"], "euler")
    image = picture((16, 16), seed=12)
    theirs = ref(["a red apple", "a blue car"], image=image, height=16, width=16, num_inference_steps=4,
                 guidance_scale=6.0, num_images_per_prompt=2, generator=torch.Generator().manual_seed(2),
                 output_type="np").images
    mine = ours(["a red apple", "a blue car"], control_image=image, num_inference_steps=4, guidance_scale=6.0,
                num_images_per_prompt=2, controlnets=["canny"], scheduler="euler", rng=StreamFrom(2),
                output_type="np")
    assert_images_close(mine.images, theirs, TOL)


def test_steps_without_an_active_controlnet_run_the_plain_unet(built):
    pipe = Pipeline.load(built.bundle)
    ran = []

    class Watch:
        def __init__(self, name, backend):
            self.name, self.backend = name, backend

        def __getattr__(self, key):
            return getattr(self.backend, key)

        def run(self, feeds):
            ran.append(self.name)
            return self.backend.run(feeds)

    pipe.components.wrap(lambda name, backend: Watch(name, backend))
    pipe("a cat", control_image=[picture(), picture(seed=6)], controlnets=["canny", "depth"], num_inference_steps=4,
         control_guidance_start=[0.5, 0.75], scheduler="euler", output_type="latent")
    denoisers = [n for n in ran if n.startswith("unet")]
    assert denoisers == ["unet", "unet", "unet_controlnet", "unet_controlnet"]
    assert [n for n in ran if n.startswith("controlnet_")] == ["controlnet_canny", "controlnet_canny",
                                                               "controlnet_depth"]
    ran.clear()
    pipe("a cat", num_inference_steps=3, scheduler="euler", output_type="latent")  # no ControlNet: the plain graph
    assert [n for n in ran if n.startswith(("unet", "controlnet"))] == ["unet"] * 3


def test_generation_size_follows_the_control_image(ours):
    r = ours("a cat", control_image=picture((24, 18)), controlnets="canny", num_inference_steps=2,
             output_type="np")
    assert r.images[0].shape == (16, 24, 3)  # 24x18 rounded down to the size multiple
    r = ours("a cat", control_image=picture((24, 16)), controlnets="canny", num_inference_steps=2, width=12,
             output_type="np")
    assert r.images[0].shape == (8, 12, 3)  # only width given: the image's aspect ratio


def test_bad_inputs_are_one_clear_line(ours, built, tiny_sd1_bundle, tmp_path):
    img = picture()
    call = dict(num_inference_steps=2, output_type="latent")
    cases = [
        (dict(control_image=picture((16, 12)), controlnets="canny", height=16, width=16),
         "control image is 16x12 and the generation 16x16: a different aspect ratio"),
        (dict(control_image=picture().convert("I;16"), controlnets="canny"), "mode I;16"),
        (dict(control_image=np.zeros((16, 16, 3), np.float32), controlnets="canny"), "uint8 pixels"),
        (dict(control_image=picture((2, 2)), controlnets="canny"), "at least 4x4 pixels"),
        (dict(control_image=img, controlnets="tile"), "no ControlNet 'tile'; it has: canny, depth, pool"),
        (dict(control_image=img), "has ControlNets canny, depth, pool: name the ones to use"),
        (dict(control_image=[img], controlnets=["canny", "depth"]), "1 control image(s) for 2 ControlNet(s)"),
        (dict(control_image=img, controlnets="canny", controlnet_conditioning_scale=-1),
         "controlnet_conditioning_scale=-1; expected a number from 0 to 100"),
        (dict(control_image=img, controlnets="canny", controlnet_conditioning_scale=float("nan")),
         "controlnet_conditioning_scale=nan"),
        (dict(control_image=img, controlnets="canny", control_guidance_start=1.2),
         "control_guidance_start=1.2; expected a number from 0 to 1"),
        (dict(control_image=img, controlnets="canny", control_guidance_start=0.6, control_guidance_end=0.4),
         "control_guidance_start 0.6 is not below control_guidance_end 0.4"),
        (dict(control_image=[img, img], controlnets=["canny", "depth"], controlnet_conditioning_scale=[1, 2, 3]),
         "has 3 values for 2 ControlNet(s)"),
        (dict(control_image=img, controlnets="canny", guess_mode="yes"), "guess_mode must be True or False"),
        (dict(controlnet_conditioning_scale=0.5), "controlnet_conditioning_scale= applies to ControlNet"),
        (dict(controlnets="canny"), "controlnets= applies to ControlNet"),
        (dict(control_image=img, controlnets="canny", image=img, mask_image=picture(mode="L")),
         "ControlNet with inpainting (mask_image=) is not supported yet"),
        (dict(control_image=tmp_path / "missing.png", controlnets="canny"), "control image not found"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError) as exc:
            ours("a cat", **call, **kwargs)
        assert message in str(exc.value) and "\n" not in str(exc.value), (kwargs, str(exc.value))
    plain = Pipeline.load(tiny_sd1_bundle)
    with pytest.raises(InputError, match="has no ControlNet; export one into the bundle with edgediff export"):
        plain("a cat", control_image=img, **call)


def test_cli_generates_with_a_control_image_and_refuses_bad_ones(built, tiny_sd1_bundle, tmp_path):
    from click.testing import CliRunner

    from edgediff.cli import main

    picture().save(tmp_path / "edges.png")
    picture((16, 12)).save(tmp_path / "wide.png")
    run = CliRunner().invoke
    out = tmp_path / "out.png"
    r = run(main, ["generate", "a cat", "-m", str(built.bundle), "--control-image", str(tmp_path / "edges.png"),
                   "--controlnet", "canny", "--control-scale", "0.8", "--control-end", "0.5", "--steps", "2",
                   "-o", str(out), "--seed", "1"])
    assert r.exit_code == 0, r.output
    from PIL import Image

    with Image.open(out) as im:
        assert '"controlnets": [{"end": 0.5, "name": "canny", "scale": 0.8, "start": 0.0}]' in im.info["parameters"]
    bad = [
        (["-m", str(built.bundle), "--control-image", str(tmp_path / "edges.png"), "--controlnet", "tile"],
         "no ControlNet 'tile'; it has: canny, depth, pool"),
        (["-m", str(built.bundle), "--control-image", str(tmp_path / "wide.png"), "--controlnet", "canny",
          "--size", "16x16"], "a different aspect ratio"),
        (["-m", str(built.bundle), "--control-image", str(tmp_path / "edges.png"), "--controlnet", "canny",
          "--control-scale", "-2"], "controlnet_conditioning_scale=-2.0"),
        (["-m", str(built.bundle), "--control-image", str(tmp_path / "edges.png"), "--controlnet", "canny",
          "--control-start", "1.5"], "control_guidance_start=1.5"),
        (["-m", str(tiny_sd1_bundle), "--control-image", str(tmp_path / "edges.png")], "has no ControlNet"),
    ]
    for args, message in bad:
        r = run(main, ["generate", "a cat", *args, "-o", str(tmp_path / "x.png")])
        assert r.exit_code == 2 and message in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()


def test_a_bundle_missing_its_residual_unet_is_refused(built, tmp_path):
    import json
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(built.bundle, copy)
    manifest = json.loads((copy / "edgediff.json").read_text())
    del manifest["components"]["unet_controlnet"]
    (copy / "edgediff.json").write_text(json.dumps(manifest))
    pipe = Pipeline.load(copy)
    with pytest.raises(BundleError, match="no unet_controlnet graph to take their residuals"):
        pipe("a cat", control_image=picture(), controlnets="canny", num_inference_steps=2)


def test_step_level_batching_keeps_each_jobs_controlnet(ours):
    """Jobs with different ControlNets, scales, start/end and guess mode, and one without, stepped together
    (runtime/batching.py): each image is the one its call gives alone, to the bit."""
    from edgediff.batching import step_together

    calls = [dict(control_image=picture(seed=1), controlnets="canny", controlnet_conditioning_scale=0.5),
             dict(control_image=picture(seed=2), controlnets="canny", control_guidance_start=0.4),
             dict(control_image=[picture(seed=3), picture(seed=4)], controlnets=["canny", "depth"], guess_mode=True),
             dict()]
    base = dict(prompt="a red apple", num_inference_steps=4, scheduler="euler", height=16, width=16,
                output_type="np")
    alone = [ours(seed=k, **base, **kw).images[0] for k, kw in enumerate(calls)]
    jobs = [ours.start(ours.request(seed=k, **base, **kw)) for k, kw in enumerate(calls)]
    seen = []

    def run(graph, feeds):
        seen.append((graph, feeds["sample"].shape[0]))
        return ours.run_denoiser(graph, feeds)

    while not all(j.done for j in jobs):
        step_together(jobs, run)
    assert all(j.error is None for j in jobs)
    together = [ours.finish(j).images[0] for j in jobs]
    for a, b in zip(alone, together):
        assert np.array_equal(a, b)
    assert ("unet_controlnet", 6) in seen  # three ControlNet jobs (CFG: 2 rows each) shared one call


def test_low_memory_mode_gives_the_same_images(built, ours):
    kw = dict(control_image=[picture(seed=1), picture(seed=2)], controlnets=["canny", "depth"],
              control_guidance_end=[1.0, 0.5], num_inference_steps=3, scheduler="euler", seed=4, output_type="np")
    with Pipeline.load(built.bundle, low_memory=True) as low:
        # without pre-packed weights (low-memory mode) MLAS sums in another order: ~1e-6 apart
        np.testing.assert_allclose(low("a red apple", **kw).images[0], ours("a red apple", **kw).images[0], atol=1e-5,
                                   rtol=0)


def test_sd2_v_prediction_controlnet_matches_diffusers(tmp_path_factory, tiny_sd2v_source):
    """SD 2.x: a ControlNet from the tiny SD2-v UNet (linear projections, per-block head dims, v-prediction)."""
    from controlnet_fixtures import build_tiny_controlnet

    from edgediff.export.pipeline_export import export_pipeline

    root = tmp_path_factory.mktemp("sd2v-cn")
    net = build_tiny_controlnet(tiny_sd2v_source, root / "edges", 5)
    bundle = export_pipeline(tiny_sd2v_source, root / "bundle", controlnets=[(net, None)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = diffusers.DiffusionPipeline.from_pretrained(tiny_sd2v_source, safety_checker=None,
                                                           requires_safety_checker=False, local_files_only=True)
        ref = diffusers.StableDiffusionControlNetPipeline(**base.components,
                                                         controlnet=diffusers.ControlNetModel.from_pretrained(net))
    ref.set_progress_bar_config(disable=True)
    image = picture((16, 16), seed=21)
    theirs = ref("a red apple", image=image, height=16, width=16, num_inference_steps=5, guidance_scale=6.0,
                 controlnet_conditioning_scale=1.2, generator=torch.Generator().manual_seed(3),
                 output_type="np").images
    with Pipeline.load(bundle) as ours:
        mine = ours("a red apple", control_image=image, num_inference_steps=5, guidance_scale=6.0,
                    controlnet_conditioning_scale=1.2, rng=StreamFrom(3), output_type="np")  # the bundle's DDIM
    assert ours.bundle.manifest.family == "sd2-v"
    assert_images_close(mine.images, theirs, TOL)


SDXL_CASES = [("euler", {}), ("euler", {"guess_mode": True, "controlnet_conditioning_scale": 0.8}),
              ("ddim", {"control_guidance_start": 0.3, "control_guidance_end": 0.9})]


@pytest.mark.parametrize("scheduler,options", SDXL_CASES)
def test_sdxl_controlnet_matches_diffusers(scheduler, options, tmp_path_factory, tiny_sdxl_base):
    """SDXL: the ControlNet and the residual UNet also take the pooled text embeddings and time ids (guess mode: the
    conditional rows of those too), against StableDiffusionXLControlNetPipeline."""
    from controlnet_fixtures import tiny_sdxl_controlnet_bundle

    built = tiny_sdxl_controlnet_bundle(tmp_path_factory, tiny_sdxl_base.source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = diffusers.DiffusionPipeline.from_pretrained(built.source, local_files_only=True)
        ref = diffusers.StableDiffusionXLControlNetPipeline(
            **base.components, controlnet=diffusers.ControlNetModel.from_pretrained(built.nets["edges"]),
            add_watermarker=False)
    ref.scheduler = getattr(diffusers, CLASSES[scheduler]).from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    image = picture((48, 48), seed=31)
    theirs = ref("a red apple", image=image, height=32, width=32, num_inference_steps=5, guidance_scale=5.0,
                 negative_prompt="blurry", generator=torch.Generator().manual_seed(7), output_type="np",
                 **options).images
    call = dict(height=32, width=32, num_inference_steps=5, guidance_scale=5.0, scheduler=scheduler, output_type="np")
    with Pipeline.load(built.bundle) as ours:
        mine = ours("a red apple", "blurry", control_image=image, rng=StreamFrom(7), **call, **options)
        plain = ours("a red apple", "blurry", rng=StreamFrom(7), **call)
    assert_images_close(mine.images, theirs, TOL)
    assert np.abs(np.stack(plain.images) - theirs).max() > 20 * TOL


def test_controlnet_with_a_hot_swapped_lora_is_refused(built, tmp_path):
    """A swapped LoRA changes the unet graph's weights only, not unet_controlnet's: refused, pointing to export."""
    from lora_fixtures import make_lora

    lora = make_lora(built.source, tmp_path / "style.safetensors", seed=3)
    with Pipeline.load(built.bundle, loras={str(lora): 0.8}) as pipe:
        with pytest.raises(InputError, match="fuse the LoRA at export .*--lora FILE --controlnet DIR"):
            pipe("a cat", control_image=picture(), controlnets="canny", num_inference_steps=2)
        pipe.set_loras({})
        pipe("a cat", control_image=picture(), controlnets="canny", num_inference_steps=2, output_type="latent")
