"""Numpy schedulers, by name. ``make_scheduler(name, config)`` builds one for a single generation."""
from __future__ import annotations

from ..errors import ConfigError
from .base import Scheduler
from .config import SchedulerConfig
from .ddim import DDIM
from .dpmpp_2m import DPMSolverPP2M, DPMSolverPP2MKarras
from .euler import Euler
from .euler_ancestral import EulerAncestral
from .lcm import LCM
from .pndm import PNDM
from .unipc import UniPC

SCHEDULERS = {cls.name: cls for cls in (PNDM, DDIM, Euler, EulerAncestral, DPMSolverPP2M, DPMSolverPP2MKarras, LCM, UniPC)}

# diffusers class name -> our name, so a bundle's own scheduler is the default
_CLASSES = {
    "PNDMScheduler": "pndm",
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "LCMScheduler": "lcm",
    "UniPCMultistepScheduler": "unipc",
}


# our name -> (diffusers class, extra config), for reference runs (bench --compare diffusers, tests)
DIFFUSERS_EQUIVALENT = {name: (cls, {}) for cls, name in _CLASSES.items()}
DIFFUSERS_EQUIVALENT["pndm"] = ("PNDMScheduler", {"skip_prk_steps": True})
DIFFUSERS_EQUIVALENT["dpmpp_2m_karras"] = ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True})


def make_scheduler(name: str, config: SchedulerConfig) -> Scheduler:
    try:
        cls = SCHEDULERS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown scheduler {name!r}; expected one of {sorted(SCHEDULERS)}") from None
    return cls(config)


def name_for_class(class_name: str) -> str:
    try:
        return _CLASSES[class_name]
    except KeyError:
        raise ConfigError(f"scheduler class {class_name!r} is not supported; supported: {sorted(_CLASSES)} "
                          f"(pick one with scheduler=...)") from None


__all__ = ["DIFFUSERS_EQUIVALENT", "SCHEDULERS", "Scheduler", "SchedulerConfig", "make_scheduler", "name_for_class"]
