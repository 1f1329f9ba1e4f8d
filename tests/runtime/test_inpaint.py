"""Inpainting parity with diffusers: same weights, same noise stream, same images.

Reference: diffusers StableDiffusionInpaintPipeline (installed version), output_type="np" (max abs difference <= 1e-3,
pixels in [0, 1]) or "pil" with padding_mask_crop (<= 2/255). Both kinds: a tiny random 9-channel inpainting UNet
(preset tiny-sd1-inpaint) and the regular tiny SD1 UNet (the latent blend); the blend on the tiny SDXL base and
refiner against StableDiffusionXLInpaintPipeline. diffusers is given height/width = the image's size (its default
would resize to the UNet's native size; the runtime keeps the image's size).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from edgediff import Pipeline
from edgediff.errors import InputError

from streams import StreamFrom, assert_images_close  # noqa: E402

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-3
CLASSES = {"euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler", "ddim": "DDIMScheduler",
           "dpmpp_2m_karras": "DPMSolverMultistepScheduler", "pndm": "PNDMScheduler"}


@pytest.fixture(scope="module")
def inpaint_source(tmp_path_factory):
    from edgediff.export.random_pipeline import build_random_pipeline

    return build_random_pipeline(tmp_path_factory.mktemp("src") / "tiny-sd1-inpaint", "tiny-sd1-inpaint", seed=0)


@pytest.fixture(scope="module")
def inpaint_bundle(inpaint_source, tmp_path_factory):
    from edgediff.export.pipeline_export import export_pipeline

    return export_pipeline(inpaint_source, tmp_path_factory.mktemp("bundles") / "tiny-sd1-inpaint")


@pytest.fixture(scope="module")
def ours_9ch(inpaint_bundle):
    return Pipeline.load(inpaint_bundle)


@pytest.fixture(scope="module")
def ours_4ch(tiny_sd1_bundle):
    return Pipeline.load(tiny_sd1_bundle)


def reference(source, scheduler: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = diffusers.DiffusionPipeline.from_pretrained(source, safety_checker=None, requires_safety_checker=False,
                                                           local_files_only=True)
        pipe = diffusers.StableDiffusionInpaintPipeline(**base.components)
    extra = {"use_karras_sigmas": True} if scheduler == "dpmpp_2m_karras" else {}
    extra.update({"skip_prk_steps": True} if scheduler == "pndm" else {})
    pipe.scheduler = getattr(diffusers, CLASSES[scheduler]).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def picture(size=(16, 16), seed=5):
    from PIL import Image

    w, h = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def mask(size=(16, 16), box=(3, 4, 11, 13)):
    """White box = repaint, with a grey rim either side of the 0.5 threshold (binarization is part of the test)."""
    from PIL import Image

    w, h = size
    a = np.zeros((h, w), np.uint8)
    x1, y1, x2, y2 = box
    a[y1:y2, x1:x2] = 255
    a[y1:y2, x1] = 140  # >= 0.5: repainted
    a[y1, x1:x2] = 110  # < 0.5: kept
    return Image.fromarray(a, mode="L")


def compare(ours_img, ref_img, tol=TOL):
    assert_images_close(ours_img, ref_img, tol)


CASES = [  # (UNet kind, scheduler, strength, guidance, steps)
    ("9ch", "euler", 1.0, 6.0, 5), ("9ch", "ddim", 0.6, 6.0, 8), ("9ch", "euler_a", 1.0, 1.0, 4),
    ("4ch", "euler", 1.0, 6.0, 5), ("4ch", "dpmpp_2m_karras", 0.6, 5.0, 8), ("4ch", "euler_a", 0.6, 6.0, 6),
    ("4ch", "pndm", 1.0, 7.5, 5),
]


@pytest.mark.parametrize("kind,scheduler,strength,guidance,steps", CASES)
def test_inpainting_matches_diffusers(kind, scheduler, strength, guidance, steps, request):
    source = request.getfixturevalue("inpaint_source" if kind == "9ch" else "tiny_sd1_source")
    ours = request.getfixturevalue(f"ours_{kind}")
    ref = reference(source, scheduler)
    image, m = picture(), mask()
    theirs = ref("a red apple", image=image, mask_image=m, height=16, width=16, strength=strength,
                 num_inference_steps=steps, guidance_scale=guidance, negative_prompt="blurry",
                 generator=torch.Generator().manual_seed(7), output_type="np").images
    mine = ours("a red apple", "blurry", image=image, mask_image=m, strength=strength, num_inference_steps=steps,
                guidance_scale=guidance, scheduler=scheduler, rng=StreamFrom(7), output_type="np")
    compare(mine.images, theirs)
    assert mine.parameters["inpaint"] == ("inpainting unet" if kind == "9ch" else "latent blend")
    assert mine.parameters["strength"] == strength


def test_inpainting_pipeline_exports_with_a_9_channel_unet(inpaint_bundle):
    """export accepts StableDiffusionInpaintPipeline; the manifest's UNet sample input says 9 channels (what the
    runtime reads to choose the mask channels over the blend), and the UNet's parity receipt passed at 9 channels."""
    from edgediff.bundle.reader import Bundle
    from edgediff.inpaint import is_inpainting_unet

    b = Bundle.open(inpaint_bundle)
    unet = b.component("unet")
    assert unet.input("sample").shape[1] == 9 and unet.parity.passed
    assert b.manifest.provenance.source_class == "StableDiffusionInpaintPipeline" and b.manifest.family == "sd1"
    assert is_inpainting_unet(b)


def test_default_strength_is_diffusers_inpainting_default(ours_9ch, inpaint_source):
    """strength left out is 1.0 (pure-noise start), not img2img's 0.8."""
    ref = reference(inpaint_source, "euler")
    theirs = ref("a cat", image=picture(), mask_image=mask(), height=16, width=16, num_inference_steps=4,
                 generator=torch.Generator().manual_seed(3), output_type="np").images
    mine = ours_9ch("a cat", image=picture(), mask_image=mask(), num_inference_steps=4, scheduler="euler",
                    rng=StreamFrom(3), output_type="np")
    assert mine.parameters["strength"] == 1.0
    compare(mine.images, theirs)


@pytest.mark.parametrize("kind", ["9ch", "4ch"])
def test_padding_mask_crop_matches_diffusers(kind, request):
    """Crop to the mask's box + padding (grown to the image's aspect), generate at full size, paste back."""
    source = request.getfixturevalue("inpaint_source" if kind == "9ch" else "tiny_sd1_source")
    ours = request.getfixturevalue(f"ours_{kind}")
    ref = reference(source, "euler")
    image, m = picture((24, 16)), mask((24, 16), box=(14, 3, 20, 8))
    theirs = ref("a red apple", image=image, mask_image=m, height=16, width=24, padding_mask_crop=2,
                 num_inference_steps=4, guidance_scale=6.0, generator=torch.Generator().manual_seed(9)).images
    mine = ours("a red apple", image=image, mask_image=m, padding_mask_crop=2, num_inference_steps=4,
                guidance_scale=6.0, scheduler="euler", rng=StreamFrom(9))
    assert mine.images[0].size == image.size and mine.parameters["padding_mask_crop"] == 2
    compare(mine.images, theirs, tol=2)
    # the kept (black) region is the original's pixels, exactly
    kept = np.asarray(m) == 0
    np.testing.assert_array_equal(np.asarray(mine.images[0])[kept], np.asarray(image)[kept])


@pytest.mark.parametrize("fixture,strength", [("base", 1.0), ("base", 0.6), ("base", None), ("refiner", 0.6)])
def test_sdxl_latent_blend_matches_diffusers(fixture, strength, request):
    """The same code on SDXL bundles (base and refiner) against StableDiffusionXLInpaintPipeline, including its
    default strength 0.9999 (the first step skipped, the start the noised image)."""
    built = request.getfixturevalue(f"tiny_sdxl_{fixture}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = diffusers.DiffusionPipeline.from_pretrained(built.source, local_files_only=True)
        ref = diffusers.StableDiffusionXLInpaintPipeline(
            **base.components, requires_aesthetics_score=base.config.get("requires_aesthetics_score", False),
            force_zeros_for_empty_prompt=base.config.get("force_zeros_for_empty_prompt", True))
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    given = {} if strength is None else {"strength": strength}
    theirs = ref("a red apple", image=picture(), mask_image=mask(), height=16, width=16, num_inference_steps=5,
                 guidance_scale=5.0, generator=torch.Generator().manual_seed(7), output_type="np", **given).images
    with Pipeline.load(built.bundle) as ours:
        mine = ours("a red apple", image=picture(), mask_image=mask(), num_inference_steps=5, guidance_scale=5.0,
                    scheduler="euler", rng=StreamFrom(7), output_type="np", **given)
    compare(mine.images, theirs)
    assert mine.parameters["strength"] == (0.9999 if strength is None else strength)


def test_crop_region_matches_diffusers():
    """get_crop_region on random boxes, sizes and paddings: the same boxes, aspect-ratio growth and clamping."""
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    from edgediff.inpaint import crop_region

    rng = np.random.default_rng(0)
    for _ in range(300):
        w, h = (int(v) for v in rng.integers(8, 40, 2))
        a = np.zeros((h, w), np.uint8)
        x1, y1 = int(rng.integers(0, w)), int(rng.integers(0, h))
        a[y1: y1 + int(rng.integers(1, h - y1 + 1)), x1: x1 + int(rng.integers(1, w - x1 + 1))] = rng.integers(1, 256)
        m = Image.fromarray(a, mode="L")
        pw, ph, pad = int(rng.integers(4, 64)), int(rng.integers(4, 64)), int(rng.integers(0, 6))
        assert crop_region(m, pw, ph, pad) == VaeImageProcessor.get_crop_region(m, pw, ph, pad=pad)


def test_images_per_prompt_are_independent_of_the_batch(ours_4ch):
    """Image k of a batch is the image its seed gives alone (per-image noise streams, VAE samples included)."""
    args = dict(image=picture(), mask_image=mask(), num_inference_steps=3, strength=0.7, scheduler="euler_a",
                output_type="np")
    batch = ours_4ch("a cat", num_images_per_prompt=2, seed=40, **args)
    alone = ours_4ch("a cat", seed=41, **args)
    np.testing.assert_array_equal(batch.images[1], alone.images[0])


def test_latent_blend_keeps_the_unmasked_latents(ours_4ch):
    """The blend's last step leaves the init image's latents outside the mask: two prompts give the same latents
    there and different ones inside (without the blend, the outside would follow the prompt too)."""
    args = dict(image=picture(seed=1), mask_image=mask(box=(0, 0, 8, 16)), num_inference_steps=4, seed=2,
                output_type="latent")  # the left half (latent columns 0-3) is repainted
    a = ours_4ch("a cat", **args).latents
    b = ours_4ch("an astronaut riding a horse", **args).latents
    np.testing.assert_array_equal(a[..., 4:], b[..., 4:])
    assert np.abs(a[..., :4] - b[..., :4]).max() > 1e-3


# -- bad input: one clear line each ------------------------------------------------------------------------------
def test_bad_inputs_are_one_clear_line(ours_9ch, ours_4ch, tmp_path):
    image, m = picture(), mask()
    cases = [
        (dict(image=image, mask_image=mask((16, 12))), "mask_image is 16x12 but the init image is 16x16"),
        (dict(mask_image=m), "a mask needs the image to inpaint"),
        (dict(image=image, mask_image=np.zeros((16, 16))), "mask_image must be an image"),
        (dict(image=image, mask_image=tmp_path / "nope.png"), "mask not found"),
        (dict(image=image, padding_mask_crop=4), "padding_mask_crop only applies to inpainting"),
        (dict(image=image, mask_image=m, padding_mask_crop=-1), "padding_mask_crop=-1"),
        (dict(image=image, mask_image=m, padding_mask_crop=2, output_type="np"), "use output_type='pil'"),
        (dict(image=image, mask_image=m, latents=np.zeros((1, 4, 8, 8), np.float32)), "drop latents"),
        (dict(image=image, mask_image=m, denoising_start=0.5), "do not apply to inpainting"),
        (dict(image=image, mask_image=m, strength=0.0), "strength=0.0"),
        (dict(image=image, mask_image=m, height=32, width=32), "inpainting keeps the image's size"),
        (dict(image=image, mask_image=mask(box=(0, 0, 0, 0)), padding_mask_crop=1), "mask_image is all black"),
    ]
    (tmp_path / "bad.png").write_bytes(b"not a png")
    cases.append((dict(image=image, mask_image=tmp_path / "bad.png"), "cannot read mask"))
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message.replace("(", r"\(")) as err:
            ours_4ch.request("a cat", **kwargs)
        assert "\n" not in str(err.value)
    # a 9-channel UNet without its mask, for text-to-image or img2img
    for kwargs in (dict(), dict(image=image)):
        with pytest.raises(InputError, match="inpainting UNet .9 input channels"):
            ours_9ch.request("a cat", **kwargs)


def test_bundle_that_cannot_inpaint_is_refused(tiny_sd1_bundle, tmp_path):
    """No vae_encoder (the init image cannot be encoded) and a family this module does not cover: refused at the
    request, before any work."""
    import dataclasses
    import shutil

    from edgediff.bundle.reader import Bundle
    from edgediff.bundle.writer import write_manifest

    dst = tmp_path / "no-encoder"
    shutil.copytree(tiny_sd1_bundle, dst)
    m = Bundle.open(dst).manifest
    comps = {k: v for k, v in m.components.items() if k != "vae_encoder"}
    shutil.rmtree(dst / "vae_encoder")
    files = tuple(f for f in m.files if not f.path.startswith("vae_encoder/"))
    write_manifest(dst, dataclasses.replace(m, components=comps, files=files))
    with Pipeline.load(dst) as pipe:
        with pytest.raises(InputError, match="has no vae_encoder"):
            pipe.request("a cat", image=picture(), mask_image=mask())
        pipe.request("a cat")  # text-to-image still runs

    other = tmp_path / "other-family"
    shutil.copytree(tiny_sd1_bundle, other)
    write_manifest(other, dataclasses.replace(Bundle.open(tiny_sd1_bundle).manifest, family="lcm"))
    from edgediff.inpaint import prepare

    with pytest.raises(InputError, match="not supported for lcm bundles"):
        prepare(Bundle.open(other), picture(), mask(), multiple=4)


def test_cli_inpaints_and_refuses_a_mismatched_mask(tiny_sd1_bundle, tmp_path):
    from click.testing import CliRunner

    from edgediff.cli import main

    picture().save(tmp_path / "in.png")
    mask().save(tmp_path / "mask.png")
    mask((16, 12)).save(tmp_path / "small.png")
    run = CliRunner().invoke
    out = tmp_path / "out.png"
    r = run(main, ["generate", "a cat", "-m", str(tiny_sd1_bundle), "--init-image", str(tmp_path / "in.png"),
                   "--mask", str(tmp_path / "mask.png"), "--strength", "0.7", "--padding-mask-crop", "2", "--steps",
                   "2", "-o", str(out), "--seed", "1"])
    assert r.exit_code == 0, r.output
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (16, 16)
        assert '"inpaint": "latent blend"' in im.info["parameters"]
    r = run(main, ["generate", "a cat", "-m", str(tiny_sd1_bundle), "--init-image", str(tmp_path / "in.png"),
                   "--mask", str(tmp_path / "small.png"), "-o", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and "mask_image is 16x12 but the init image is 16x16" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()
    r = run(main, ["generate", "a cat", "-m", str(tiny_sd1_bundle), "--mask", str(tmp_path / "mask.png"),
                   "-o", str(tmp_path / "y.png")])
    assert r.exit_code == 2 and "a mask needs the image to inpaint" in r.output
