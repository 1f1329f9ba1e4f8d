"""Flow-matching schedulers (flow_euler, flow_heun) against diffusers' FlowMatchEulerDiscreteScheduler and
FlowMatchHeunDiscreteScheduler, step by step, fed the same model outputs (and noise), as SD3's and FLUX's pipelines
call them: SD3 with a static shift and no sigmas, FLUX with np.linspace(1, 1/n, n) sigmas and mu from the image's
token count. Tolerance as tests/runtime/test_schedulers.py: relative L2 1e-5 per step, worst element 5e-5.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from edgediff.errors import ConfigError, EdgediffError, InputError
from edgediff.schedulers import DIFFUSERS_EQUIVALENT, SCHEDULERS, make_scheduler, name_for_class
from edgediff.schedulers.config import SchedulerConfig
from edgediff.schedulers.flow_shift import calculate_shift, flux_sigmas, mu_for
from streams import TorchGeneratorNoise, fake_model  # noqa: E402

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL, TOL_MAX = 1e-5, 5e-5
EULER = "FlowMatchEulerDiscreteScheduler"
HEUN = "FlowMatchHeunDiscreteScheduler"
SD3 = dict(_class_name=EULER, num_train_timesteps=1000, shift=3.0)  # stable-diffusion-3-medium's scheduler_config
FLUX_DEV = dict(_class_name=EULER, num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
FLUX_SCHNELL = dict(_class_name=EULER, num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
STEPS = (1, 2, 4, 20, 28, 50)


def rel(a, b) -> float:
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(np.asarray(b).ravel()), 1e-12))


def rel_max(a, b) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def pair(cfg: dict, name: str = "flow_euler"):
    """diffusers' scheduler from ``cfg`` (a scheduler_config.json) and ours from the config diffusers keeps."""
    cls = getattr(diffusers, cfg.get("_class_name", EULER) if name == "flow_euler" else HEUN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = cls.from_config({k: v for k, v in cfg.items() if k != "_class_name"})
        ours = make_scheduler(name, SchedulerConfig.from_dict(dict(ref.config, _class_name=cfg["_class_name"])))
    return ref, ours


def run_in_parity(cfg: dict, steps: int, name: str = "flow_euler", begin: int = 0, noise_seed: int | None = None,
                  **inputs) -> None:
    """Set both schedules with the same inputs, then feed both the same model outputs at every timestep from
    ``begin`` (img2img: after noising the same x0 to it), comparing timesteps, sigmas and every step's sample."""
    ref, ours = pair(cfg, name)
    ref.set_timesteps(steps, **inputs)
    ours.set_timesteps(steps, **inputs)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-6, atol=0, err_msg="timesteps")
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=1e-9, err_msg="sigmas")
    assert len(ours.timesteps) == (2 * steps - 1 if name == "flow_heun" else steps)
    assert ours.init_noise_sigma == 1.0 and ours.order == ref.order
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, 8, 8)).astype(np.float32)
    if begin:  # img2img: x is the clean latent, noised to the begin index as the pipelines do (scale_noise)
        ref.set_begin_index(begin)
        ours.set_begin_index(begin)
        eps = rng.standard_normal(x.shape).astype(np.float32)
        t = ref.timesteps[begin: begin + 1]
        theirs = ref.scale_noise(torch.from_numpy(x), t, torch.from_numpy(eps)).numpy()
        x = ours.add_noise(x, eps, begin)
        assert rel(x, theirs) <= TOL, "add_noise"
    else:
        ref.set_begin_index(0)
    xr = torch.from_numpy(x.copy())
    gen = torch.Generator().manual_seed(noise_seed) if noise_seed is not None else None
    noise = TorchGeneratorNoise(noise_seed) if noise_seed is not None else None
    for i in range(begin, len(ref.timesteps)):
        t = ref.timesteps[i]
        assert np.array_equal(ours.scale_model_input(x, i), x)
        v = fake_model(x, float(t), i)
        x = ours.step(v, i, x, noise)
        xr = ref.step(torch.from_numpy(v), t, xr, generator=gen).prev_sample
        theirs = xr.numpy()
        assert rel(x, theirs) <= TOL and rel_max(x, theirs) <= TOL_MAX, (i, rel(x, theirs), rel_max(x, theirs))
        xr = torch.from_numpy(x.copy())  # both continue from ours: each step is compared, errors do not compound


# -- flow_euler: SD3 ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", (1.0, 3.0))
def test_sd3_static_shift(shift, steps):
    """StableDiffusion3Pipeline: set_timesteps(n), no sigmas, the config's shift (3.0 for SD3/SD3.5)."""
    run_in_parity(dict(SD3, shift=shift), steps)


def test_sd3_timesteps_are_exactly_diffusers():
    """The transformer's timestep input is the float32 sigma * 1000 diffusers feeds, to the bit (the default
    schedule is float64 until the cast, as in diffusers)."""
    for cfg in (SD3, dict(SD3, shift=1.0), FLUX_SCHNELL):
        for n in (1, 7, 28, 50, 1000):
            ref, ours = pair(cfg)
            ref.set_timesteps(n)
            ours.set_timesteps(n)
            np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
            np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())


def test_sd3_dynamic_shifting_uses_the_pipelines_mu():
    """SD3 with use_dynamic_shifting (SD3.5-large-turbo-style configs): the pipeline computes mu from
    (h / patch) * (w / patch) tokens and passes it; no sigmas."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift as sd3_shift

    cfg = dict(SD3, use_dynamic_shifting=True)
    conf = SchedulerConfig.from_dict(cfg)
    for tokens in (256, 4096):
        mu = mu_for(conf, tokens)
        assert mu == sd3_shift(tokens, 256, 4096, 0.5, 1.15)
        run_in_parity(cfg, 28, mu=mu)


# -- flow_euler: FLUX -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("tokens", (256, 1024))  # 256x256 and 512x512 images: 16x16 and 32x32 packed latents
def test_flux_dev_dynamic_shifting_at_two_resolutions(tokens, steps):
    """FluxPipeline: sigmas = np.linspace(1, 1/n, n) and mu = calculate_shift(image_seq_len, ...) from the config."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as flux_shift

    mu = mu_for(SchedulerConfig.from_dict(FLUX_DEV), tokens)
    assert mu == flux_shift(tokens, 256, 4096, 0.5, 1.15) == calculate_shift(tokens)
    assert np.array_equal(flux_sigmas(steps), np.linspace(1.0, 1 / steps, steps))
    run_in_parity(FLUX_DEV, steps, sigmas=flux_sigmas(steps), mu=mu)


def test_the_two_resolutions_give_different_schedules():
    """The test above means something: more tokens, larger mu, more steps spent at high noise."""
    conf = SchedulerConfig.from_dict(FLUX_DEV)
    a, b = make_scheduler("flow_euler", conf), make_scheduler("flow_euler", conf)
    a.set_timesteps(20, mu=mu_for(conf, 256), sigmas=flux_sigmas(20))
    b.set_timesteps(20, mu=mu_for(conf, 1024), sigmas=flux_sigmas(20))
    assert (b.sigmas[1:-1] > a.sigmas[1:-1]).all()


@pytest.mark.parametrize("steps", (1, 4, 50))
def test_flux_schnell_ignores_mu_as_diffusers_does(steps):
    """FluxPipeline passes mu to schnell too; without use_dynamic_shifting it is not used (shift 1.0: the given
    sigmas as they are)."""
    run_in_parity(FLUX_SCHNELL, steps, sigmas=flux_sigmas(steps), mu=calculate_shift(4096))
    ref, ours = pair(FLUX_SCHNELL)
    ours.set_timesteps(steps, sigmas=flux_sigmas(steps), mu=0.3)
    ref.set_timesteps(steps, sigmas=flux_sigmas(steps), mu=5.0)
    np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())


@pytest.mark.parametrize("extra,inputs", [
    (dict(time_shift_type="linear"), "dynamic"),
    (dict(shift_terminal=0.1), "dynamic"),
    (dict(shift_terminal=0.1), "static"),
    (dict(use_karras_sigmas=True), "dynamic"),
    (dict(use_exponential_sigmas=True), "static"),
    (dict(invert_sigmas=True), "static"),
], ids=lambda v: "-".join(f"{k}={w}" for k, w in v.items()) if isinstance(v, dict) else v)
@pytest.mark.parametrize("steps", (1, 4, 30))
def test_euler_options(extra, inputs, steps):
    cfg, kw = (dict(FLUX_DEV, **extra), dict(sigmas=flux_sigmas(steps), mu=calculate_shift(1024))) \
        if inputs == "dynamic" else (dict(SD3, **extra), {})
    if "shift_terminal" in extra and steps == 1:  # the one sigma is 1: diffusers stretches 0/0 into NaN; we refuse
        ref, ours = pair(cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref.set_timesteps(steps, **kw)
        assert np.isnan(ref.sigmas[0].item())
        with pytest.raises(InputError, match=r"^flow_euler: a schedule that ends at sigma 1 \(1 step\) cannot be "
                                             r"stretched to shift_terminal=0.1; run 2 steps or more$"):
            ours.set_timesteps(steps, **kw)
        return
    run_in_parity(cfg, steps, **kw)


@pytest.mark.parametrize("steps", (1, 4, 20))
def test_stochastic_sampling_draws_diffusers_noise(steps):
    """stochastic_sampling re-noises each step, x' = (1 - sigma') x0 + sigma' noise, with the caller's stream."""
    run_in_parity(dict(SD3, stochastic_sampling=True), steps, noise_seed=11)
    ours = make_scheduler("flow_euler", SchedulerConfig.from_dict(dict(SD3, stochastic_sampling=True)))
    ours.set_timesteps(2)
    with pytest.raises(EdgediffError, match="needs a noise source"):
        ours.step(np.zeros((1, 16, 2, 2), np.float32), 0, np.zeros((1, 16, 2, 2), np.float32), None)


# -- flow_heun ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", (1, 2, 4, 20, 50))
@pytest.mark.parametrize("shift", (1.0, 3.0))
def test_heun_two_stage_steps(shift, steps):
    """2n - 1 model calls at diffusers' doubled timesteps, predictor and corrector at the indices diffusers uses."""
    run_in_parity(dict(SD3, shift=shift), steps, name="flow_heun")


def test_heun_is_second_order():
    """Heun is the trapezoidal rule: on dx/dsigma = -x (exact x0 e^{-(sigma - 1)}) its error shrinks ~4x per halving
    of the step (Euler's ~2x) — the corrector does its job, not merely reproduce diffusers."""
    conf = SchedulerConfig.from_dict(dict(SD3, shift=1.0))

    def error(name, n):  # from sigma 1 down to 0 with model output v = -x: the exact x(0) is e^1
        s = make_scheduler(name, conf)
        s.set_timesteps(n)
        x = np.ones((1,), np.float32)
        for i in range(len(s.timesteps)):
            x = s.step(-x, i, x)
        return abs(float(x[0]) - np.e)

    e_heun = [error("flow_heun", n) for n in (8, 16)]
    e_euler = [error("flow_euler", n) for n in (8, 16)]
    assert e_heun[0] / e_heun[1] > 3.0 and e_euler[0] / e_euler[1] < 2.5
    assert e_heun[1] < e_euler[1] / 10


@pytest.mark.parametrize("name", ("flow_euler", "flow_heun"))
@pytest.mark.parametrize("strength", (0.6, 0.35, 1.0))
def test_img2img_begin_index_and_scale_noise(name, strength):
    """SD3/FLUX img2img: t_start = int(n - n * strength) (diffusers' get_timesteps), begin = t_start * order (Heun:
    a predictor step), the clean latents noised with scale_noise at that index, then the remaining steps."""
    steps = 10
    t_start = int(max(steps - min(steps * strength, steps), 0))
    ref, ours = pair(SD3, name)
    assert ours.order == (2 if name == "flow_heun" else 1)
    run_in_parity(SD3, steps, name=name, begin=t_start * ours.order)
    if name == "flow_euler":  # FLUX img2img: sigmas and mu too
        run_in_parity(FLUX_DEV, steps, begin=t_start, sigmas=flux_sigmas(steps), mu=calculate_shift(1024))


def test_heun_corrector_needs_its_predictor():
    s = make_scheduler("flow_heun", SchedulerConfig.from_dict(SD3))
    s.set_timesteps(4)
    x = np.ones((1, 4, 2, 2), np.float32)
    with pytest.raises(EdgediffError, match=r"^flow_heun: step 1 corrects the predictor step 0"):
        s.step(x, 1, x)


# -- the registry, kinds and schedule inputs -------------------------------------------------------------------------
def test_registry_kinds_and_diffusers_classes():
    assert name_for_class(EULER) == "flow_euler" and name_for_class(HEUN) == "flow_heun"
    assert DIFFUSERS_EQUIVALENT["flow_euler"] == (EULER, {}) and DIFFUSERS_EQUIVALENT["flow_heun"] == (HEUN, {})
    assert {n for n, c in SCHEDULERS.items() if c.kind == "flow"} == {"flow_euler", "flow_heun"}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_each_kind_refuses_the_other_kinds_bundle(name):
    """A flow bundle refuses the epsilon/v schedulers, an SD bundle the flow ones: one line naming those that fit."""
    flow_cfg = SchedulerConfig.from_dict(SD3)
    sd_cfg = SchedulerConfig.from_dict(dict(_class_name="PNDMScheduler", beta_schedule="scaled_linear",
                                            beta_start=0.00085, beta_end=0.012, skip_prk_steps=True))
    wrong = sd_cfg if SCHEDULERS[name].kind == "flow" else flow_cfg
    with pytest.raises(ConfigError) as exc:
        make_scheduler(name, wrong)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"scheduler {name!r} cannot run")
    fit = sorted(n for n, c in SCHEDULERS.items() if c.kind != SCHEDULERS[name].kind)
    assert msg.endswith(f"; use one of {fit}")
    make_scheduler(name, flow_cfg if wrong is sd_cfg else sd_cfg).set_timesteps(4)  # its own kind runs


@pytest.mark.parametrize("name", sorted(n for n, c in SCHEDULERS.items() if c.kind == "diffusion"))
def test_diffusion_schedulers_refuse_mu_and_sigmas_by_name(name):
    sched = make_scheduler(name, SchedulerConfig.from_dict(dict(beta_schedule="scaled_linear", steps_offset=1)))
    for kw, what in ((dict(mu=0.5), "mu"), (dict(sigmas=[1.0, 0.5]), "sigmas"), (dict(mu=1.0, sigmas=[1.0]), "mu or sigmas")):
        with pytest.raises(InputError, match=rf"^{name} takes no {what} \(diffusers' \w+ has none\); flow_euler"):
            sched.set_timesteps(2, **kw)
        assert len(sched.timesteps) == 0  # refused before any state changed
    sched.set_timesteps(2, mu=None, sigmas=None)


def test_heun_refuses_what_its_diffusers_twin_lacks():
    heun = make_scheduler("flow_heun", SchedulerConfig.from_dict(SD3))
    with pytest.raises(InputError, match=r"^flow_heun takes no sigmas \(diffusers' FlowMatchHeunDiscreteScheduler"):
        heun.set_timesteps(4, sigmas=flux_sigmas(4))
    with pytest.raises(InputError, match=r"^flow_heun takes no mu"):
        heun.set_timesteps(4, mu=1.0)
    with pytest.raises(ConfigError, match=r"^flow_heun: this model's scheduler shifts by resolution .* use flow_euler"):
        make_scheduler("flow_heun", SchedulerConfig.from_dict(FLUX_DEV))
    with pytest.warns(UserWarning, match=r"flow_heun: ignoring invert_sigmas=True"):
        make_scheduler("flow_heun", SchedulerConfig.from_dict(dict(SD3, invert_sigmas=True)))


@pytest.mark.parametrize("kw,match", [
    (dict(sigmas=[1.0, 0.5]), r"2 sigmas for 4 steps; give one sigma per step"),
    (dict(sigmas=np.ones((2, 2))), r"4 sigmas for 4 steps"),
    (dict(sigmas=[1.0, 0.5, 0.0, 0.25]), r"sigmas must lie in \(0, 1\]"),
    (dict(sigmas=[1.5, 0.5, 0.3, 0.25]), r"sigmas must lie in \(0, 1\]"),
    (dict(sigmas=["a", "b", "c", "d"]), r"sigmas must be a sequence of numbers"),
    (dict(mu=float("nan")), r"mu=nan; expected a finite number"),
    (dict(mu="1.0"), r"mu='1.0'; expected a finite number"),
])
def test_flow_euler_bad_schedule_inputs_are_one_line(kw, match):
    sched = make_scheduler("flow_euler", SchedulerConfig.from_dict(FLUX_SCHNELL))
    with pytest.raises(InputError, match=rf"^flow_euler: {match}"):
        sched.set_timesteps(4, **kw)
    assert len(sched.timesteps) == 0


def test_dynamic_shifting_without_mu_names_what_is_missing():
    sched = make_scheduler("flow_euler", SchedulerConfig.from_dict(FLUX_DEV))
    with pytest.raises(EdgediffError, match=r"use_dynamic_shifting=true, so set_timesteps needs mu="):
        sched.set_timesteps(4, sigmas=flux_sigmas(4))


@pytest.mark.parametrize("name", ("flow_euler", "flow_heun"))
@pytest.mark.parametrize("steps", (1, 2, 999, 1000))
def test_every_count_runs_to_a_finite_result(name, steps):
    sched = make_scheduler(name, SchedulerConfig.from_dict(SD3))
    sched.set_timesteps(steps)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 1, 2, 2)).astype(np.float32)
    for i in range(len(sched.timesteps)):
        x = sched.step(rng.standard_normal(x.shape).astype(np.float32), i, x)
    assert np.isfinite(x).all() and sched.sigmas[-1] == 0
    with pytest.raises(InputError, match=rf"^{name}: num_inference_steps=0; expected an integer from 1 to 1000"):
        sched.set_timesteps(0)


# -- config ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,match", [
    (dict(time_shift_type="cubic"), r"time_shift_type='cubic'; expected one of \['exponential', 'linear'\]"),
    (dict(shift=0), r"shift=0; expected a number > 0"),
    (dict(shift="3"), r"shift='3'; expected a number"),
    (dict(shift_terminal=1.0), r"shift_terminal=1.0; expected a number from 0 to below 1"),
    (dict(base_image_seq_len=0), r"base_image_seq_len=0; expected an integer >= 1"),
    (dict(invert_sigmas="yes"), r"invert_sigmas='yes'; expected true or false"),
    (dict(use_karras_sigmas=True, use_exponential_sigmas=True), r"set at most one"),
    (dict(use_beta_sigmas=True), r"use_beta_sigmas=true is not supported; supported sigma options"),
])
def test_flow_config_bad_values_raise_naming_the_allowed(extra, match):
    with pytest.raises(ConfigError, match=match):
        SchedulerConfig.from_dict(dict(FLUX_DEV, **extra))


def test_equal_seq_lens_cannot_interpolate_mu():
    conf = SchedulerConfig.from_dict(dict(FLUX_DEV, base_image_seq_len=256, max_image_seq_len=256))
    with pytest.raises(ConfigError, match="base_image_seq_len and max_image_seq_len are both 256"):
        mu_for(conf, 1024)


def test_flow_only_options_are_refused_on_a_diffusion_config():
    for key in ("use_dynamic_shifting", "use_exponential_sigmas"):
        with pytest.raises(ConfigError, match=rf"{key}=true is not supported"):
            SchedulerConfig.from_dict({"_class_name": "EulerDiscreteScheduler", key: True})


def test_config_keeps_its_kind_through_a_round_trip():
    conf = SchedulerConfig.from_dict(FLUX_DEV)
    assert conf.kind == "flow" and conf.to_dict()["_class_name"] == EULER
    again = SchedulerConfig.from_dict(conf.to_dict())
    assert again == conf and again.kind == "flow"
    assert SchedulerConfig.from_dict({}).kind == "diffusion"


@pytest.mark.parametrize("cls", ("DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "UniPCMultistepScheduler",
                                 "DDIMScheduler", "PNDMScheduler", "LCMScheduler", EULER, HEUN))
def test_diffusers_own_configs_read_without_warnings(cls):
    """Every key diffusers writes at its default is read silently (the ignored ones included)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = dict(getattr(diffusers, cls)().config)
        SchedulerConfig.from_dict(dict(data, _class_name=cls))


@pytest.mark.parametrize("key,value", [
    ("lambda_min_clipped", -5.1), ("timestep_type", "continuous"), ("sigma_min", 0.03), ("sigma_max", 14.6),
    ("variance_type", "learned_range"), ("solver_p", "DDIMScheduler"),
])
def test_a_non_default_ignored_key_warns(key, value):
    """Found while adding the flow keys: these were dropped silently whatever their value, so a bundle whose config
    sets them sampled another schedule than diffusers' without a word. Now: one warning naming key and value."""
    data = dict(diffusers.DPMSolverMultistepScheduler().config, _class_name="DPMSolverMultistepScheduler")
    with pytest.warns(UserWarning, match=rf"ignoring {key}={value!r}: edgediff's schedulers do not implement it"):
        SchedulerConfig.from_dict(dict(data, **{key: value}))


# -- the one denoising loop --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ("flow_euler", "flow_heun"))
@pytest.mark.parametrize("t_start", (0, 3))
def test_the_denoising_loop_runs_flow_schedulers_as_diffusers_does(name, t_start):
    """runtime/job.py's DenoiseJob, unchanged, with true CFG as SD3 does it: one model call per ``timesteps`` entry
    from the begin index (Heun: 2n - 1 calls at diffusers' doubled timesteps; img2img from t_start * order), the
    same timestep feeds, and the final latents of diffusers' loop."""
    from types import SimpleNamespace

    from edgediff.conditioning import Conditioning
    from edgediff.job import DenoiseJob
    from edgediff.timing import Stopwatch

    def model(x, t):  # rows [uncond; cond] differ, so guidance matters
        rows = np.arange(x.shape[0], dtype=np.float32).reshape(-1, 1, 1, 1)
        return (0.3 * rows + 0.1 * np.tanh(x) + np.float32(np.sin(float(t) / 100.0))).astype(np.float32)

    steps, g = 8, 4.5
    ref, ours = pair(SD3, name)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    begin = t_start * ours.order
    ref.set_begin_index(begin)
    ours.set_begin_index(begin)
    x = np.random.default_rng(3).standard_normal((1, 16, 4, 4)).astype(np.float32)
    job = DenoiseJob(request=SimpleNamespace(guidance_scale=g, noise=None), scheduler=ours,
                     cond=Conditioning(np.zeros((2, 3, 8), np.float32), guided=True), x=x.copy(),
                     end=len(ours.timesteps), watch=Stopwatch(), start_time=0.0)
    ours_calls = []
    while not job.done:
        feeds = job.unet_feeds()
        ours_calls.append(float(feeds["timestep"][0]))
        job.advance(model(feeds["sample"], feeds["timestep"][0]))
    xr, ref_calls = torch.from_numpy(x.copy()), []
    for t in ref.timesteps[begin:]:  # StableDiffusion3Pipeline's loop
        ref_calls.append(float(t))
        u, c = torch.from_numpy(model(torch.cat([xr, xr]).numpy(), float(t))).chunk(2)
        xr = ref.step(u + g * (c - u), t, xr).prev_sample
    assert ours_calls == ref_calls
    assert len(ours_calls) == (2 * (steps - t_start) - 1 if name == "flow_heun" else steps - t_start)
    assert rel(job.x, xr.numpy()) <= TOL
