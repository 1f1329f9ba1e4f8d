"""``scheduler_config.json`` as a frozen dataclass. A field left at None means "not in the file": each scheduler
then applies its own diffusers default — which is what ``SomeScheduler.from_config(other.config)`` does.

Two kinds of model schedule share this one dataclass: diffusion (DDPM betas; epsilon/v/sample prediction: SD 1/2/XL)
and flow matching (rectified flow, x_t = (1 - sigma) x0 + sigma noise: SD3, FLUX), told apart by the file's
``_class_name`` (``FlowMatch*`` is flow; ``kind``). Keys diffusers writes for features we do not offer are read and
dropped while at their defaults; a non-default value warns, naming it, since diffusers' result would differ."""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..config import check_choice, from_mapping, read_json
from ..errors import ConfigError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")
FINAL_SIGMAS = ("zero", "sigma_min")
TIME_SHIFT_TYPES = ("exponential", "linear")
KINDS = ("diffusion", "flow")

# Keys diffusers writes that no edgediff scheduler reads, with the values at which diffusers' scheduler does not use
# them either (ANY: never used while the options we refuse are off). Any other value warns: the bundle asks for
# something we would silently not do.
ANY = object()
IGNORED: dict[str, object] = {
    "variance_type": (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"),  # learned*: DPM splits
    "dynamic_thresholding_ratio": ANY, "sample_max_value": ANY,  # only with thresholding, which is refused
    "sigma_min": (None,), "sigma_max": (None,),  # Euler/UniPC: the Karras ramp's ends instead of the schedule's
    "lambda_min_clipped": (-math.inf,),  # DPM-Solver: clips the log-SNR of the last steps (cosine schedules)
    "timestep_type": ("discrete",),  # Euler "continuous": EDM-style c_noise timesteps
    "solver_p": (None,),  # UniPC with another scheduler as predictor
    "use_flow_sigmas": ANY, "flow_shift": ANY,  # DPM/UniPC flow mode: use_flow_sigmas=true is refused
    "use_lu_lambdas": ANY, "use_beta_sigmas": ANY,  # refused when true
    "eta": ANY,  # no diffusers scheduler we reproduce reads it from its config (DDIM takes eta per step)
}
_SIGMA_OPTIONS = ("supported sigma options: use_karras_sigmas (and use_exponential_sigmas, use_dynamic_shifting with "
                  "a FlowMatch scheduler)")


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
    use_exponential_sigmas: bool | None = None  # flow schedules: sigmas evenly spaced in log between the shifted ends
    # flow matching (FlowMatch*DiscreteScheduler): see flow_shift.py for the equations
    shift: float | None = None  # static timestep shift s (Esser et al. 2024, eq. 23): SD3 3.0, FLUX-schnell 1.0
    use_dynamic_shifting: bool | None = None  # shift by mu from the image's token count instead (FLUX-dev)
    base_shift: float | None = None  # mu at base_image_seq_len tokens
    max_shift: float | None = None  # mu at max_image_seq_len tokens
    base_image_seq_len: int | None = None
    max_image_seq_len: int | None = None
    time_shift_type: str | None = None  # how mu shifts sigma (TIME_SHIFT_TYPES)
    shift_terminal: float | None = None  # stretch the shifted schedule so it ends at this sigma (LTX-Video)
    invert_sigmas: bool | None = None  # run sigma upwards (1 - sigma), ending at 1
    stochastic_sampling: bool | None = None  # re-noise each step: x' = (1 - s') x0 + s' noise
    class_name: str | None = None  # diffusers' _class_name: which scheduler the model shipped with (decides ``kind``)

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
        self._check_flow(src)

    def _check_flow(self, src: str) -> None:
        """The flow-matching keys' values (each scheduler checks the combinations it uses)."""
        if self.class_name is not None and not isinstance(self.class_name, str):
            raise ConfigError(f"{src}: _class_name={self.class_name!r}; expected a diffusers scheduler class name")
        if self.time_shift_type is not None:
            check_choice(src, "time_shift_type", self.time_shift_type, TIME_SHIFT_TYPES)
        for key in ("shift", "base_shift", "max_shift", "shift_terminal"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise ConfigError(f"{src}: {key}={v!r}; expected a number")
        if self.shift is not None and self.shift <= 0:
            raise ConfigError(f"{src}: shift={self.shift!r}; expected a number > 0 (1.0: no shift)")
        if self.shift_terminal is not None and not 0 <= self.shift_terminal < 1:
            # diffusers divides by 1 - shift_terminal; 0 (falsy) means "off" there, as here
            raise ConfigError(f"{src}: shift_terminal={self.shift_terminal!r}; expected a number from 0 to below 1")
        for key in ("base_image_seq_len", "max_image_seq_len"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{src}: {key}={v!r}; expected an integer >= 1")
        for key in ("use_dynamic_shifting", "invert_sigmas", "stochastic_sampling", "use_exponential_sigmas"):
            v = getattr(self, key)
            if v is not None and not isinstance(v, bool):
                raise ConfigError(f"{src}: {key}={v!r}; expected true or false")
        if self.kind == "diffusion":  # no resolution shift and no exponential sigmas in the diffusion schedulers
            for key in ("use_exponential_sigmas", "use_dynamic_shifting"):
                if getattr(self, key):
                    raise ConfigError(f"{src}: {key}=true is not supported; {_SIGMA_OPTIONS}")
        if self.use_karras_sigmas and self.use_exponential_sigmas:
            raise ConfigError(f"{src}: use_karras_sigmas and use_exponential_sigmas are both true; set at most one")

    @property
    def kind(self) -> str:
        """"flow" for a flow-matching schedule (diffusers' FlowMatch* classes), else "diffusion" (KINDS)."""
        return "flow" if (self.class_name or "").startswith("FlowMatch") else "diffusion"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "scheduler_config.json") -> "SchedulerConfig":
        data = dict(data)
        if "_class_name" in data:
            data["class_name"] = data["_class_name"]
        for key in ("use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas"):
            if data.get(key):
                raise ConfigError(f"{source}: {key}=true is not supported; {_SIGMA_OPTIONS}")
        unused = {k: data[k] for k, harmless in IGNORED.items()
                  if k in data and harmless is not ANY and data[k] not in harmless}
        if unused:
            warnings.warn(f"{source}: ignoring {', '.join(f'{k}={v!r}' for k, v in unused.items())}: edgediff's "
                          "schedulers do not implement it, so results will differ from diffusers', which uses it",
                          stacklevel=2)
        return from_mapping(cls, data, source=source, ignore=IGNORED)

    @classmethod
    def from_file(cls, path: Path) -> "SchedulerConfig":
        return cls.from_dict(read_json(path, what="scheduler config"), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The set fields, as scheduler_config.json keys (class_name as diffusers' ``_class_name``)."""
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items() if v is not None}
        if "class_name" in out:
            out["_class_name"] = out.pop("class_name")
        return out

    def get(self, key: str, defaults: Mapping[str, Any]) -> Any:
        v = getattr(self, key)
        return defaults.get(key) if v is None else v
