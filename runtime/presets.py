"""Named generation presets: one word that sets the scheduler, steps and guidance a technique needs, so users type
``--preset lcm`` instead of three options they must get right together. A value the call names itself wins.

``lcm`` is the LCM-LoRA recipe (Luo et al. 2023, "LCM-LoRA: A Universal Stable-Diffusion Acceleration Module"): a
plain SD 1.5 / SDXL bundle with an LCM-LoRA (fused at export with ``--lora``, or applied at run time) sampled by
the LCM scheduler over the bundle's own training schedule (its betas: diffusers' ``LCMScheduler.from_config(
pipe.scheduler.config)``), 4 steps, guidance 1.0 (no classifier-free guidance branch; the LoRA has the guidance
distilled in — its authors suggest 1.0 to 2.0).
"""
from __future__ import annotations

from dataclasses import dataclass

from .bundle.reader import Bundle
from .errors import InputError


@dataclass(frozen=True)
class Preset:
    name: str
    scheduler: str  # a name of edgediff.schedulers.SCHEDULERS, built from the bundle's scheduler_config.json
    steps: int
    guidance_scale: float  # <= 1: one UNet batch per step
    families: tuple[str, ...]  # manifest families it applies to
    summary: str  # what it is for, in --help


PRESETS = {p.name: p for p in (
    Preset("lcm", scheduler="lcm", steps=4, guidance_scale=1.0, families=("sd1", "sdxl"),
           summary="an SD 1.5/SDXL bundle with an LCM-LoRA"),
)}


def describe() -> str:
    """The presets and what each sets, for --help."""
    return "; ".join(f"{p.name}: scheduler {p.scheduler}, {p.steps} steps, guidance {p.guidance_scale:g} "
                     f"({p.summary})" for p in PRESETS.values())


def resolve(name, bundle: Bundle, *, steps, guidance, scheduler) -> tuple:
    """(steps, guidance, scheduler) with the preset's values where the call named none; InputError for an unknown
    preset or one that does not apply to ``bundle``."""
    preset = PRESETS.get(name) if isinstance(name, str) else None
    if preset is None:
        raise InputError(f"preset={name!r} is not a preset; presets: {describe()}")
    family = bundle.manifest.family
    if family == "lcm":
        raise InputError(f"preset {preset.name!r} is for a base model with an LCM-LoRA, and this bundle's UNet is a "
                         f"Latent Consistency Model already (family lcm): drop the preset, the bundle runs "
                         f"{bundle.default_steps} steps with its LCM scheduler by default")
    if family not in preset.families:
        raise InputError(f"preset {preset.name!r} does not apply to this {family} bundle: it is for "
                         f"{', '.join(preset.families)} bundles ({preset.summary})")
    return (preset.steps if steps is None else steps, preset.guidance_scale if guidance is None else guidance,
            scheduler or preset.scheduler)
