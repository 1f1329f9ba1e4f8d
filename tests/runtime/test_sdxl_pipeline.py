"""Whole SDXL pipelines against diffusers: tiny random SDXL base and refiner (tests/sdxl_fixtures.py), exported and
run by edgediff with the same initial latents and noise as diffusers' StableDiffusionXLPipeline /
StableDiffusionXLImg2ImgPipeline (installed version). Tolerance: max abs <= 1e-3 on float images in [0, 1] (far
inside the 2/255 bar), and uint8 images within 2/255."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from edgediff import Pipeline
from edgediff.errors import InputError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from streams import StreamFrom, assert_images_close  # noqa: E402

TOL = 1e-3
CLASSES = {"euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
           "dpmpp_2m": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler", "unipc": "UniPCMultistepScheduler"}


def reference(source, cls: str, scheduler: str | None = None, **scheduler_config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = getattr(diffusers, cls).from_pretrained(source, local_files_only=True)
    if scheduler is not None or scheduler_config:
        klass = getattr(diffusers, CLASSES[scheduler]) if scheduler else type(pipe.scheduler)
        pipe.scheduler = klass.from_config(pipe.scheduler.config, **scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compare(ours, theirs) -> None:
    assert_images_close(ours, theirs, TOL)
    assert np.abs(np.round(np.stack(ours) * 255) - np.round(np.asarray(theirs) * 255)).max() <= 2  # 2/255 as uint8


@pytest.fixture(scope="module")
def ours_base(tiny_sdxl_base):
    return Pipeline.load(tiny_sdxl_base.bundle)


@pytest.fixture(scope="module")
def ours_refiner(tiny_sdxl_refiner):
    return Pipeline.load(tiny_sdxl_refiner.bundle)


LATENTS = np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)  # 2 images of 16x16
PROMPTS = ["a red circle on white", "an astronaut riding a horse"]


@pytest.mark.parametrize("scheduler,guidance,negative,steps", [
    ("euler", 5.0, None, 4), ("euler_a", 7.5, "blurry", 4), ("dpmpp_2m", 5.0, None, 5), ("ddim", 1.0, None, 3),
    ("unipc", 6.0, "ugly", 5)])
def test_txt2img_matches_diffusers(tiny_sdxl_base, ours_base, scheduler, guidance, negative, steps):
    ref = reference(tiny_sdxl_base.source, "StableDiffusionXLPipeline", scheduler)
    theirs = ref(PROMPTS, negative_prompt=None if negative is None else [negative] * 2, num_inference_steps=steps,
                 guidance_scale=guidance, latents=torch.from_numpy(LATENTS), generator=torch.Generator().manual_seed(11),
                 output_type="np").images
    mine = ours_base(PROMPTS, negative, num_inference_steps=steps, guidance_scale=guidance, latents=LATENTS,
                     scheduler=scheduler, rng=StreamFrom(11), output_type="np")
    compare(mine.images, theirs)


def test_prompt_2_and_micro_conditioning_match_diffusers(tiny_sdxl_base, ours_base):
    kwargs = dict(prompt_2="a watercolor", negative_prompt_2="jpeg artifacts", original_size=(64, 48),
                  crops_coords_top_left=(4, 8), target_size=(32, 32))
    ref = reference(tiny_sdxl_base.source, "StableDiffusionXLPipeline")
    theirs = ref(PROMPTS[0], negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0,
                 latents=torch.from_numpy(LATENTS[:1]), output_type="np", **kwargs).images
    mine = ours_base(PROMPTS[0], "blurry", num_inference_steps=3, guidance_scale=5.0, latents=LATENTS[:1],
                     output_type="np", **kwargs)
    compare(mine.images, theirs)
    plain = ours_base(PROMPTS[0], "blurry", num_inference_steps=3, guidance_scale=5.0, latents=LATENTS[:1],
                      output_type="np")
    assert np.abs(np.stack(plain.images) - np.stack(mine.images)).max() > 1e-3  # the options changed the image


def test_img2img_matches_diffusers(tiny_sdxl_base, ours_base):
    from PIL import Image

    ref = reference(tiny_sdxl_base.source, "StableDiffusionXLImg2ImgPipeline", "euler_a")
    init = Image.fromarray(np.random.default_rng(5).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    theirs = ref("a blue square", image=init, strength=0.6, num_inference_steps=10, guidance_scale=6.0,
                 generator=torch.Generator().manual_seed(21), output_type="np").images
    mine = ours_base("a blue square", image=init, strength=0.6, num_inference_steps=10, guidance_scale=6.0,
                     seed=21, rng="torch", scheduler="euler_a", output_type="np")
    compare(mine.images, theirs)


def test_base_to_refiner_hand_off_matches_diffusers(tiny_sdxl_base, tiny_sdxl_refiner, ours_base, ours_refiner):
    """Ensemble of experts: the base denoises the first 70 % and hands its latents to the refiner."""
    ref_base = reference(tiny_sdxl_base.source, "StableDiffusionXLPipeline")
    ref_refiner = reference(tiny_sdxl_refiner.source, "StableDiffusionXLImg2ImgPipeline")
    handed = ref_base(PROMPTS[1], num_inference_steps=10, denoising_end=0.7, latents=torch.from_numpy(LATENTS[:1]),
                      output_type="latent").images
    theirs = ref_refiner(PROMPTS[1], image=handed, num_inference_steps=10, denoising_start=0.7,
                         output_type="np").images
    mine_base = ours_base(PROMPTS[1], num_inference_steps=10, denoising_end=0.7, latents=LATENTS[:1],
                          output_type="latent")
    assert mine_base.latents.shape == (1, 4, 8, 8) and mine_base.parameters["denoising_end"] == 0.7
    np.testing.assert_allclose(mine_base.latents, handed.numpy(), atol=1e-4)
    mine = ours_refiner(PROMPTS[1], image=mine_base.latents, num_inference_steps=10, denoising_start=0.7,
                        output_type="np")
    compare(mine.images, theirs)


def test_turbo_style_one_trailing_step_without_guidance_matches_diffusers(tiny_sdxl_base, ours_base, tmp_path):
    """SDXL-Turbo's recipe: Euler ancestral, trailing timesteps, 1 step, guidance 0 (one UNet batch per step)."""
    from bundle_edit import with_scheduler_config

    ref = reference(tiny_sdxl_base.source, "StableDiffusionXLPipeline", "euler_a", timestep_spacing="trailing")
    theirs = ref(PROMPTS[0], num_inference_steps=1, guidance_scale=0.0, latents=torch.from_numpy(LATENTS[:1]),
                 generator=torch.Generator().manual_seed(2), output_type="np").images
    # the same model with a Turbo bundle's scheduler config, as `edgediff export` of a Turbo folder writes it
    turbo = with_scheduler_config(tiny_sdxl_base.bundle, tmp_path / "turbo",
                                  _class_name="EulerAncestralDiscreteScheduler", timestep_spacing="trailing")
    with Pipeline.load(turbo) as pipe:
        mine = pipe(PROMPTS[0], num_inference_steps=1, guidance_scale=0.0, latents=LATENTS[:1], rng=StreamFrom(2),
                    output_type="np")
    compare(mine.images, theirs)
    assert len([s for s in mine.spans if s.name == "unet"]) == 1


BAD = [
    (dict(prompt_2=5), "prompt_2 must be a string"),
    (dict(original_size=(0, 16)), "original_size"),
    (dict(aesthetic_score=float("nan")), "aesthetic_score"),
    (dict(height=18), "not a multiple of 4"),
    (dict(denoising_end=1.0), "denoising_end=1.0; must be a number strictly between 0 and 1"),
    (dict(denoising_end=0.0), "strictly between 0 and 1"),
    (dict(denoising_start=0.5), "denoising_start continues from an image or latents"),
    (dict(clip_skip=2), "clip_skip= does not apply to this sdxl bundle"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m for _, m in BAD])
def test_bad_sdxl_input_is_one_line(ours_base, kwargs, message):
    with pytest.raises(InputError, match=message):
        ours_base("x", num_inference_steps=2, **kwargs)


def test_refiner_used_as_a_base_is_refused(ours_refiner):
    with pytest.raises(InputError, match="SDXL refiner bundle"):
        ours_refiner("x", num_inference_steps=2)


def test_sdxl_options_on_an_sd_bundle_are_refused(tiny_sd1_bundle):
    with Pipeline.load(tiny_sd1_bundle) as pipe:
        with pytest.raises(InputError, match=r"prompt_2= does not apply to this sd1 bundle .*none"):
            pipe("x", num_inference_steps=2, prompt_2="y")


def test_sdxl_cli_generate_and_bad_option(tiny_sdxl_base, tmp_path):
    from click.testing import CliRunner

    from edgediff.cli import main

    out = tmp_path / "o.png"
    bundle = str(tiny_sdxl_base.bundle)
    r = CliRunner().invoke(main, ["generate", "a cat", "-m", bundle, "-o", str(out), "--steps", "2", "--seed", "0"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["generate", "a cat", "-m", bundle, "-o", str(tmp_path / "p.png"), "--size", "18x16"])
    assert r.exit_code == 2 and "error: width=18 is not a multiple of 4" in r.output


def test_cli_base_and_refiner_equal_the_api_hand_off(tiny_sdxl_base, tiny_sdxl_refiner, ours_base, ours_refiner,
                                                     tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from edgediff.cli import main

    out = tmp_path / "o.png"
    r = CliRunner().invoke(main, ["generate", "a cat", "-m", str(tiny_sdxl_base.bundle), "--refiner",
                                  str(tiny_sdxl_refiner.bundle), "--refiner-start", "0.7", "--prompt-2", "a watercolor",
                                  "--steps", "6", "--seed", "4", "-o", str(out)])
    assert r.exit_code == 0, r.output
    handed = ours_base("a cat", prompt_2="a watercolor", num_inference_steps=6, seed=4, denoising_end=0.7,
                       output_type="latent")
    api = ours_refiner("a cat", num_inference_steps=6, seed=4, image=handed.latents, denoising_start=0.7)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(api.images[0]))
    r = CliRunner().invoke(main, ["generate", "a cat", "-m", str(tiny_sdxl_base.bundle), "--refiner",
                                  str(tiny_sdxl_refiner.bundle), "--refiner-start", "1.5", "-o", str(tmp_path / "p.png")])
    assert r.exit_code == 2 and "denoising_end=1.5; must be a number strictly between 0 and 1" in r.output
    assert not (tmp_path / "p.png").exists()
