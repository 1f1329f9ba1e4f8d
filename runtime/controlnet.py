"""ControlNet as diffusers' StableDiffusionControlNetPipeline (its Img2Img variant, and
StableDiffusionXLControlNetPipeline for SDXL) computes it, without torch:
one step extension (runtime/job.py) that runs the request's ControlNets on each step's denoiser inputs and hands
their summed residuals to the bundle's residual UNet (``unet_controlnet``; export --controlnet,
export/components_controlnet.py). Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image
Diffusion Models": each ControlNet's down-block and mid-block residuals are added to the UNet's skip connections.

Semantics, each as diffusers 0.42 has it (pipelines/controlnet/pipeline_controlnet.py, models/controlnets):

* control image: resized to the generation size with Lanczos, then converted to RGB, in [0, 1] (no normalization:
  ``VaeImageProcessor(do_convert_rgb=True, do_normalize=False)``), repeated for every image of the call and, with
  classifier-free guidance, duplicated for the [uncond; cond] batch;
* ``controlnet_conditioning_scale`` multiplies a ControlNet's residuals; several ControlNets' residuals are summed
  in the order given (MultiControlNetModel);
* ``control_guidance_start/end``: ControlNet k acts at step i (counted over the steps the call runs) unless
  ``i / n < start_k`` or ``(i + 1) / n > end_k``; diffusers then multiplies its residuals by 0, here it is not run
  (adding zero is exact), and a step where no ControlNet acts runs the plain ``unet`` graph;
* guess mode: residuals scaled by ``logspace(-1, 0, R) * scale`` (0.1 at the first down block up to 1.0 at the mid
  block); with guidance the ControlNet sees the conditional half only and the unconditional half gets zero
  residuals. A ControlNet whose config sets ``global_pool_conditions`` (shuffle) turns guess mode on, as diffusers'
  pipeline does, and is scaled by ``scale`` alone (its residuals are spatially averaged inside the graph).

Differences from diffusers, by design: when neither height nor width is given the generation takes the first
control image's size rounded down to the model's size multiple (diffusers' rule, with the runtime's multiple);
a control image whose aspect ratio differs from the generation's is refused rather than stretched (a stretched
pose or edge map conditions on a distorted scene); images of 16/32-bit or float modes are refused (converting them
to RGB clips them at 255). One control image per ControlNet (diffusers also takes one per prompt).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .bundle.schema import CONTROLNET_PREFIX, RESIDUAL_UNET
from .errors import BundleError, InputError
from .stages import run_component

# PIL modes whose pixels convert to RGB without loss of meaning (8 bits per channel, palettes, bilevel)
IMAGE_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
CONTROL_INPUTS = ("controlnet_cond", "conditioning_scale")  # a ControlNet graph's inputs that are not the UNet's
MAX_SCALE = 100.0  # far beyond any useful conditioning scale (diffusers' examples use 0.5-2); stops typos like 1e9


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet of a request, with its preprocessed control image."""

    name: str  # the bundle's name for it (component ``controlnet_<name>``)
    image: np.ndarray  # (N, 3, H, W) float32 in [0, 1]: the control image, one row per image of the call
    scale: float  # controlnet_conditioning_scale
    start: float  # control_guidance_start
    end: float  # control_guidance_end
    global_pool: bool  # its config's global_pool_conditions

    @property
    def component(self) -> str:
        return CONTROLNET_PREFIX + self.name


@dataclass(frozen=True)
class ControlInputs:
    """A request's ControlNet part, checked and preprocessed (``prepare``)."""

    units: tuple[ControlUnit, ...]
    guess_mode: bool  # as given, or forced by a global-pooling ControlNet (diffusers' rule)
    height: int
    width: int

    def parameters(self) -> dict[str, Any]:
        """What the PNG metadata records about the ControlNets."""
        return {"controlnets": [{"name": u.name, "scale": u.scale, "start": u.start, "end": u.end}
                                for u in self.units], "guess_mode": self.guess_mode}


def names(bundle) -> list[str]:
    """The ControlNets a bundle holds, by name, in the manifest's order."""
    return [c[len(CONTROLNET_PREFIX):] for c in bundle.manifest.components if c.startswith(CONTROLNET_PREFIX)]


def prepare(bundle, control_image, *, controlnets=None, scale=None, start=None, end=None, guess_mode=None,
            height=None, width=None, multiple: int, total: int, inpainting: bool = False,
            loras: dict | None = None) -> ControlInputs | None:
    """Check a call's ControlNet arguments and preprocess its control images as diffusers does; None when the call
    uses no ControlNet. InputError names the first bad argument. ``height``/``width``: the generation size when
    already fixed (given, or an init image's); ``total``: the images of the call."""
    given = {"controlnets": controlnets, "controlnet_conditioning_scale": scale, "control_guidance_start": start,
             "control_guidance_end": end, "guess_mode": guess_mode}
    if control_image is None:
        stray = next((k for k, v in given.items() if v is not None and v is not False), None)
        if stray is not None:
            raise InputError(f"{stray}= applies to ControlNet: give control_image= (--control-image) or drop it")
        return None
    have = names(bundle)
    if not have:
        raise InputError(f"{bundle.root} has no ControlNet; export one into the bundle with edgediff export SRC OUT "
                         "--controlnet DIR[:NAME]")
    if not bundle.has(RESIDUAL_UNET):
        raise BundleError(f"{bundle.root} has ControlNets but no {RESIDUAL_UNET} graph to take their residuals; "
                          "re-export the bundle with --controlnet")
    if inpainting:
        raise InputError("ControlNet with inpainting (mask_image=) is not supported yet; use one or the other")
    if loras:
        raise InputError("ControlNet runs the unet_controlnet graph, which LoRA hot-swap does not change; fuse the "
                         "LoRA at export (edgediff export --lora FILE --controlnet DIR) or drop the LoRA")
    chosen = _chosen(controlnets, have)
    images = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
    if len(images) != len(chosen):
        raise InputError(f"{len(images)} control image(s) for {len(chosen)} ControlNet(s) ({', '.join(chosen)}); "
                         "give one control image per ControlNet, in the same order")
    scales = _per_net(1.0 if scale is None else scale, len(chosen), "controlnet_conditioning_scale", 0.0, MAX_SCALE)
    starts = _per_net(0.0 if start is None else start, len(chosen), "control_guidance_start", 0.0, 1.0)
    ends = _per_net(1.0 if end is None else end, len(chosen), "control_guidance_end", 0.0, 1.0)
    for k, (s, e) in enumerate(zip(starts, ends)):
        if s >= e:
            raise InputError(f"control_guidance_start {s} is not below control_guidance_end {e} (ControlNet "
                             f"{chosen[k]!r}); the ControlNet acts from start to end, fractions of the steps")
    if guess_mode is not None and not isinstance(guess_mode, (bool, np.bool_)):
        raise InputError(f"guess_mode must be True or False, not {guess_mode!r}")
    pictures = [_open(im, k, len(images)) for k, im in enumerate(images)]
    h, w = _size(pictures[0], height, width, multiple)
    units = []
    for k, (name, pic) in enumerate(zip(chosen, pictures)):
        _check_aspect(pic, w, h, multiple, k, len(images))
        comp = bundle.component(CONTROLNET_PREFIX + name)
        want = comp.input("controlnet_cond").shape[1]
        if isinstance(want, int) and want != 3:
            raise BundleError(f"ControlNet {name!r} takes {want}-channel control images; this runtime prepares RGB "
                              "(3 channels) as diffusers does")
        outs = len(comp.outputs)
        res_in = sum(s.name.endswith("_additional_residual") or "_additional_residual_" in s.name
                     for s in bundle.component(RESIDUAL_UNET).inputs)
        if outs != res_in:
            raise BundleError(f"ControlNet {name!r} makes {outs} residuals and {RESIDUAL_UNET} takes {res_in}; "
                              "re-export the bundle")
        cfg = bundle.config(f"{CONTROLNET_PREFIX}{name}/config.json")
        arr = preprocess(pic, w, h)  # (1, 3, H, W)
        units.append(ControlUnit(name=name, image=np.repeat(arr, total, axis=0), scale=scales[k], start=starts[k],
                                 end=ends[k], global_pool=bool(cfg.get("global_pool_conditions", False))))
    # diffusers: guess_mode = guess_mode or (the first) ControlNet's global_pool_conditions
    guess = bool(guess_mode) or units[0].global_pool
    return ControlInputs(units=tuple(units), guess_mode=guess, height=h, width=w)


def _chosen(controlnets, have: list[str]) -> list[str]:
    if controlnets is None:
        if len(have) == 1:
            return have
        raise InputError(f"this bundle has ControlNets {', '.join(have)}: name the ones to use (controlnets=[...] / "
                         "--controlnet NAME, one per control image)")
    chosen = [controlnets] if isinstance(controlnets, str) else controlnets
    if not isinstance(chosen, (list, tuple)) or not chosen or not all(isinstance(c, str) for c in chosen):
        raise InputError(f"controlnets must be a ControlNet name or a list of names, not {controlnets!r}")
    for c in chosen:
        if c not in have:
            raise InputError(f"this bundle has no ControlNet {c!r}; it has: {', '.join(have)}")
    return list(chosen)


def _per_net(value, count: int, what: str, low: float, high: float) -> list[float]:
    """A number for every ControlNet, or a list of one per ControlNet; each finite and in [low, high]."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise InputError(f"{what} has {len(values)} values for {count} ControlNet(s); give one number, or one per "
                         "ControlNet")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) \
                or not math.isfinite(float(v)) or not low <= float(v) <= high:
            raise InputError(f"{what}={v!r}; expected a number from {low:g} to {high:g}")
    return [float(v) for v in values]


def _open(image, k: int, count: int):
    """A control image (path, PIL image, or (H, W[, 3]) uint8 array) as a PIL image in an 8-bit mode."""
    from PIL import Image

    from . import images as img

    what = "control_image" if count == 1 else f"control_image[{k}]"
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise InputError(f"{what} as an array must be (H, W, 3) or (H, W) uint8 pixels, not {image.dtype} "
                             f"{image.shape}; or give a path or PIL image")
        image = Image.fromarray(image)
    pic = img.open_image(image, "control image", what=what)
    if pic.mode not in IMAGE_MODES:
        raise InputError(f"{what} has mode {pic.mode} (16/32-bit or float pixels), which converts to RGB clipped at "
                         "255; give an 8-bit image (mode L or RGB, e.g. a depth map scaled to 0-255)")
    return pic


def _size(pic, height, width, multiple: int) -> tuple[int, int]:
    """The generation size: as given (or an init image's), else the first control image's rounded down."""
    iw, ih = pic.size
    w = width if width is not None else (iw - iw % multiple if height is None else None)
    h = height if height is not None else (ih - ih % multiple if width is None else None)
    if w is None:  # only height given: keep the control image's aspect ratio
        w = int(round(iw * h / ih)) // multiple * multiple
    if h is None:
        h = int(round(ih * w / iw)) // multiple * multiple
    if w < multiple or h < multiple:
        raise InputError(f"control image is {iw}x{ih}; it must be at least {multiple}x{multiple} pixels")
    return h, w


def _check_aspect(pic, w: int, h: int, multiple: int, k: int, count: int) -> None:
    """Refuse a control image that resizing to w x h would stretch: its width at the generation's height must be
    within the size multiple (or 1 %) of the generation's width."""
    iw, ih = pic.size
    if abs(iw * h / ih - w) > max(multiple, 0.01 * w):
        what = "control image" if count == 1 else f"control image {k}"
        raise InputError(f"{what} is {iw}x{ih} and the generation {w}x{h}: a different aspect ratio, so resizing "
                         f"would distort it; give a control image shaped like {w}x{h} (any size), or drop "
                         "height/width to generate at the control image's size")


def preprocess(pic, w: int, h: int) -> np.ndarray:
    """diffusers' control image preprocessing (VaeImageProcessor.preprocess, do_normalize=False): resize with
    Lanczos, then RGB, then [0, 1]. Returns (1, 3, H, W) float32."""
    from PIL import Image

    rgb = pic.resize((w, h), resample=Image.LANCZOS).convert("RGB")
    arr = np.asarray(rgb, dtype=np.float32) / np.float32(255.0)  # (H, W, 3)
    return np.ascontiguousarray(arr.transpose(2, 0, 1)[None])


def keeps(unit: ControlUnit, i: int, n: int) -> bool:
    """Whether ``unit`` acts at step ``i`` of the ``n`` the call runs (diffusers' controlnet_keep is 1)."""
    return not (i / n < unit.start or (i + 1) / n > unit.end)


def guess_scales(count: int, scale: float) -> np.ndarray:
    """Guess mode's per-residual scales, (count,) float32: ``logspace(-1, 0, count) * scale``, 0.1 up to 1.0."""
    return (np.logspace(-1.0, 0.0, count, dtype=np.float32) * np.float32(scale)).astype(np.float32)


@dataclass(frozen=True)
class ControlNetStep:
    """The StepExtension: picks ``unet_controlnet`` for steps where a ControlNet acts and adds its inputs."""

    inputs: ControlInputs
    components: Any  # runtime/components.Components
    bundle: Any

    def active(self, job) -> list[ControlUnit]:
        begin = job.scheduler.begin_index
        n = len(job.scheduler.timesteps) - begin  # diffusers' len(timesteps): the steps the call runs
        return [u for u in self.inputs.units if keeps(u, job.step - begin, n)]

    def graph(self, job, graph: str) -> str:
        return RESIDUAL_UNET if self.active(job) else graph

    def feeds(self, job, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        units = self.active(job)
        if not units:
            return feeds
        guided = job.cond.guided
        cond_only = self.inputs.guess_mode and guided  # guess mode: the ControlNet sees the conditional half
        rows = slice(feeds["sample"].shape[0] // 2, None) if cond_only else slice(None)
        total: list[np.ndarray] | None = None
        with job.watch.span("controlnet", job.step):
            for u in units:
                comp = self.bundle.component(u.component)
                # the denoiser's own inputs the ControlNet takes too (SDXL: text_embeds and time_ids as well)
                base = {s.name: feeds[s.name][rows] for s in comp.inputs if s.name not in CONTROL_INPUTS}
                count = len(comp.outputs)
                image = np.concatenate([u.image, u.image]) if guided and not cond_only else u.image  # (B, 3, H, W)
                ramp = self.inputs.guess_mode and not u.global_pool
                scales = guess_scales(count, u.scale) if ramp else np.full((count,), u.scale, np.float32)
                with self.components.use(u.component) as backend:
                    outs = run_component(backend, {**base, "controlnet_cond": image, "conditioning_scale": scales},
                                         precision=comp.precision)
                total = outs if total is None else [a + b for a, b in zip(total, outs)]  # MultiControlNet: summed
        if cond_only:  # the unconditional rows get no control (diffusers: zeros_like, concatenated first)
            total = [np.concatenate([np.zeros_like(r), r]) for r in total]
        outs = [s.name for s in self.bundle.component(self.inputs.units[0].component).outputs]
        return {**feeds, **{residual_input(o): r for o, r in zip(outs, total)}}


def residual_input(output: str) -> str:
    """The residual UNet's input for a ControlNet output: ``down_block_res_sample_{i}`` ->
    ``down_block_additional_residual_{i}``, ``mid_block_res_sample`` -> ``mid_block_additional_residual``."""
    return output.replace("_res_sample", "_additional_residual")


def extensions_for(request, components, bundle) -> tuple:
    """The step extension a request's ControlNets need: none without them."""
    control = getattr(request, "controlnet", None)
    return (ControlNetStep(control, components, bundle),) if control is not None else ()
