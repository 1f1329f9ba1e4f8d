"""Real inputs for each graph of a bundle, captured from real pipeline runs.

Quantization calibrates on what the denoiser actually sees (every timestep of the target step count, CFG batch,
real text embeddings), and derived bundles are checked for parity on such inputs too: random normal
``encoder_hidden_states`` are far outside what a trained text encoder produces, and a calibrated INT8 graph is
only meant to be right on the distribution it was calibrated on.

A family whose pipeline only refines an image (the SDXL refiner: no text-to-image) is run as img2img: each call
refines a procedural image (``calibration_image``) over the last 30 % of the schedule, diffusers' refiner default
(StableDiffusionXLImg2ImgPipeline's strength 0.3), so its denoiser sees the low-noise timesteps it is used at.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from edgediff.backends.base import Backend
from edgediff.errors import InputError

Feeds = dict[str, np.ndarray]


@dataclass
class Captured:
    """Per component: the feeds of every call, in call order (and the outputs, for VAE-encoder inputs)."""

    feeds: dict[str, list[Feeds]] = field(default_factory=dict)
    outputs: dict[str, list[Feeds]] = field(default_factory=dict)

    def count(self, component: str) -> int:
        return len(self.feeds.get(component, []))


class _Recorder:
    """A Backend that copies what goes in and out of another one."""

    def __init__(self, name: str, inner: Backend, into: Captured):
        self.name, self.inner, self.into = name, inner, into
        self.inputs, self.outputs = inner.inputs, inner.outputs

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.inner.run(feeds)
        self.into.feeds.setdefault(self.name, []).append({k: np.array(v, copy=True) for k, v in feeds.items()})
        self.into.outputs.setdefault(self.name, []).append({k: np.array(v, copy=True) for k, v in out.items()})
        return out

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, attr: str):  # whatever else the wrapped backend offers (its component name, profiling)
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(attr)
        return getattr(inner, attr)


def capture(bundle: str | Path, prompts: Sequence[str], *, steps: int, height: int | None = None,
            width: int | None = None, guidance_scale: float | None = None, seed: int = 0,
            scheduler: str | None = None, images_per_call: int = 1, options=None, deepcache: bool = True) -> Captured:
    """Run the bundle's own pipeline (ONNX Runtime CPU) on ``prompts`` with seeds ``seed, seed+1, ...`` and record
    the inputs of every graph call, ``images_per_call`` prompts per call. ``steps`` should be the step count the
    derived bundle will run at, so that calibration sees each of its timesteps; ``guidance_scale`` None is the
    bundle's own (SDXL 5.0, a Turbo bundle's recorded 0: its denoiser then runs unguided, at batch 1, as users run
    it). ``deepcache``: also run each DeepCache branch the bundle has (export --deepcache) at cache_interval 2, so
    that its full and shallow graphs are recorded; the plain pipeline never calls them."""
    from edgediff.backends.ort import OrtOptions
    from edgediff.controlnet import names as controlnet_names
    from edgediff.deepcache import bundle_branches
    from edgediff.heap import release_free_memory
    from edgediff.pipeline import Pipeline

    prompts = list(prompts)
    if not prompts:
        raise InputError("no calibration prompts; give at least one")
    got = Captured()
    # The arena gives each call's activations back: the capturing process goes on to derive graphs and waits on a
    # parity child, and a 1024x1024 SD3 transformer's activations (~10 GB) held here got the CLI killed for memory.
    options = options or OrtOptions(shrink_arena_after_run=True)
    with Pipeline.load(bundle, "cpu", options=options, scheduler=scheduler) as pipe, warnings.catch_warnings():
        # Calibration and parity prompts only steer activations: cutting them to a short text encoder (the
        # built-in model has 24 tokens) changes nothing the user must act on, so it is not printed on their terminal.
        warnings.filterwarnings("ignore", message=r"prompt \d+ is longer than the text encoder", category=UserWarning)
        pipe.components.wrap(lambda name, b: _Recorder(name, b, got))
        m = pipe.bundle.manifest
        refine = m.family in REFINES_ONLY
        nets = controlnet_names(pipe.bundle)  # export --controlnet (runtime/controlnet.py)
        cached = bundle_branches(pipe.bundle) if deepcache else ()  # export --deepcache (runtime/deepcache.py)
        for i in range(0, len(prompts), images_per_call):
            batch = prompts[i:i + images_per_call]
            kw = {}
            if refine:  # img2img at the output size: the image sets it
                kw = dict(image=calibration_image(seed + i, height or m.default_height, width or m.default_width),
                          strength=refiner_strength(steps))
            pipe(batch, num_inference_steps=steps, guidance_scale=guidance_scale, height=height, width=width,
                 seed=[seed + i + j for j in range(len(batch))], output_type="np", **kw)
            for branch in cached:  # DeepCache's graphs run only with cache_interval: full, shallow, full
                # (a refiner's img2img at full strength here, so that all DEEPCACHE_STEPS run)
                pipe(batch, num_inference_steps=max(steps, DEEPCACHE_STEPS), guidance_scale=guidance_scale,
                     height=height, width=width, seed=[seed + i + j for j in range(len(batch))], output_type="np",
                     cache_interval=2, cache_branch=branch, **({**kw, "strength": 1.0} if refine else {}))
            if nets and not refine:  # the ControlNets and unet_controlnet run only with a control image
                h, w = height or m.default_height, width or m.default_width
                pipe(batch, num_inference_steps=steps, guidance_scale=guidance_scale, height=h, width=w,
                     seed=[seed + i + j for j in range(len(batch))], output_type="np", controlnets=nets,
                     control_image=[calibration_image(seed + i + k, h, w) for k in range(len(nets))])
    release_free_memory()  # the closed sessions' weights (runtime/heap.py)
    return got


# DeepCache's capture runs at least this many steps at cache_interval 2, so that both graphs run: full, shallow, full
DEEPCACHE_STEPS = 3

# Families whose pipeline refines an image and has no text-to-image (their conditioner refuses it)
REFINES_ONLY = frozenset({"sdxl-refiner"})
REFINER_STRENGTH = 0.3  # diffusers' StableDiffusionXLImg2ImgPipeline default: the last 30 % of the schedule


def refiner_strength(steps: int) -> float:
    """REFINER_STRENGTH, raised where ``steps`` x 0.3 is below one step so that at least one step runs; the
    pipeline runs int(steps x strength) steps, and 1.5 / steps gives exactly one without rounding at the edge."""
    return min(1.0, max(REFINER_STRENGTH, 1.5 / steps))


def calibration_image(seed: int, height: int, width: int):
    """A deterministic RGB picture for refiner calibration: a two-colour gradient, a few flat discs and bars with
    sharp edges, and fine noise -- smooth areas, edges and texture across the full [0, 255] range, which is what
    a refiner's VAE encoder and denoiser meet in real photos and renders. A PIL image (the pipeline's image=)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * x / width + np.sin(angle) * y / height + 1) / 2  # in [0, 1]
    img = (1 - t)[..., None] * a + t[..., None] * b
    for _ in range(3):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(0.1, 0.3) * min(height, width)
        img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
        top, left = int(rng.uniform(0, height)), int(rng.uniform(0, width))
        img[top:top + max(1, height // 10), left:] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 8, img.shape)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def vae_encoder_feeds(got: Captured) -> list[Feeds]:
    """Realistic VAE-encoder inputs: the images the decoder produced (what img2img users pass back in)."""
    return [{"sample": np.ascontiguousarray(out[k], dtype=np.float32)} for out in got.outputs.get("vae_decoder", [])
            for k in list(out)[:1]]


def read_prompts(path: str | Path) -> list[str]:
    """A calibration prompt file: one prompt per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"calibration prompt file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text; give one prompt per line") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise InputError(f"{path} holds no prompts; give one prompt per line")
    return prompts
