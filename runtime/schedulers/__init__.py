"""Numpy schedulers, by name. ``make_scheduler(name, config)`` builds one for a single generation.

Layout: ``protocol`` (what the denoising loop calls), ``base`` (what every scheduler shares), three families
(``alpha_bar``: DDIM/PNDM/LCM; ``sigma``: Euler/Euler a; ``multistep``: DPM-Solver++/UniPC), one module per
scheduler, and the shared math (``schedule``: betas and sigmas; ``spacing``: timestep_spacing). Flow matching
(SD3, FLUX): ``flow_base``, ``flow_euler``, ``flow_heun``, with the sigma shifts and FLUX's mu in ``flow_shift``.

Each scheduler has a kind ("diffusion" or "flow"); ``make_scheduler`` runs only those of the config's kind."""
from __future__ import annotations

from ..errors import ConfigError
from .config import SchedulerConfig
from .ddim import DDIM
from .dpmpp_2m import DPMSolverPP2M, DPMSolverPP2MKarras
from .euler import Euler
from .euler_ancestral import EulerAncestral
from .flow_euler import FlowMatchEuler
from .flow_heun import FlowMatchHeun
from .lcm import LCM
from .pndm import PNDM
from .protocol import Scheduler
from .unipc import UniPC

SCHEDULERS = {cls.name: cls for cls in (PNDM, DDIM, Euler, EulerAncestral, DPMSolverPP2M, DPMSolverPP2MKarras, LCM, UniPC,
                                        FlowMatchEuler, FlowMatchHeun)}

# our name -> (diffusers class, extra config), for reference runs (bench --compare diffusers, tests)
DIFFUSERS_EQUIVALENT = {name: (cls.diffusers_class, dict(cls.OVERRIDES)) for name, cls in SCHEDULERS.items()}

# diffusers class name -> our name, so a bundle's own scheduler is the default. The first entry per class wins:
# dpmpp_2m, not its Karras variant (a bundle's config already says whether it wants Karras sigmas).
_CLASSES: dict[str, str] = {}
for _name, _cls in SCHEDULERS.items():
    _CLASSES.setdefault(_cls.diffusers_class, _name)


def make_scheduler(name: str, config: SchedulerConfig) -> Scheduler:
    try:
        cls = SCHEDULERS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown scheduler {name!r}; expected one of {sorted(SCHEDULERS)}") from None
    if cls.kind != config.kind:  # a flow model's velocity is no noise prediction, nor the other way round
        fit = sorted(n for n, c in SCHEDULERS.items() if c.kind == config.kind)
        what = {"flow": "a flow-matching model's", "diffusion": "a diffusion (epsilon/v) model's"}
        raise ConfigError(f"scheduler {name!r} cannot run {what[config.kind]} schedule "
                          f"({config.class_name or 'scheduler_config without _class_name'}); use one of {fit}")
    return cls(config)


def name_for_class(class_name: str) -> str:
    try:
        return _CLASSES[class_name]
    except (KeyError, TypeError):
        raise ConfigError(f"scheduler class {class_name!r} is not supported; supported: {sorted(_CLASSES)} "
                          f"(pick one with scheduler=...)") from None


__all__ = ["DIFFUSERS_EQUIVALENT", "SCHEDULERS", "Scheduler", "SchedulerConfig", "make_scheduler", "name_for_class"]
