"""DeepCache (Ma, Fang, Wang, "DeepCache: Accelerating Diffusion Models for Free", CVPR 2024) as a step extension:
every ``interval``-th step runs the full UNet, which also outputs the deep feature of one skip branch; the steps in
between run a *shallow* graph that recomputes only the layers above that branch and takes the cached feature in
place of everything below it (the mid block and the deeper down/up blocks). Both graphs come from the same weights
(``edgediff export ... --deepcache BRANCH``; export/components_deepcache.py says which layers each holds).

The schedule is the reference implementation's (``DeepCache==0.1.1``, ``DeepCacheSDHelper``, skip_mode
"uniform", the only mode its helper runs): a UNet call is full when ``(k - k0) % interval == 0``, where ``k`` is the
index of the *first* occurrence of the call's timestep in the scheduler's timesteps and ``k0`` that of the first
call. For first-order schedulers ``k`` is the step index; for PNDM (which repeats its second timestep) and the
second-order solvers the helper counts a repeated timestep as its first occurrence, and so does this module, so the
images match the helper's. Interval 1 is the plain UNet (every call full): no extension is made at all.

``cache_schedule="quadratic"`` is the paper's non-uniform 1:N strategy (Sec. 3.3; the reference pipeline's
``uniform=False``, ``center``, ``pow``): the same number of full steps as the uniform schedule, ceil(T / N) of T
steps, placed densest around a center step c, where the features change fastest:
    I = {0} + { floor(lambda_j ** p) + c },  lambda = linspace((-c) ** (1/p), (T - c) ** (1/p), K + 1)
keeping the distinct values but the lowest and highest. As in the reference code (``sample_from_quad_center``),
``(-c) ** (1/p)`` is Python's power of a negative number, the principal complex root, so lambda runs along a line
in the complex plane and the floor takes the real part (truncation toward zero); when rounding merges two indices
the reference lowers p by 0.02 until K distinct ones come out (refused here once p reaches 1, as there). Step k of
the quadratic schedule is the k-th *distinct* timestep of the whole schedule (the reference's loop index for
first-order schedulers; PNDM's and second-order solvers' repeated timestep counts as the same step, as the uniform
mode counts it); img2img starts mid-schedule and runs the full steps that fall in its part, its first call always
full. Defaults: p = 1.2 (the reference function's default); c = 0.3 T rounded down (our choice: the reference
pipeline has no default centre; its ``center=None`` fails), to be tuned per model on data other than the
evaluation's.

SD 1.x/2.x, SDXL and LCM UNets: the graphs take the ``unet``'s inputs, so the job's feeds (the conditioning's extra
inputs included) go to them unchanged, plus ``deep_feature`` on the shallow steps.

The cached feature belongs to its job (this extension object is made per job), so jobs stepped together by
runtime/batching.step_together each carry their own; its rows are the job's denoiser rows (2N with guidance).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .bundle.schema import DEEPCACHE_FULL, DEEPCACHE_MAX_BRANCHES, deepcache_shallow
from .errors import InputError

SCHEDULES = ("uniform", "quadratic")  # cache_schedule values; "uniform" is DeepCacheSDHelper's, the default
DEFAULT_POW = 1.2  # the reference's sample_from_quad_center default
CENTER_FRACTION = 0.3  # default centre: floor(0.3 * steps) (15 of 50)
FEATURE_INPUT = "deep_feature"  # the shallow graph's input: the cached feature, (B, C_b, h_b, w_b) float32


def feature_output(branch: int) -> str:
    """The full graph's output holding branch ``branch``'s deep feature."""
    return f"deep_feature_{branch}"


def branch_position(branch: int) -> tuple[int, int]:
    """DeepCache's (cache_block_id, cache_layer_id) of a branch id: ``divmod(branch, 3)`` (DeepCacheSDHelper's
    set_params): the down/up block pair, and the layer inside it counted from the block's skip end."""
    return divmod(branch, 3)


def check_interval(value) -> int | None:
    """None (off) or a whole number >= 1 of steps between full UNet calls."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"cache_interval={value!r}; must be a whole number >= 1 (DeepCache runs the full UNet every "
                         "N-th step and the shallow one between; 1 runs the plain UNet every step)")
    return int(value)


def check_branch(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < DEEPCACHE_MAX_BRANCHES:
        raise InputError(f"cache_branch={value!r}; must be a whole number from 0 to {DEEPCACHE_MAX_BRANCHES - 1} "
                         "(DeepCache's cache_branch_id: 3 x the block plus the layer; 0 is the shallowest)")
    return int(value)


def bundle_branches(bundle) -> tuple[int, ...]:
    """The branches whose shallow graph the bundle holds (and whose feature its full graph outputs)."""
    comps = bundle.manifest.components
    if DEEPCACHE_FULL not in comps:
        return ()
    outs = {s.name for s in comps[DEEPCACHE_FULL].outputs}
    return tuple(b for b in range(DEEPCACHE_MAX_BRANCHES)
                 if deepcache_shallow(b) in comps and feature_output(b) in outs)


def quadratic_full_steps(steps: int, interval: int, center: int, power: float) -> tuple[int, ...]:
    """The full-UNet steps of the paper's non-uniform 1:N schedule (module docstring), sorted: as many as the
    uniform schedule's, ceil(steps / interval), placed by a power law around ``center``. Raises InputError when no
    power between ``power`` and 1 gives that many distinct steps (the reference raises there too)."""
    count = -(-steps // interval)  # K: the uniform schedule's number of full steps
    p = power
    while p > 1:
        # lambda_j, j = 0..K; (-c) ** (1/p) is complex for c > 0 (principal root), as the reference evaluates it
        lam = np.linspace((-center) ** (1 / p), (steps - center) ** (1 / p), count + 1)
        offsets = np.unique(np.trunc(np.real(lam ** p)).astype(np.int32))  # floor toward zero, distinct, sorted
        full = (0, *(int(o) + center for o in offsets[1:-1]))  # the ends (-c, T - c) give way to step 0
        if len(full) == count:
            return tuple(sorted(full))
        p -= 0.02  # the reference's search step, subtracted the same way so the same p values are tried
    raise InputError(f"cache_schedule='quadratic' with {steps} steps, cache_interval={interval}, "
                     f"cache_center={center}, cache_pow={power}: no power in (1, {power}] spaces {count} distinct "
                     "full steps (rounding merges two); try another cache_center or cache_pow")


def check_schedule(schedule, center, power, *, interval: int | None, steps: int):
    """(schedule, center, power) of a request: ("uniform", None, None) by default; "quadratic" fills in the
    defaults (module docstring). One line naming what is wrong otherwise."""
    if interval is None and (schedule is not None or center is not None or power is not None):
        given = ", ".join(n for n, v in (("cache_schedule", schedule), ("cache_center", center),
                                         ("cache_pow", power)) if v is not None)
        raise InputError(f"{given} shapes DeepCache's schedule and needs cache_interval N (N >= 2)")
    schedule = "uniform" if schedule is None else schedule
    if schedule not in SCHEDULES:
        raise InputError(f"cache_schedule={schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if schedule == "uniform":
        if center is not None or power is not None:
            raise InputError("cache_center and cache_pow place the full steps of cache_schedule='quadratic' (the "
                             "paper's non-uniform schedule); the uniform one has none: add cache_schedule='quadratic' "
                             "or drop them")
        return schedule, None, None
    if center is None:
        center = int(CENTER_FRACTION * steps)
    elif isinstance(center, bool) or not isinstance(center, (int, np.integer)) or not 0 <= center < steps:
        raise InputError(f"cache_center={center!r}; must be a step from 0 to {steps - 1} (the step the full UNet "
                         f"calls crowd around, of this call's {steps})")
    if power is None:
        power = DEFAULT_POW
    elif isinstance(power, bool) or not isinstance(power, (int, float, np.integer, np.floating)) \
            or not np.isfinite(power) or power <= 1:
        raise InputError(f"cache_pow={power!r}; must be a number > 1 (the power law's exponent; 1 would space the "
                         "full steps evenly)")
    center, power = int(center), float(power)
    if interval is not None and interval > 1:
        quadratic_full_steps(steps, interval, center, power)  # one that cannot be placed fails now, not mid-run
    return schedule, center, power


def check_request(bundle, interval, branch, *, cfg_cutoff=None, loras=None, controlnet=None) -> tuple[int | None, int]:
    """(interval, branch) for a request, or one line naming what is wrong. ``interval`` None or 1 is the plain UNet
    (nothing is checked against the bundle); ``branch`` None is DeepCache's default, 0."""
    interval = check_interval(interval)
    if branch is not None and interval is None:
        raise InputError("cache_branch picks DeepCache's cached branch and needs cache_interval N (N >= 2)")
    branch = 0 if branch is None else check_branch(branch)
    if interval is None or interval == 1:
        return interval, branch
    have = bundle_branches(bundle)
    if not have:
        # the request asks for what this bundle lacks (as decoder='tiny' without a tiny decoder): the caller's to fix
        raise InputError(f"cache_interval={interval} needs DeepCache graphs and {bundle.root} has no DeepCache "
                         f"graphs; export them with `edgediff export SRC OUT --deepcache {branch}` (or run without "
                         "cache_interval)")
    if branch not in have:
        raise InputError(f"cache_branch={branch}: {bundle.root} has DeepCache graphs for branch(es) "
                         f"{', '.join(map(str, have))}, not {branch}; pass one of those as cache_branch, or re-export "
                         f"with --deepcache {branch}")
    if cfg_cutoff is not None:  # the cached feature has the guided batch's rows; after the cutoff the batch halves
        raise InputError("cache_interval does not combine with cfg_cutoff (DeepCache's cached feature holds the "
                         "guided batch, which the cutoff halves); use one of them")
    if controlnet is not None:  # ControlNet residuals enter the mid and every down block, which a cached step skips
        raise InputError("cache_interval does not combine with ControlNet (its residuals feed the blocks DeepCache "
                         "skips); use one of them")
    if loras:  # hot-swapped LoRAs change the unet graph's weights only, not the DeepCache graphs'
        raise InputError("cache_interval does not combine with LoRAs applied at load (the DeepCache graphs keep the "
                         "exported weights); fuse the LoRA at export (edgediff export --lora ... --deepcache B)")
    return interval, branch


@dataclass
class DeepCache:
    """A StepExtension (runtime/job.py) holding one job's cached feature."""

    interval: int
    branch: int
    feature: np.ndarray | None = field(default=None, repr=False)  # (2N or N, C_b, h_b, w_b) float32
    start: int | None = None  # the helper's start_timestep: the schedule index of the job's first call
    full_steps: frozenset[int] | None = None  # quadratic schedule: its full steps (distinct-timestep ordinals)

    def _index(self, job) -> int:
        """The index of the first occurrence of this step's timestep (DeepCacheSDHelper's cur_timestep)."""
        ts = np.asarray(job.scheduler.timesteps)
        return int(np.flatnonzero(ts == ts[job.step])[0])

    def full(self, job) -> bool:
        k = self._index(job)
        if self.full_steps is not None:  # quadratic: the step's ordinal among the schedule's distinct timesteps
            ts = np.asarray(job.scheduler.timesteps)
            return len(np.unique(ts[:k + 1])) - 1 in self.full_steps or self.feature is None
        if self.start is None:
            self.start = k
        return (k - self.start) % self.interval == 0 or self.feature is None

    def graph(self, job, graph: str) -> str:
        return DEEPCACHE_FULL if self.full(job) else deepcache_shallow(self.branch)

    def feeds(self, job, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.full(job):
            return feeds
        return {**feeds, FEATURE_INPUT: self.feature}

    def outputs(self, job, outputs: dict[str, np.ndarray]) -> None:
        """The step's graph outputs by name (this job's rows): a full call's feature is cached."""
        name = feature_output(self.branch)
        if name in outputs:
            self.feature = outputs[name]


def extensions_for(request) -> tuple:
    """The extension a request's ``cache_interval`` asks for: none when it is unset or 1."""
    n = getattr(request, "cache_interval", None)
    if n is None or n <= 1:
        return ()
    if getattr(request, "cache_schedule", "uniform") == "quadratic":
        steps = quadratic_full_steps(request.steps, n, request.cache_center, request.cache_pow)
        return (DeepCache(n, request.cache_branch, full_steps=frozenset(steps)),)
    return (DeepCache(n, request.cache_branch),)
