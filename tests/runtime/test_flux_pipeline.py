"""Whole FLUX.1 pipelines against diffusers: tiny random schnell and dev (tests/sdxl_fixtures.py), exported and run by
edgediff with the same initial latents and noise as diffusers' FluxPipeline / FluxImg2ImgPipeline (installed
version). diffusers is given the packed form of the (B, C, h, w) latents edgediff gets (FluxPipeline._pack_latents:
what its prepare_latents does with its own draw). Tolerance: max abs <= 1e-3 on float images in [0, 1] (far inside
the 2/255 bar), and uint8 images within 2/255. Plus: no torch during generation, and one-line refusals (API, CLI)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from edgediff import Pipeline
from edgediff.errors import InputError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from no_torch import assert_generates_without_torch  # noqa: E402
from streams import StreamFrom, assert_images_close  # noqa: E402

TOL = 1e-3
PROMPTS = ["a red circle on white", "an astronaut riding a horse"]


def reference(source, cls: str = "FluxPipeline"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = getattr(diffusers, cls).from_pretrained(source, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compare(ours, theirs) -> None:
    assert_images_close(ours, theirs, TOL)
    assert np.abs(np.round(np.stack(ours) * 255) - np.round(np.asarray(theirs) * 255)).max() <= 2  # 2/255 as uint8


def packed(latents: np.ndarray) -> "torch.Tensor":
    b, c, h, w = latents.shape
    return diffusers.FluxPipeline._pack_latents(torch.from_numpy(latents), b, c, h, w)


def latents(n: int, height: int, width: int, seed: int = 3) -> np.ndarray:
    """(n, 4, H/2, W/2) float32: the tiny VAE downsamples by 2."""
    return np.random.default_rng(seed).standard_normal((n, 4, height // 2, width // 2)).astype(np.float32)


@pytest.fixture(scope="module")
def schnell(tiny_flux_schnell):
    return Pipeline.load(tiny_flux_schnell.bundle)


@pytest.fixture(scope="module")
def dev(tiny_flux_dev):
    return Pipeline.load(tiny_flux_dev.bundle)


@pytest.mark.parametrize("steps,length,size", [(1, 256, (32, 32)), (4, 16, (32, 48))])
def test_schnell_txt2img_matches_diffusers(tiny_flux_schnell, schnell, steps, length, size):
    h, w = size
    x = latents(2, h, w)
    theirs = reference(tiny_flux_schnell.source)(PROMPTS, num_inference_steps=steps, height=h, width=w,
                                                  latents=packed(x), max_sequence_length=length,
                                                  output_type="np").images
    mine = schnell(PROMPTS, num_inference_steps=steps, height=h, width=w, latents=x, max_sequence_length=length,
                   output_type="np")
    compare(mine.images, theirs)
    assert mine.parameters["scheduler"] == "flow_euler"


@pytest.mark.parametrize("guidance,size", [(3.5, (32, 32)), (1.0, (64, 48)), (7.0, (128, 128))])
def test_dev_txt2img_matches_diffusers(tiny_flux_dev, dev, guidance, size):
    """dev: the guidance input, and dynamic shifting with mu from the image's token count (64, 192, 1024 tokens
    at these sizes: three different schedules)."""
    h, w = size
    x = latents(2, h, w, seed=4)
    theirs = reference(tiny_flux_dev.source)(PROMPTS, num_inference_steps=3, guidance_scale=guidance, height=h,
                                             width=w, latents=packed(x), max_sequence_length=32,
                                             output_type="np").images
    mine = dev(PROMPTS, num_inference_steps=3, guidance_scale=guidance, height=h, width=w, latents=x,
               max_sequence_length=32, output_type="np")
    compare(mine.images, theirs)


def test_guidance_input_changes_the_dev_image(dev):
    x = latents(1, 32, 32)
    a, b = (dev(PROMPTS[0], num_inference_steps=2, guidance_scale=g, height=32, width=32, latents=x,
                max_sequence_length=16, output_type="np").images[0] for g in (1.0, 6.0))
    assert np.abs(a - b).max() > 1e-3


def test_prompt_2_images_per_prompt_and_default_length_match_diffusers(tiny_flux_dev, dev):
    """prompt_2 goes to T5 alone (one string applies to every prompt; diffusers wants one per prompt); two images
    per prompt (prompt-major); dev's default max_sequence_length is FluxPipeline's 512."""
    x = latents(4, 32, 32, seed=6)
    theirs = reference(tiny_flux_dev.source)(PROMPTS, prompt_2=["a watercolor"] * 2, num_images_per_prompt=2,
                                             num_inference_steps=2, height=32, width=32, latents=packed(x),
                                             output_type="np").images
    mine = dev(PROMPTS, prompt_2="a watercolor", num_images_per_prompt=2, num_inference_steps=2, height=32,
               width=32, latents=x, output_type="np")
    compare(mine.images, theirs)
    plain = dev(PROMPTS, num_images_per_prompt=2, num_inference_steps=2, height=32, width=32, latents=x,
                output_type="np")
    assert np.abs(np.stack(plain.images) - np.stack(mine.images)).max() > 1e-3  # prompt_2 changed the images


def test_seeded_noise_matches_diffusers_generator(tiny_flux_schnell, schnell):
    """rng='torch' draws the (1, 4, h, w) latents diffusers' prepare_latents draws (then packs) from its generator."""
    theirs = reference(tiny_flux_schnell.source)(PROMPTS[0], num_inference_steps=2, height=32, width=32,
                                                  generator=torch.Generator().manual_seed(7), max_sequence_length=32,
                                                  output_type="np").images
    mine = schnell(PROMPTS[0], num_inference_steps=2, height=32, width=32, seed=7, rng="torch",
                   max_sequence_length=32, output_type="np")
    compare(mine.images, theirs)


@pytest.mark.parametrize("variant,strength,steps", [("schnell", 0.6, 4), ("dev", 0.75, 5)])
def test_img2img_matches_diffusers(request, variant, strength, steps):
    from PIL import Image

    built = request.getfixturevalue(f"tiny_flux_{variant}")
    pipe = request.getfixturevalue(variant)
    init = Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    kw = dict(guidance_scale=4.0) if variant == "dev" else {}
    theirs = reference(built.source, "FluxImg2ImgPipeline")(
        PROMPTS[0], image=init, strength=strength, num_inference_steps=steps, height=32, width=48,
        generator=torch.Generator().manual_seed(11), max_sequence_length=32, output_type="np", **kw).images
    mine = pipe(PROMPTS[0], image=init, strength=strength, num_inference_steps=steps, rng=StreamFrom(11),
                max_sequence_length=32, output_type="np", **kw)
    compare(mine.images, theirs)


def test_img2img_default_strength_is_flux_img2img_pipelines(tiny_flux_schnell, schnell):
    """No strength given: FluxImg2ImgPipeline's default 0.6 (SD's img2img pipelines use 0.8)."""
    from PIL import Image

    init = Image.fromarray(np.random.default_rng(8).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    theirs = reference(tiny_flux_schnell.source, "FluxImg2ImgPipeline")(
        PROMPTS[1], image=init, num_inference_steps=5, height=32, width=32, generator=torch.Generator().manual_seed(2),
        max_sequence_length=16, output_type="np").images
    mine = schnell(PROMPTS[1], image=init, num_inference_steps=5, rng=StreamFrom(2), max_sequence_length=16,
                   output_type="np")
    compare(mine.images, theirs)
    assert mine.parameters["strength"] == 0.6


def test_generation_never_imports_torch(tiny_flux_dev, tmp_path):
    assert_generates_without_torch(tiny_flux_dev.bundle, tmp_path / "x.png", num_inference_steps=2, height=32, width=32,
                                   seed=0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(guidance_scale=3.5), r"guidance_scale=3.5 does not apply to FLUX.1-schnell: its transformer has no "
                               r"guidance input \(diffusers' FluxPipeline ignores the value\)"),
    (dict(max_sequence_length=513), r"max_sequence_length=513 is over this bundle's limit 512"),
    (dict(max_sequence_length=0), r"max_sequence_length=0; expected a positive integer"),
    (dict(height=30, width=32), r"multiple"),
    (dict(negative_prompt="blurry"), r"negative_prompt does not apply to this flux bundle"),
    (dict(true_cfg_scale=4.0), r"true_cfg_scale=4.0: FluxPipeline's second, negative-prompt pass is not supported"),
    (dict(prompt_3="x"), r"prompt_3= does not apply to this flux bundle"),
    (dict(prompt_2=["a", "b", "c"]), r"prompt_2 has 3 entries for 2 prompts"),
])
def test_bad_input_is_one_line_before_any_work(schnell, kwargs, message):
    with pytest.raises(InputError, match=message) as info:
        req = schnell.request(PROMPTS, **kwargs)
        schnell.generate(req)  # prompt_2's count is checked with the prompts it pairs with
    assert "\n" not in str(info.value)


def test_size_multiple_counts_the_2x2_packing(schnell):
    """Sides must be multiples of the VAE factor x 2 for the 2x2 packing (16 for FLUX's 8x VAE; 4 for the tiny
    2x one), though the transformer's patch_size is 1; the refusal names the multiple and the nearest sizes."""
    assert schnell.size_multiple == 4
    with pytest.raises(InputError, match=r"height=34 is not a multiple of 4 \(this model's latent grid\); "
                                         r"try 32 or 36"):
        schnell.request("x", height=34, width=32)


def test_bundle_limit_and_dev_guidance_are_honoured(tiny_flux_dev, tmp_path):
    """A bundle exported with --max-sequence-length 64 refuses more and defaults to it; dev takes guidance."""
    from edgediff.export.pipeline_export import export_pipeline

    short = Pipeline.load(export_pipeline(tiny_flux_dev.source, tmp_path / "short", max_sequence_length=64))
    assert short.request("x", guidance_scale=2.0).extra["max_sequence_length"] == 64
    with pytest.raises(InputError, match=r"over this bundle's limit 64; lower it \(re-export with edgediff export "
                                         r"--max-sequence-length 100\)"):
        short.request("x", max_sequence_length=100)


def test_cli_refuses_guidance_on_schnell_in_one_line(tiny_flux_schnell, tmp_path):
    from edgediff.cli import main

    r = CliRunner().invoke(main, ["generate", "a cat", "-m", str(tiny_flux_schnell.bundle), "--guidance", "3.5",
                                  "--size", "32x32", "-o", str(tmp_path / "x.png")])
    assert r.exit_code != 0 and r.exit_code != 70, r.output
    assert "does not apply to FLUX.1-schnell" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()
    r = CliRunner().invoke(main, ["generate", "a cat", "-m", str(tiny_flux_schnell.bundle), "--max-sequence-length",
                                  "600", "--size", "32x32", "-o", str(tmp_path / "x.png")])
    assert r.exit_code not in (0, 70) and "over this bundle's limit 512" in r.output, r.output
    r = CliRunner().invoke(main, ["generate", "a cat", "-m", str(tiny_flux_schnell.bundle), "--steps", "2",
                                  "--size", "32x32", "--prompt-2", "a dog", "-o", str(tmp_path / "x.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "x.png").is_file()


def test_step_level_batching_gives_each_request_its_own_image(dev):
    """The ids live in the graph, so every feed is one row per image: requests with different prompts, guidance
    inputs, seeds and step counts share denoiser calls (runtime/batching.py) and get the images they get alone."""
    from edgediff.batching import step_together

    kws = [dict(prompt="a red circle", seed=0, num_inference_steps=3, guidance_scale=2.0),
           dict(prompt=["a blue square", "a cat"], seed=1, num_inference_steps=2, guidance_scale=5.0),
           dict(prompt="a green triangle", seed=2, num_inference_steps=4, guidance_scale=3.5)]
    common = dict(height=32, width=32, max_sequence_length=16, output_type="np")
    alone = [np.stack(dev(**kw, **common).images) for kw in kws]
    rows = []

    def run(graph, feeds):
        rows.append(feeds["sample"].shape[0])
        return dev.run_denoiser(graph, feeds)

    jobs = [dev.start(dev.request(**kw, **common)) for kw in kws]
    while any(not j.done for j in jobs):
        step_together(jobs, run)
    together = [np.stack(dev.finish(j).images) for j in jobs]
    assert max(rows) == 4 and len(rows) == 4  # 4 shared calls (the longest job's steps), 4 rows at most
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_memory_check_counts_packed_tokens(schnell, monkeypatch):
    """The activation estimate's attention is over FLUX's packed tokens (one per 2x2 latent cells): at 128x128 the
    tiny model has 32x32 = 1024 of them (2 heads: 8 MiB of attention), not 64x64 (128 MiB). With 64 MiB free the
    call is taken; at 256x256 (4096 tokens: 128 MiB of attention) it is refused in one line before any work."""
    from edgediff import validation

    monkeypatch.setattr(validation, "available_memory", lambda: 64 << 20)
    schnell.request("x", height=128, width=128)
    with pytest.raises(InputError, match=r"256x256 with batch 1 needs about 0\.2 GiB for the denoiser's "
                                         r"activations; 0\.1 GiB is available"):
        schnell.request("x", height=256, width=256)


def test_server_engine_warms_up_on_schnell(schnell):
    """The server's warm-up asks for guidance only where it is classifier-free: a schnell bundle (which refuses
    any guidance_scale) serves."""
    from edgediff.serve.engine import Engine, EngineConfig

    engine = Engine("flux", schnell, EngineConfig(warmup=True)).start()
    assert engine.ready.wait(120)
    assert engine.failure is None and engine.alive
    engine.shutdown(0)
    assert engine.join(30)


def test_schedulers_flux_cannot_run_are_refused_by_name(schnell):
    """FluxPipeline passes sigmas and mu to set_timesteps: diffusers' FlowMatchHeunDiscreteScheduler takes neither
    (FluxPipeline raises with it too), and SD's schedulers are the other kind."""
    from edgediff.errors import ConfigError

    with pytest.raises(InputError, match=r"flow_heun takes no mu or sigmas"):
        schnell.request("x", scheduler="flow_heun")
    with pytest.raises(ConfigError, match=r"scheduler 'euler' cannot run a flow-matching model's schedule"):
        schnell.request("x", scheduler="euler")


def test_variant_config_and_graph_must_agree(tiny_flux_schnell, tmp_path):
    """The variant is the transformer config's guidance_embeds; a graph without the guidance input under a dev
    config (an edited or mixed-up bundle) is refused at load in one line, not run without its guidance."""
    import dataclasses
    import json
    import shutil

    from edgediff.bundle.checksums import sha256_file
    from edgediff.bundle.manifest import FileEntry
    from edgediff.bundle.reader import Bundle
    from edgediff.bundle.writer import write_manifest
    from edgediff.errors import BundleError

    dst = tmp_path / "mixed"
    shutil.copytree(tiny_flux_schnell.bundle, dst)
    rel = "transformer/config.json"
    cfg = json.loads((dst / rel).read_text())
    (dst / rel).write_text(json.dumps(dict(cfg, guidance_embeds=True)))
    m = Bundle.open(tiny_flux_schnell.bundle).manifest
    pinned = FileEntry(rel, (dst / rel).stat().st_size, sha256_file(dst / rel, fresh=True))
    write_manifest(dst, dataclasses.replace(m, files=tuple(pinned if f.path == rel else f for f in m.files)))
    with pytest.raises(BundleError, match=r"guidance_embeds=True but the graph lacks a 'guidance' input; re-export"):
        Pipeline.load(dst)


def test_schnell_takes_its_model_cards_guidance_zero_as_none(schnell):
    """FLUX.1-schnell's model card calls FluxPipeline with guidance_scale=0.0, and its bundle records 0 as the default
    (so a bench or server passing the bundle's default is not refused); any other value is."""
    assert schnell.bundle.default_guidance == 0.0
    kw = dict(num_inference_steps=2, height=32, width=32, seed=3)
    plain = np.asarray(schnell("a red circle", **kw).images[0])
    assert np.array_equal(np.asarray(schnell("a red circle", guidance_scale=0.0, **kw).images[0]), plain)
    with pytest.raises(InputError, match="guidance_scale=1.0 does not apply to FLUX.1-schnell"):
        schnell.request("a red circle", guidance_scale=1.0)
