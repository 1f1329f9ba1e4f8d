"""``scheduler_config.json`` as a frozen dataclass. A field left at None means "not in the file": each scheduler
then applies its own diffusers default — which is what ``SomeScheduler.from_config(other.config)`` does."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..config import check_choice, from_mapping, read_json
from ..errors import ConfigError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")
FINAL_SIGMAS = ("zero", "sigma_min")


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000  # T of the forward process the model was trained with
    beta_start: float = 0.0001  # beta_1
    beta_end: float = 0.02  # beta_T
    beta_schedule: str = "linear"  # how betas go from beta_start to beta_end (BETA_SCHEDULES)
    trained_betas: tuple[float, ...] | None = None  # explicit betas; overrides the three above
    prediction_type: str = "epsilon"  # what the model predicts: noise, v (Salimans & Ho 2022) or x0
    timestep_spacing: str | None = None  # how inference steps pick training timesteps (SPACINGS)
    steps_offset: int | None = None  # added to "leading" timesteps (SD uses 1)
    set_alpha_to_one: bool | None = None  # DDIM/PNDM/LCM: alpha_prod at the final step is 1 (else alphas_cumprod[0])
    clip_sample: bool | None = None  # DDIM/LCM: clip predicted x0 to [-clip_sample_range, clip_sample_range]
    clip_sample_range: float | None = None
    skip_prk_steps: bool | None = None  # PNDM: skip the Runge-Kutta warm-up (SD's configs do)
    use_karras_sigmas: bool | None = None  # Karras et al. 2022 eq. (5) noise levels
    final_sigmas_type: str | None = None  # last sigma: "zero" or the training schedule's sigma_min
    solver_order: int | None = None  # DPM-Solver++ / UniPC order
    lower_order_final: bool | None = None  # drop to first order at the last steps (stabilises < 15 steps)
    euler_at_final: bool | None = None
    rescale_betas_zero_snr: bool | None = None  # Lin et al. 2023: rescale so the last step has zero SNR
    original_inference_steps: int | None = None  # LCM: the skipping-step schedule it was distilled with
    timestep_scaling: float | None = None  # LCM: boundary-condition scale
    interpolation_type: str | None = None  # Euler: "linear" sigma interpolation (only one supported)
    thresholding: bool | None = None  # dynamic thresholding (Imagen); not supported here
    disable_corrector: tuple[int, ...] | None = None  # UniPC: steps without the UniC corrector
    solver_type: str | None = None  # DPM: midpoint/heun; UniPC: bh1/bh2
    algorithm_type: str | None = None  # DPM: only dpmsolver++
    predict_x0: bool | None = None  # UniPC

    def __post_init__(self) -> None:
        src = "scheduler_config.json"
        check_choice(src, "beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        check_choice(src, "prediction_type", self.prediction_type, PREDICTION_TYPES)
        if self.timestep_spacing is not None:
            check_choice(src, "timestep_spacing", self.timestep_spacing, SPACINGS)
        if self.final_sigmas_type is not None:
            check_choice(src, "final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS)
        if self.interpolation_type is not None:
            check_choice(src, "interpolation_type", self.interpolation_type, ("linear",))
        if self.thresholding:
            raise ConfigError(f"{src}: thresholding=true is not supported (it is for pixel-space models); set it to false")
        if self.algorithm_type is not None:
            check_choice(src, "algorithm_type", self.algorithm_type, ("dpmsolver++",))
        if self.solver_type is not None:
            check_choice(src, "solver_type", self.solver_type, ("midpoint", "bh1", "bh2"))
        if self.solver_order is not None and self.solver_order not in (1, 2, 3):
            raise ConfigError(f"{src}: solver_order={self.solver_order}; expected one of [1, 2, 3]")
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
            raise ConfigError(f"{src}: num_train_timesteps={self.num_train_timesteps!r}; expected an integer >= 2")
        if self.trained_betas is not None:
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
        if self.disable_corrector is not None:
            object.__setattr__(self, "disable_corrector", tuple(self.disable_corrector))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "scheduler_config.json") -> "SchedulerConfig":
        # keys diffusers writes for features we do not offer; harmless when at their defaults
        ignore = ("variance_type", "dynamic_thresholding_ratio", "sample_max_value", "sigma_min", "sigma_max",
                  "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas", "flow_shift",
                  "lambda_min_clipped", "timestep_type", "use_dynamic_shifting", "time_shift_type", "solver_p",
                  "shift_terminal", "eta")
        data = dict(data)
        for key in ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting"):
            if data.get(key):
                raise ConfigError(f"{source}: {key}=true is not supported; supported sigma options: use_karras_sigmas")
        return from_mapping(cls, data, source=source, ignore=ignore)

    @classmethod
    def from_file(cls, path: Path) -> "SchedulerConfig":
        return cls.from_dict(read_json(path, what="scheduler config"), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items() if v is not None}

    def get(self, key: str, defaults: Mapping[str, Any]) -> Any:
        v = getattr(self, key)
        return defaults.get(key) if v is None else v
