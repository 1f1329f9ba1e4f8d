"""Scheduler parity with diffusers' torch schedulers, step by step.

Reference: diffusers (the installed version, 0.42.x when written), same config, same model outputs, same noise.
Tolerance, at every step (fp32): relative L2 error ||ours - theirs|| / ||theirs|| <= 1e-5, and the worst element
within 5e-5 of the largest |theirs|. Why not exact: torch's float32 sqrt/pow on x86 CPUs are not correctly rounded
(~20% of results differ by an ulp from IEEE sqrt), which numpy cannot reproduce; 50 steps accumulate that to ~1e-5.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from edgediff.errors import ConfigError, InputError
from edgediff.schedulers import DIFFUSERS_EQUIVALENT, SCHEDULERS, make_scheduler, name_for_class
from edgediff.schedulers.config import SchedulerConfig
from streams import TorchGeneratorNoise, fake_model  # noqa: E402

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          steps_offset=1, set_alpha_to_one=False, clip_sample=False)
TOL = 1e-5  # relative L2
TOL_MAX = 5e-5  # worst element, relative to the largest reference value

CLASSES = {
    "pndm": ("PNDMScheduler", dict(skip_prk_steps=True)),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True)),
    "lcm": ("LCMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}

# (name, extra config) pairs: every option that applies to each scheduler
VARIANTS = [
    *[(n, {}) for n in CLASSES],
    *[(n, dict(prediction_type="v_prediction")) for n in CLASSES],
    *[(n, dict(prediction_type="sample")) for n in ("ddim", "euler", "dpmpp_2m", "lcm", "unipc")],
    *[(n, dict(timestep_spacing=s)) for n in ("pndm", "ddim", "euler", "euler_a", "dpmpp_2m", "unipc") for s in ("leading", "trailing", "linspace")],
    *[(n, dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)) for n in ("ddim", "euler", "dpmpp_2m", "unipc")],
    *[(n, dict(beta_schedule="squaredcos_cap_v2")) for n in ("ddim", "euler_a", "dpmpp_2m", "unipc")],
    ("ddim", dict(set_alpha_to_one=True)), ("pndm", dict(set_alpha_to_one=True)),
    ("ddim", dict(clip_sample=True)), ("lcm", dict(clip_sample=True)),
    ("ddim", dict(steps_offset=0)),
    ("euler", dict(use_karras_sigmas=True)), ("unipc", dict(use_karras_sigmas=True)),
    ("euler", dict(final_sigmas_type="sigma_min")), ("dpmpp_2m", dict(final_sigmas_type="sigma_min")),
    ("unipc", dict(final_sigmas_type="sigma_min")),
    ("dpmpp_2m", dict(lower_order_final=False)), ("dpmpp_2m", dict(euler_at_final=True)),
    ("ddim", dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")),
    *[(n, dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"))
      for n in ("euler", "euler_a", "dpmpp_2m", "unipc", "lcm")],  # the built-in model's schedule (Lin et al.)
    ("unipc", dict(solver_type="bh1")), ("unipc", dict(disable_corrector=[0, 1])),
    ("lcm", dict(original_inference_steps=100, timestep_scaling=5.0)),
]
STEPS = (1, 2, 4, 20, 50)


def reference(name: str, extra: dict):
    cls_name, defaults = CLASSES[name]
    cls = getattr(diffusers, cls_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_config({**SD, **defaults, **extra})


def ours_from(ref, name):
    return make_scheduler(name, SchedulerConfig.from_dict(dict(ref.config)))


def rel(a, b) -> float:
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(np.asarray(b).ravel()), 1e-12))


def rel_max(a, b) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def run_in_parity(name: str, extra: dict, steps: int, tol: float = TOL, tol_max: float = TOL_MAX) -> None:
    """Ours and diffusers' from the same config, fed the same model outputs and noise, compared at every step."""
    ref = reference(name, extra)
    ours = ours_from(ref, name)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    if hasattr(ref, "set_begin_index"):
        # step i is index i, as our loop has it: diffusers otherwise looks the first timestep up, and picks the
        # second of two equal ones (Karras timesteps round alike near 1000 steps), running off the schedule's end
        ref.set_begin_index(0)
    # integer timesteps exactly; Karras-derived continuous ones (Euler) to float32 rounding
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-6, atol=0, err_msg="timesteps")
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, 4, 8, 8)).astype(np.float32) * ours.init_noise_sigma).astype(np.float32)
    xr = torch.from_numpy(x.copy())
    gen = torch.Generator().manual_seed(7)
    noise = TorchGeneratorNoise(7)
    for i, t in enumerate(ref.timesteps):
        a_in = ours.scale_model_input(x, i)
        b_in = ref.scale_model_input(xr, t).numpy()
        assert rel(a_in, b_in) <= tol, f"scale_model_input at step {i}"
        eps = fake_model(b_in, float(t), i)
        kwargs = {"generator": gen} if name in ("euler_a", "lcm") else {}
        xr = ref.step(torch.from_numpy(eps), t, xr, **kwargs).prev_sample
        x = ours.step(eps, i, x, noise)
        if not torch.isfinite(xr).all():
            # diffusers itself produces NaN in two corners: UniPC bh1 (0 * inf at the zero-sigma last step) and
            # float32 overflow of sigma^2 * sigma^2 in Euler ancestral at the cosine schedule's sigma_max ~ 2e4
            assert (name, extra) in ((("unipc", {"solver_type": "bh1"})), ("euler_a", {"beta_schedule": "squaredcos_cap_v2"})), i
            break
        err, worst = rel(x, xr.numpy()), rel_max(x, xr.numpy())
        where = np.unravel_index(np.argmax(np.abs(x - xr.numpy())), x.shape)
        assert err <= tol and worst <= tol_max, f"{name} {extra} step {i}/{steps}: rel L2 {err:.2e}, worst element {worst:.2e} at {where}"


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name,extra", VARIANTS, ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={v[k]}" for k in v) or "default")
def test_step_parity(name, extra, steps):
    if name == "lcm" and steps > extra.get("original_inference_steps", 50):
        pytest.skip("LCM allows at most original_inference_steps")
    # zero-SNR Euler starts at sigma_max = sqrt(2^24 - 1), which torch's inexact float32 sqrt rounds to 4096.0
    # and IEEE sqrt to 4095.9998: a 5e-8 difference that the first, 4096 -> 1.8 step turns into ~1e-4. Euler
    # ancestral starts at the same sigma (measured 6.6e-5 at its first step with an AVX2-only AMD EPYC's torch).
    loose = name in ("euler", "euler_a") and extra.get("rescale_betas_zero_snr")
    run_in_parity(name, extra, steps, *((2e-4, 4e-4) if loose else (TOL, TOL_MAX)))


ZERO_SNR = dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
HIGH_COUNTS = [(n, dict(timestep_spacing=s)) for n in CLASSES for s in ("leading", "trailing", "linspace")]
HIGH_COUNTS += [(n, ZERO_SNR) for n in CLASSES if n != "pndm"]  # pndm refuses zero SNR (test below)
# UniPC's weights b_k = h phi_k(h) / B(h) cancel to ~1e-2 in float32 at h ~ 5e-3 (1000 steps) — in diffusers as here;
# the 1-ulp sigma differences from torch's inexact float32 sqrt then move them apart by ~1e-4 of the image.
UNIPC_HIGH_TOL = (5e-4, 5e-4)
# zero SNR at 999-1000 steps: those 1-ulp sigma differences, carried over a thousand steps, reach 1.0e-5 to 2.0e-5
# (Euler ancestral, DPM++ 2M; different runs) with an AVX2-only AMD EPYC's torch; within 1e-5 on an AVX-512 Xeon
ZERO_SNR_HIGH_TOL = (5e-5, 1e-4)


def diffusers_fails(name: str, extra: dict, steps: int) -> bool:
    """True if diffusers raises or ends non-finite at this count (with begin index 0, as our loop runs)."""
    ref = reference(name, extra)
    gen = torch.Generator().manual_seed(7)
    try:
        ref.set_timesteps(steps)
        if hasattr(ref, "set_begin_index"):
            ref.set_begin_index(0)
        x = torch.ones((1, 1, 2, 2)) * float(ref.init_noise_sigma)
        for i, t in enumerate(ref.timesteps):
            eps = torch.from_numpy(fake_model(ref.scale_model_input(x, t).numpy(), float(t), i))
            x = ref.step(eps, t, x, **({"generator": gen} if name in ("euler_a", "lcm") else {})).prev_sample
    except Exception:  # IndexError, ValueError, AssertionError: whatever it fails with
        return True
    return not bool(torch.isfinite(x).all())


@pytest.mark.parametrize("steps", (999, 1000))
@pytest.mark.parametrize("name,extra", HIGH_COUNTS, ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={v[k]}" for k in v))
def test_high_step_counts_match_diffusers_or_refuse_where_it_fails(name, extra, steps):
    """The CLI accepts up to num_train_timesteps steps. Each scheduler runs there in step with diffusers, or refuses
    with an InputError exactly where diffusers raises or ends in NaN (1000 steps of PNDM/DDIM with SD's "leading"
    spacing once raised IndexError; DPM++ 2M / UniPC ended in NaN at 999-1000 steps)."""
    try:
        ours_from(reference(name, extra), name).set_timesteps(steps)
    except InputError as exc:
        assert diffusers_fails(name, extra, steps), f"refused {steps} steps that diffusers runs: {exc}"
        return
    tol = UNIPC_HIGH_TOL if name == "unipc" else ZERO_SNR_HIGH_TOL if extra == ZERO_SNR else (TOL, TOL_MAX)
    run_in_parity(name, extra, steps, *tol)


@pytest.mark.parametrize("name", ("ddim", "euler", "dpmpp_2m", "unipc"))
def test_trailing_spacing_gives_exactly_the_steps_asked(name):
    """np.arange(T, 0, -T/n) has n + 1 points for some n (61, 103, ... of 1000): diffusers then runs an extra step at
    timestep -1. Ours runs the n steps asked, diffusers' first n timesteps."""
    for steps in (61, 103, 122, 998):
        ref = reference(name, dict(timestep_spacing="trailing"))
        ours = ours_from(ref, name)
        ref.set_timesteps(steps)
        ours.set_timesteps(steps)
        assert len(ref.timesteps) == steps + 1 and int(ref.timesteps[-1]) == -1  # the diffusers quirk this covers
        assert len(ours.timesteps) == steps
        np.testing.assert_array_equal(ours.timesteps, ref.timesteps[:steps].numpy())


def test_registry_names_each_schedulers_diffusers_equivalent():
    """The registry derives DIFFUSERS_EQUIVALENT (bench --compare diffusers) from the classes: it is what this file checks."""
    assert {n: v for n, v in DIFFUSERS_EQUIVALENT.items() if SCHEDULERS[n].kind == "diffusion"} == CLASSES
    assert {name_for_class(cls) for cls, _ in CLASSES.values()} == set(CLASSES) - {"dpmpp_2m_karras"}


@pytest.mark.parametrize("name", sorted(CLASSES))  # the flow schedulers': test_flow_schedulers.py
def test_add_noise_and_img2img_begin(name):
    ref = reference(name, {})
    ours = ours_from(ref, name)
    ref.set_timesteps(20)
    ours.set_timesteps(20)
    begin = 8 * ours.order
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(begin)
    ours.set_begin_index(begin)
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    eps = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    t = ref.timesteps[begin: begin + 1]
    theirs = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), t).numpy()
    assert rel(ours.add_noise(x0, eps, begin), theirs) <= TOL


def test_config_round_trip_and_same_output():
    cfg = SchedulerConfig.from_dict({**SD, "prediction_type": "v_prediction"})
    again = SchedulerConfig.from_dict(cfg.to_dict())
    assert again == cfg
    a, b = make_scheduler("dpmpp_2m", cfg), make_scheduler("dpmpp_2m", again)
    a.set_timesteps(10)
    b.set_timesteps(10)
    x = np.ones((1, 4, 4, 4), np.float32)
    for i in range(10):
        e = fake_model(x, float(a.timesteps[i]), i)
        assert np.array_equal(a.step(e, i, x), b.step(e, i, x))


def test_unknown_key_warns_and_bad_values_raise():
    with pytest.warns(UserWarning, match="brand_new_option"):
        SchedulerConfig.from_dict({**SD, "brand_new_option": 1})
    with pytest.raises(ConfigError, match=r"timestep_spacing='sideways'; expected one of \['leading', 'trailing', 'linspace'\]"):
        SchedulerConfig.from_dict({**SD, "timestep_spacing": "sideways"})
    with pytest.raises(ConfigError, match="beta_schedule"):
        SchedulerConfig.from_dict({**SD, "beta_schedule": "cubic"})
    with pytest.raises(ConfigError, match="prediction_type"):
        SchedulerConfig.from_dict({**SD, "prediction_type": "noise"})
    with pytest.raises(ConfigError, match="use_karras_sigmas"):
        SchedulerConfig.from_dict({**SD, "use_beta_sigmas": True})


def test_unknown_scheduler_name_lists_supported():
    with pytest.raises(ConfigError, match="unknown scheduler 'heun'; expected one of"):
        make_scheduler("heun", SchedulerConfig())
    with pytest.raises(ConfigError, match="HeunDiscreteScheduler"):
        name_for_class("HeunDiscreteScheduler")
    assert name_for_class("PNDMScheduler") == "pndm"


def test_stochastic_scheduler_without_noise_is_a_clear_error():
    s = make_scheduler("euler_a", SchedulerConfig.from_dict(SD))
    s.set_timesteps(4)
    from edgediff.errors import EdgediffError

    with pytest.raises(EdgediffError, match="needs a noise source"):
        s.step(np.zeros((1, 4, 2, 2), np.float32), 0, np.zeros((1, 4, 2, 2), np.float32), None)


def test_pndm_refuses_a_zero_terminal_snr_schedule():
    """PLMS divides by sqrt(alpha_bar_T) = 0 there: one line naming the schedulers that can, not a NaN at step 1."""
    cfg = SchedulerConfig.from_dict({**SD, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                                     "timestep_spacing": "trailing"})
    with pytest.raises(ConfigError, match="pndm cannot sample .* zero-terminal-SNR .* dpmpp_2m"):
        make_scheduler("pndm", cfg)
    make_scheduler("dpmpp_2m", cfg).set_timesteps(20)
