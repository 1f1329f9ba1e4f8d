"""DeepCache at run time (runtime/deepcache.py): the full UNet every N-th step, the shallow one between.

Reference: diffusers StableDiffusion(XL)Pipeline / StableDiffusionImg2ImgPipeline with the DeepCache package's
``DeepCacheSDHelper`` (``DeepCache==0.1.1``, cache_interval, cache_branch_id) enabled on it, same weights, same
initial latents and noise stream. Tolerance: max abs <= 1e-3 on float images in [0, 1] (the parity tests' bar).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from edgediff import Pipeline
from edgediff.batching import step_together
from edgediff.cli import main
from edgediff.deepcache import DeepCache
from edgediff.errors import InputError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("DeepCache")

from deepcache_fixtures import deepcache_helper  # noqa: E402
from streams import StreamFrom, assert_images_close  # noqa: E402

SD_CLASSES = {"euler": "EulerDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler", "pndm": "PNDMScheduler",
              "ddim": "DDIMScheduler"}


@pytest.fixture(scope="module")
def dc_bundle(tiny_sd1_source, tmp_path_factory):
    from edgediff.export.pipeline_export import export_pipeline

    return export_pipeline(tiny_sd1_source, tmp_path_factory.mktemp("dc") / "b", deepcache="0,4")


@pytest.fixture(scope="module")
def ours(dc_bundle):
    with Pipeline.load(dc_bundle) as p:
        yield p


def reference(source, cls: str, scheduler: str):
    kw = {} if "XL" in cls else dict(safety_checker=None, requires_safety_checker=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = getattr(diffusers, cls).from_pretrained(source, local_files_only=True, **kw)
    extra = {"skip_prk_steps": True} if scheduler == "pndm" else {}
    pipe.scheduler = getattr(diffusers, SD_CLASSES[scheduler]).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def graphs_run(pipe, **kw) -> list[str]:
    """The graph of each step of a call, stepping its job by hand."""
    job = pipe.start(pipe.request(**kw))
    seen = []
    while not job.done:
        seen.append(job.graph())
        job.advance(pipe.run_denoiser(seen[-1], job.unet_feeds()))
    return seen


@pytest.mark.parametrize("scheduler,interval,branch,steps", [
    ("pndm", 3, 0, 7),  # PNDM repeats its second timestep: the helper counts it as the first occurrence
    ("euler", 3, 4, 8),
    ("dpmpp_2m", 2, 0, 6),
    ("ddim", 4, 4, 9),
])
def test_images_match_diffusers_with_the_deepcache_helper(tiny_sd1_source, ours, scheduler, interval, branch, steps):
    ref = reference(tiny_sd1_source, "StableDiffusionPipeline", scheduler)
    latents = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
    with deepcache_helper(ref, interval, branch):
        theirs = ref("a red circle on white", negative_prompt="blurry", num_inference_steps=steps, guidance_scale=7.5,
                     latents=torch.from_numpy(latents), generator=torch.Generator().manual_seed(11),
                     output_type="np").images
    kw = dict(num_inference_steps=steps, guidance_scale=7.5, latents=latents, scheduler=scheduler, rng=StreamFrom(11),
              output_type="np")
    mine = ours("a red circle on white", "blurry", cache_interval=interval, cache_branch=branch, **kw)
    assert_images_close(mine.images, theirs, 1e-3)
    assert (mine.parameters["cache_interval"], mine.parameters["cache_branch"]) == (interval, branch)
    plain = ours("a red circle on white", "blurry", **kw)
    assert np.abs(np.stack(plain.images) - np.stack(mine.images)).max() > 1e-4  # the cache changed the image


def test_img2img_counts_from_the_first_step_run(tiny_sd1_source, ours):
    """img2img starts mid-schedule: the helper's start_timestep is the first call's, so is ours."""
    from PIL import Image

    ref = reference(tiny_sd1_source, "StableDiffusionImg2ImgPipeline", "euler")
    init = Image.fromarray(np.random.default_rng(5).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    with deepcache_helper(ref, 3, 0):
        theirs = ref("a blue square", image=init, strength=0.7, num_inference_steps=10, guidance_scale=6.0,
                     generator=torch.Generator().manual_seed(21), output_type="np").images
    mine = ours("a blue square", image=init, strength=0.7, num_inference_steps=10, guidance_scale=6.0, seed=21,
                rng="torch", scheduler="euler", output_type="np", cache_interval=3)
    assert_images_close(mine.images, theirs, 1e-3)


@pytest.fixture(scope="module")
def sdxl_dc(tmp_path_factory):
    from edgediff.export.pipeline_export import export_pipeline
    from edgediff.export.random_pipeline import build_random_pipeline

    source = build_random_pipeline(tmp_path_factory.mktemp("src") / "tiny-sdxl", "tiny-sdxl", seed=0)
    return source, export_pipeline(source, tmp_path_factory.mktemp("dc") / "xl", deepcache="0,3")


def test_sdxl_images_match_diffusers_with_the_deepcache_helper(sdxl_dc):
    """SDXL's graphs also take the pooled text embedding and the time ids (the added conditioning)."""
    source, bundle = sdxl_dc
    ref = reference(source, "StableDiffusionXLPipeline", "euler")
    latents = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
    kw = dict(negative_prompt="ugly", num_inference_steps=7, guidance_scale=5.0, output_type="np")
    with deepcache_helper(ref, 3, 3):
        theirs = ref("an astronaut riding a horse", latents=torch.from_numpy(latents),
                     generator=torch.Generator().manual_seed(2), **kw).images
    with Pipeline.load(bundle) as xl:
        assert [s.name for s in xl.bundle.component("unet_deepcache_shallow_3").inputs] == [
            "sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids", "deep_feature"]
        mine = xl("an astronaut riding a horse", latents=latents, scheduler="euler", rng=StreamFrom(2),
                  cache_interval=3, cache_branch=3, **kw)
        assert_images_close(mine.images, theirs, 1e-3)
        plain = xl("an astronaut riding a horse", latents=latents, scheduler="euler", rng=StreamFrom(2), **kw)
        assert np.abs(np.stack(plain.images) - np.stack(mine.images)).max() > 1e-4


def test_lcm_images_match_diffusers_with_the_deepcache_helper(tiny_lcm_source, tmp_path_factory):
    """An LCM's graphs also take the guidance embedding (timestep_cond); one unguided batch per step."""
    from edgediff.export.pipeline_export import export_pipeline

    bundle = export_pipeline(tiny_lcm_source, tmp_path_factory.mktemp("dc") / "lcm", deepcache="0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.LatentConsistencyModelPipeline.from_pretrained(
            tiny_lcm_source, local_files_only=True, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)
    prompts = ["a red circle", "a blue square"]
    with deepcache_helper(ref, 3, 0):
        theirs = ref(prompts, num_inference_steps=7, guidance_scale=8.5, latents=torch.from_numpy(latents),
                     generator=torch.Generator().manual_seed(11), output_type="np").images
    with Pipeline.load(bundle) as lcm:
        mine = lcm(prompts, num_inference_steps=7, guidance_scale=8.5, latents=latents, rng=StreamFrom(11),
                   output_type="np", cache_interval=3)
        assert_images_close(mine.images, theirs, 1e-3)
        assert [s.name for s in mine.spans if s.name.startswith("unet")] == (
            ["unet_deepcache_full"] + ["unet_deepcache_shallow_0"] * 2) * 2 + ["unet_deepcache_full"]


def test_schedule_is_full_every_nth_step(ours):
    kw = dict(prompt="x", num_inference_steps=7, seed=0, scheduler="euler")
    full, shallow = "unet_deepcache_full", "unet_deepcache_shallow_4"
    assert graphs_run(ours, cache_interval=3, cache_branch=4, **kw) == [full, shallow, shallow] * 2 + [full]
    assert graphs_run(ours, cache_interval=1, **kw) == ["unet"] * 7
    assert graphs_run(ours, **kw) == ["unet"] * 7
    # PNDM's timesteps repeat the second one (t0, t1, t1, t2, ...): the third call counts as index 1, as the helper's
    pndm = graphs_run(ours, cache_interval=3, **dict(kw, scheduler="pndm"))
    assert pndm[:5] == [full, "unet_deepcache_shallow_0", "unet_deepcache_shallow_0", full,
                        "unet_deepcache_shallow_0"]


def test_interval_1_is_the_plain_path(ours):
    kw = dict(prompt="a green triangle", num_inference_steps=5, seed=4, output_type="np")
    a, b = ours(**kw), ours(cache_interval=1, **kw)
    assert np.array_equal(np.stack(a.images), np.stack(b.images))
    assert "cache_interval" not in b.parameters


def test_full_graph_predicts_what_the_plain_unet_does(ours):
    job = ours.start(ours.request("x", num_inference_steps=3, seed=0))
    feeds = job.unet_feeds()
    plain = ours.run_denoiser("unet", feeds)
    full = ours.run_denoiser("unet_deepcache_full", feeds)
    assert list(full) == ["out_sample", "deep_feature_0", "deep_feature_4"]
    assert np.abs(full["out_sample"] - plain).max() <= 1e-5 * np.abs(plain).max()


def test_jobs_stepped_together_each_keep_their_cache(ours):
    """Several jobs with different intervals/branches (and a plain one) in shared calls: the images of each alone."""
    kws = [dict(prompt="a red circle", seed=0, num_inference_steps=6, cache_interval=3),
           dict(prompt="a blue square", seed=1, num_inference_steps=5, cache_interval=2, cache_branch=4),
           dict(prompt="a green cross", seed=2, num_inference_steps=6, cache_interval=3),
           dict(prompt="a yellow dot", seed=3, num_inference_steps=4)]
    alone = [np.stack(ours(output_type="np", **kw).images) for kw in kws]
    calls = []

    def run(graph, feeds):
        calls.append(graph)
        return ours.run_denoiser(graph, feeds)

    jobs = [ours.start(ours.request(output_type="np", **kw)) for kw in kws]
    while any(not j.done for j in jobs):
        step_together(jobs, run)
    assert all(j.error is None for j in jobs)
    together = [np.stack(ours.finish(j).images) for j in jobs]
    for a, b in zip(alone, together):
        assert np.array_equal(a, b)
    assert len(calls) < sum(kw["num_inference_steps"] for kw in kws)  # the calls were shared
    assert all(isinstance(e, DeepCache) and e.feature is not None for j in jobs[:3] for e in j.extensions
               if isinstance(e, DeepCache))


def test_refusals_are_one_line(ours, tiny_sd1_bundle):
    with Pipeline.load(tiny_sd1_bundle) as plain:
        with pytest.raises(InputError, match=r"no DeepCache graphs; export them with `edgediff export SRC OUT "
                                              r"--deepcache 0`"):
            plain.request("x", cache_interval=3)
        plain.request("x", cache_interval=1)  # interval 1 is the plain UNet: any bundle runs it
    for value in (0, -2, 2.5, True, "3"):
        with pytest.raises(InputError, match="cache_interval=.*whole number >= 1"):
            ours.request("x", cache_interval=value)
    with pytest.raises(InputError, match=r"branch\(es\) 0, 4, not 3; pass one of those"):
        ours.request("x", cache_interval=3, cache_branch=3)
    with pytest.raises(InputError, match="cache_branch=12; must be a whole number from 0 to 11"):
        ours.request("x", cache_interval=3, cache_branch=12)
    with pytest.raises(InputError, match="cache_branch picks DeepCache's cached branch and needs cache_interval"):
        ours.request("x", cache_branch=0)
    with pytest.raises(InputError, match="does not combine with cfg_cutoff"):
        ours.request("x", cache_interval=3, cfg_cutoff=0.5)
    from edgediff.deepcache import check_request

    # what a ControlNet call or hot-swapped LoRAs bring (their own tests build those bundles): refused by name
    with pytest.raises(InputError, match="does not combine with ControlNet"):
        check_request(ours.bundle, 3, None, controlnet=object())
    with pytest.raises(InputError, match="does not combine with LoRAs applied at load.*export --lora"):
        check_request(ours.bundle, 3, 0, loras={"style.safetensors": 0.8})
    assert check_request(ours.bundle, 1, None, controlnet=object(), loras={"a": 1.0}) == (1, 0)  # plain UNet


def test_cli_generate(dc_bundle, tiny_sd1_bundle, tmp_path):
    out = tmp_path / "a.png"
    base = ["generate", "a red circle", "--model", str(dc_bundle), "--steps", "4", "--seed", "1", "-o", str(out)]
    r = CliRunner().invoke(main, base + ["--cache-interval", "0"])
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1].startswith("error: cache_interval=0;"), r.output
    assert not out.exists()
    r = CliRunner().invoke(main, ["generate", "x", "--model", str(tiny_sd1_bundle), "-o", str(out),
                                  "--cache-interval", "3"])
    assert r.exit_code != 0
    assert r.output.strip().splitlines()[-1].endswith("(or run without cache_interval)"), r.output
    r = CliRunner().invoke(main, base + ["--cache-interval", "3", "--cache-branch", "4"])
    assert r.exit_code == 0, r.output
    assert out.is_file()


# -- the paper's non-uniform 1:N schedule (cache_schedule="quadratic") ---------------------------------------------
REFERENCE_PIPELINE = "DeepCache/sd/pipeline_stable_diffusion.py"


@pytest.fixture(scope="module")
def reference_quad_center():
    """``sample_from_quad_center`` of the installed DeepCache==0.1.1. Its module cannot be imported under diffusers
    0.42 (its UNet imports diffusers' removed PositionNet), so the function's own definition is compiled from the
    installed file alone: ast-parsed, that one ``def`` executed with numpy, nothing else of the module run."""
    import ast
    import importlib.util
    from pathlib import Path

    root = Path(importlib.util.find_spec("DeepCache").origin).parent.parent
    tree = ast.parse((root / REFERENCE_PIPELINE).read_text())
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "sample_from_quad_center"]
    namespace = {"np": np}
    exec(compile(ast.Module([fn], type_ignores=[]), str(root / REFERENCE_PIPELINE), "exec"), namespace)

    def full_steps(steps, interval, center, power):  # the reference pipeline's call: num_slow_step = ceil(T / N)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its complex -> int32 cast warns (numpy's ComplexWarning)
            seq, _ = namespace["sample_from_quad_center"](steps, -(-steps // interval), center=center, pow=power)
        return sorted(int(i) for i in seq)

    return full_steps


@pytest.mark.parametrize("steps,interval,center,power", [
    (50, 3, 15, 1.4), (50, 5, 15, 1.4), (50, 2, 20, 1.2), (20, 3, 6, 1.2), (20, 3, 0, 2.0), (20, 3, 19, 3.0),
    (25, 4, 8, 1.6), (9, 3, 2, 1.4), (7, 2, 3, 1.2), (12, 20, 4, 1.2), (100, 10, 30, 1.5)])
def test_quadratic_schedule_is_the_references(reference_quad_center, steps, interval, center, power):
    from edgediff.deepcache import quadratic_full_steps

    mine = list(quadratic_full_steps(steps, interval, center, power))
    assert mine == reference_quad_center(steps, interval, center, power)
    assert len(mine) == -(-steps // interval) and mine[0] == 0  # as many full steps as uniform, the first one full


def test_quadratic_schedule_matches_the_reference_over_a_grid(reference_quad_center):
    """Every (steps <= 40, interval 2..5, centre, power) the reference places, and the same ones refused."""
    from edgediff.deepcache import quadratic_full_steps

    refused = 0
    for steps in range(2, 41):
        for interval in range(2, 6):
            for center in range(steps):
                for power in (1.2, 1.4, 2.0):
                    try:
                        theirs = reference_quad_center(steps, interval, center, power)
                    except ValueError:
                        theirs = None
                    try:
                        mine = list(quadratic_full_steps(steps, interval, center, power))
                    except InputError:
                        mine = None
                    assert mine == theirs, (steps, interval, center, power)
                    refused += theirs is None
    assert refused > 0  # the refusal path was compared too


def test_quadratic_images_match_the_deepcache_helper_on_the_references_schedule(tiny_sd1_source, ours,
                                                                                  reference_quad_center):
    """The reference's caching (DeepCacheSDHelper) made full on the reference pipeline's non-uniform steps
    (``i in interval_seq``, i the loop index) against ours, same latents and noise."""
    from DeepCache import DeepCacheSDHelper

    steps, interval, center, power = 10, 3, 2, 1.4
    seq = reference_quad_center(steps, interval, center, power)
    assert seq != list(range(0, steps, interval))  # a schedule the uniform one is not

    class OnSchedule(DeepCacheSDHelper):
        def is_skip_step(self, block_i, layer_i, blocktype="down"):
            if self.cur_timestep in seq:  # the reference pipeline: prv_features = None on these steps
                return False
            return super().is_skip_step(block_i, layer_i, blocktype)  # skip_mode is not "uniform": cached below

    ref = reference(tiny_sd1_source, "StableDiffusionPipeline", "euler")
    latents = np.random.default_rng(7).standard_normal((1, 4, 8, 8)).astype(np.float32)
    helper = OnSchedule(pipe=ref)
    helper.set_params(cache_interval=interval, cache_branch_id=4, skip_mode="quadratic")
    helper.enable()
    try:
        theirs = ref("a red circle on white", negative_prompt="blurry", num_inference_steps=steps,
                     guidance_scale=7.5, latents=torch.from_numpy(latents), generator=torch.Generator().manual_seed(5),
                     output_type="np").images
    finally:
        helper.disable()
    kw = dict(num_inference_steps=steps, guidance_scale=7.5, latents=latents, scheduler="euler", rng=StreamFrom(5),
              output_type="np", cache_interval=interval, cache_branch=4)
    mine = ours("a red circle on white", "blurry", cache_schedule="quadratic", cache_center=center, cache_pow=power,
                **kw)
    assert_images_close(mine.images, theirs, 1e-3)
    assert {k: mine.parameters[k] for k in ("cache_schedule", "cache_center", "cache_pow")} == dict(
        cache_schedule="quadratic", cache_center=center, cache_pow=power)
    uniform = ours("a red circle on white", "blurry", **kw)
    assert np.abs(np.stack(uniform.images) - np.stack(mine.images)).max() > 1e-4  # the schedule changed the image


def test_quadratic_schedule_runs_its_full_steps(ours):
    from edgediff.deepcache import quadratic_full_steps

    kw = dict(prompt="x", num_inference_steps=20, seed=0, scheduler="euler", cache_interval=3)
    full, shallow = "unet_deepcache_full", "unet_deepcache_shallow_0"
    seq = quadratic_full_steps(20, 3, 6, 1.2)  # the defaults for 20 steps: centre floor(0.3 x 20), power 1.2
    assert seq == (0, 3, 6, 7, 10, 13, 16)
    assert graphs_run(ours, cache_schedule="quadratic", **kw) == [full if i in seq else shallow for i in range(20)]
    ran = graphs_run(ours, cache_schedule="quadratic", cache_center=0, cache_pow=2.0, **kw)
    assert [i for i, g in enumerate(ran) if g == full] == list(quadratic_full_steps(20, 3, 0, 2.0))
    assert ran.count(full) == graphs_run(ours, **kw).count(full) == 7  # as many full calls as the uniform schedule
    # PNDM repeats its second timestep (t0, t1, t1, t2, ...): both calls are step 1 of the schedule
    pndm = graphs_run(ours, cache_schedule="quadratic", cache_center=2, cache_pow=1.4,
                      **dict(kw, num_inference_steps=10, scheduler="pndm"))
    seq = quadratic_full_steps(10, 3, 2, 1.4)
    step_of_call = [0, 1, 1, *range(2, 10)]
    assert pndm == [full if step_of_call[c] in seq else shallow for c in range(11)]


def test_uniform_schedule_is_the_default_path(ours):
    kw = dict(prompt="a green triangle", num_inference_steps=7, seed=4, output_type="np", cache_interval=3)
    a, b = ours(**kw), ours(cache_schedule="uniform", **kw)
    assert np.array_equal(np.stack(a.images), np.stack(b.images))
    assert not any(k in b.parameters for k in ("cache_schedule", "cache_center", "cache_pow"))
    req = ours.request(**{k: v for k, v in kw.items() if k != "output_type"})
    assert (req.cache_schedule, req.cache_center, req.cache_pow) == ("uniform", None, None)
    # interval 1 is the plain UNet whatever the schedule: no extension, no record
    c = ours(**dict(kw, cache_interval=1, cache_schedule="quadratic"))
    assert "cache_schedule" not in c.parameters


def test_quadratic_refusals_are_one_line(ours):
    with pytest.raises(InputError, match=r"^cache_schedule='poisson'; expected one of uniform, quadratic$"):
        ours.request("x", cache_interval=3, cache_schedule="poisson")
    with pytest.raises(InputError, match=r"^cache_center=20; must be a step from 0 to 19"):
        ours.request("x", num_inference_steps=20, cache_interval=3, cache_schedule="quadratic", cache_center=20)
    for bad in (-1, 2.5, True):
        with pytest.raises(InputError, match=r"^cache_center=.*must be a step from 0 to 9"):
            ours.request("x", num_inference_steps=10, cache_interval=3, cache_schedule="quadratic", cache_center=bad)
    for bad in (1, 1.0, 0.5, float("nan"), "2", True):
        with pytest.raises(InputError, match=r"^cache_pow=.*must be a number > 1"):
            ours.request("x", cache_interval=3, cache_schedule="quadratic", cache_pow=bad)
    for given in (dict(cache_schedule="quadratic"), dict(cache_center=3), dict(cache_pow=1.4)):
        with pytest.raises(InputError, match=r"shapes DeepCache's schedule and needs cache_interval N"):
            ours.request("x", **given)
    with pytest.raises(InputError, match=r"^cache_center and cache_pow place the full steps of "
                                         r"cache_schedule='quadratic'"):
        ours.request("x", cache_interval=3, cache_center=3)
    # a centre the power law cannot spread the full steps around (the reference raises there too)
    with pytest.raises(InputError, match=r"no power in \(1, 1.2\] spaces 3 distinct full steps \(rounding merges "
                                         r"two\); try another cache_center or cache_pow$"):
        ours.request("x", num_inference_steps=6, cache_interval=2, cache_schedule="quadratic", cache_center=3)


def test_cli_generate_quadratic(dc_bundle, tmp_path):
    out = tmp_path / "a.png"
    base = ["generate", "a red circle", "--model", str(dc_bundle), "--steps", "6", "--seed", "1", "-o", str(out),
            "--cache-interval", "2"]
    r = CliRunner().invoke(main, base + ["--cache-schedule", "poisson"])
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1] == (
        "error: cache_schedule='poisson'; expected one of uniform, quadratic"), r.output
    r = CliRunner().invoke(main, base + ["--cache-schedule", "quadratic", "--cache-pow", "1"])
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1].startswith("error: cache_pow=1.0; must be"), r.output
    assert not out.exists()
    r = CliRunner().invoke(main, base + ["--cache-schedule", "quadratic", "--cache-center", "2", "--cache-pow", "1.4"])
    assert r.exit_code == 0, r.output
    assert out.is_file()
