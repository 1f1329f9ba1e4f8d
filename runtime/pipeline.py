"""txt2img and img2img over a bundle, with numpy schedulers and any Backend: the denoising loop of diffusers'
StableDiffusionPipeline / StableDiffusionImg2ImgPipeline, computed without PyTorch.

Thread safety: a Pipeline may be called from several threads at once. Each call builds its own scheduler state,
noise streams and arrays; the backends are shared, and ONNX Runtime sessions are safe to run concurrently. In
low-memory mode calls are serialized (each one loads and frees the components it uses).
"""
from __future__ import annotations

import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import images as img
from . import validation as check
from .bundle.manifest import SUPPORTED_FAMILIES
from .bundle.reader import Bundle
from .components import Components
from .errors import BundleError, Cancelled, InputError, NonFiniteError
from .noise import NoiseSource, make_noise, seeds_for
from .schedulers import make_scheduler, name_for_class
from .schedulers.config import SchedulerConfig
from .timing import Span, Stopwatch
from .tokenizer import ClipTokenizer

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5

StepCallback = Callable[[int, int, float, np.ndarray], None]  # (step done, total steps, timestep, latents)


@dataclass(frozen=True)
class GenerationResult:
    images: list  # PIL.Image.Image per image (or (H, W, 3) float32 arrays with output_type="np")
    seeds: tuple[int, ...]  # the seed of each image's noise stream: pass it back to reproduce that image
    timings: dict[str, float]  # seconds per stage (summed over steps) and "total"
    spans: tuple[Span, ...] = ()  # raw per-stage/per-step spans, for the bench harness and traces
    parameters: dict[str, Any] = field(default_factory=dict)  # what produced the images (PNG metadata)


@dataclass(frozen=True)
class Conditioning:
    """Everything the denoiser gets besides the latents and the timestep. SDXL's pooled text embeddings and time
    ids, or LCM's guidance embedding, become more entries of ``extra`` — the loop does not change."""

    encoder_hidden_states: np.ndarray  # (2N, seq, D) float32 [uncond; cond] when guided, else (N, seq, D)
    guided: bool
    extra: dict[str, np.ndarray] = field(default_factory=dict)


class Pipeline:
    def __init__(self, bundle: Bundle, components: Components, tokenizer: ClipTokenizer, scheduler_config: SchedulerConfig,
                 default_scheduler: str, unet_config: dict[str, Any]):
        self.bundle = bundle
        self.components = components
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.default_scheduler = default_scheduler
        m = bundle.manifest
        down = 2 ** (len(unet_config.get("block_out_channels", [0])) - 1)
        # The exported UNet upsamples by fixed factors, so latent sides must divide by its downsampling factor.
        self.size_multiple = m.vae_scale_factor * down
        self._unet_config = unet_config
        self._call_lock = threading.Lock() if components.low_memory else None

    # -- loading ---------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, backend: str = "cpu", *, scheduler: str | None = None, low_memory: bool = False,
             options: Any = None, verify: bool = True) -> "Pipeline":
        """Open a bundle. ``backend``: "cpu", "cuda", "tensorrt" (ONNX Runtime providers). ``scheduler``: a name
        from ``edgediff.schedulers.SCHEDULERS``; default: the bundle's own."""
        bundle = Bundle.open(path)
        family = bundle.manifest.family
        if family not in SUPPORTED_FAMILIES:
            raise BundleError(f"{bundle.root}: family {family!r} is not supported by this runtime yet "
                              f"(supported: {', '.join(SUPPORTED_FAMILIES)})")
        sched_cfg = SchedulerConfig.from_dict(bundle.config("scheduler/scheduler_config.json"),
                                              source=f"{bundle.root}/scheduler/scheduler_config.json")
        default = name_for_class(bundle.config("scheduler/scheduler_config.json").get("_class_name", "PNDMScheduler"))
        if scheduler is not None:
            make_scheduler(scheduler, sched_cfg)  # fail now, listing the names, not at the first call
        tokenizer = ClipTokenizer.from_dir(bundle.tokenizer_dir(), max_length=bundle.manifest.text_max_length)
        unet_config = bundle.config("unet/config.json")
        components = Components(bundle, backend, options, low_memory=low_memory, verify=verify)
        return cls(bundle, components, tokenizer, sched_cfg, scheduler or default, unet_config)

    def close(self) -> None:
        self.components.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def default_steps(self) -> int:
        """The bundle's recommended step count, else DEFAULT_STEPS."""
        d = self.bundle.manifest.defaults.steps
        return DEFAULT_STEPS if d is None else d

    @property
    def default_guidance(self) -> float:
        """The bundle's recommended guidance scale, else DEFAULT_GUIDANCE."""
        d = self.bundle.manifest.defaults.guidance_scale
        return DEFAULT_GUIDANCE if d is None else d

    # -- generation ------------------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seed: int | Sequence[int] | None = None,
        rng: str | NoiseSource = "numpy",
        latents: np.ndarray | None = None,
        image: Any = None,
        strength: float = 0.8,
        scheduler: str | None = None,
        callback: StepCallback | None = None,
        cancel: Callable[[], bool] | None = None,
        output_type: str = "pil",
    ) -> GenerationResult:
        """Generate images. Keyword names follow diffusers' StableDiffusionPipeline. With ``image=`` (a path or
        PIL image) this is img2img: the image is noised to ``strength`` and denoised from there. Steps and guidance
        left as None take the bundle's recommended ones (``default_steps``, ``default_guidance``)."""
        if num_inference_steps is None:
            num_inference_steps = self.default_steps
        if guidance_scale is None:
            guidance_scale = self.default_guidance
        with self._call_lock or nullcontext():
            return self._generate(prompt, negative_prompt, num_inference_steps, guidance_scale, height, width,
                                  num_images_per_prompt, seed, rng, latents, image, strength, scheduler, callback,
                                  cancel, output_type)

    def _generate(self, prompt, negative_prompt, num_inference_steps, guidance_scale, height, width,
                  num_images_per_prompt, seed, rng, latents, image, strength, scheduler, callback, cancel, output_type):
        m = self.bundle.manifest
        watch = Stopwatch()
        # 1. validate everything before any work
        prompts = check.prompts(prompt)
        negatives = self._negatives(negative_prompt, len(prompts))
        steps = check.steps(num_inference_steps, max_steps=self.scheduler_config.num_train_timesteps)
        g = check.guidance(guidance_scale)
        n = check.count(num_images_per_prompt)
        if output_type not in ("pil", "np"):
            raise InputError(f"output_type={output_type!r}; expected one of ['pil', 'np']")
        sched = make_scheduler(scheduler or self.default_scheduler, self.scheduler_config)
        init = None
        if image is not None:
            strength = check.strength(strength)
            init = img.load_image(image, multiple=self.size_multiple)
            height, width = init.shape[2], init.shape[3]
        h, w = check.size(height, width, multiple=self.size_multiple, default=self._static_size() or
                          (m.default_height, m.default_width))
        total = len(prompts) * n
        guided = g > 1.0
        self._check_static(h, w, total * (2 if guided else 1), total, guided)
        self._check_memory(total * (2 if guided else 1), h, w)
        seeds = seeds_for(seed, total)
        noise = make_noise(rng, seeds) if isinstance(rng, str) else rng
        shape = (total, m.latent_channels, h // m.vae_scale_factor, w // m.vae_scale_factor)

        with watch.span("total"):
            # 2. text conditioning
            cond = self._encode(prompts, negatives if guided else None, n, watch)
            # 3. timesteps and initial latents
            sched.set_timesteps(steps)
            if init is None:
                x = self._initial_latents(latents, shape, noise) * np.float32(sched.init_noise_sigma)
            else:
                x = self._img2img_latents(init, sched, steps, strength, total, noise, watch)
            # 4. denoise
            x = self._denoise(x, cond, sched, g, noise, callback, cancel, watch)
            # 5. decode
            with self.components.use("vae_decoder") as vae, watch.span("vae_decode"):
                z = x / np.float32(m.scaling_factor) + np.float32(m.shift_factor or 0.0)
                decoded = self._run(vae, {"latent_sample": z})[0]  # (N, 3, H, W) float32 in [-1, 1]
            self._finite(decoded, "vae_decode", "vae_decoder")
            with watch.span("postprocess"):
                out = self._postprocess(decoded, output_type)
        params = dict(prompt=prompts, negative_prompt=negatives if guided else None, steps=steps,
                      scheduler=sched.name, guidance_scale=g, height=h, width=w, strength=strength if init is not None else None,
                      bundle=self.bundle.digest)
        timings = watch.totals()
        return GenerationResult(images=out, seeds=seeds, timings=timings, spans=tuple(watch.spans), parameters=params)

    def autoencode(self, images) -> np.ndarray:
        """The VAE round trip of ``images`` ((N, H, W, 3) uint8): encoder mean -> decoder, as (N, H, W, 3) uint8.
        It shows what the decoder can draw of a given image, so it bounds the quality of anything a denoiser makes
        through this VAE (``edgediff eval-default --autoencode`` judges it on ground-truth scenes)."""
        arr = np.asarray(images)
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or not arr.shape[0]:
            raise InputError(f"autoencode takes (N, H, W, 3) uint8 images, not {arr.dtype} {arr.shape}")
        h, w = arr.shape[1:3]
        if h % self.size_multiple or w % self.size_multiple:
            raise InputError(f"image size {h}x{w}: height and width must be multiples of {self.size_multiple} "
                             "for this model")
        m = self.bundle.manifest
        if "vae_encoder" not in m.components:
            raise BundleError(f"{self.bundle.root} has no vae_encoder; re-export the bundle to include it")
        x = np.ascontiguousarray((arr.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2))  # (N, 3, H, W)
        with self._call_lock or nullcontext():
            with self.components.use("vae_encoder") as enc:
                out = self._run(enc, {"sample": x})[0]
            # the posterior mean (first half of the diagonal Gaussian's parameters); scaling and shift cancel out
            z = out[:, :m.latent_channels] if out.shape[1] == 2 * m.latent_channels else out
            with self.components.use("vae_decoder") as dec:
                decoded = self._run(dec, {"latent_sample": np.ascontiguousarray(z)})[0]
        self._finite(decoded, "vae_decode", "vae_decoder")
        return img.to_uint8(decoded)

    # -- stages ----------------------------------------------------------------------------------------------
    def _negatives(self, negative_prompt, count: int) -> list[str]:
        if negative_prompt is None:
            return [""] * count
        negs = check.prompts(negative_prompt, what="negative_prompt")
        if len(negs) == 1:
            return negs * count
        if len(negs) != count:
            raise InputError(f"negative_prompt has {len(negs)} entries for {count} prompts; give one, or one per prompt")
        return negs

    def _encode(self, prompts: list[str], negatives: list[str] | None, n: int, watch: Stopwatch) -> Conditioning:
        texts = prompts if negatives is None else negatives + prompts  # diffusers' order: [uncond; cond]
        with watch.span("tokenize"):
            ids = self.tokenizer.encode(texts)  # (T, L) int64
        with self.components.use("text_encoder") as te, watch.span("text_encoder"):
            hidden = self._run(te, {"input_ids": ids})[0]  # (T, L, D) float32
        hidden = np.repeat(hidden, n, axis=0)  # each prompt's embedding for each of its n images, as diffusers does
        return Conditioning(encoder_hidden_states=np.ascontiguousarray(hidden), guided=negatives is not None)

    def _initial_latents(self, latents, shape, noise: NoiseSource) -> np.ndarray:
        if latents is None:
            return noise.standard_normal(shape)  # (N, C, H/f, W/f) float32
        x = np.asarray(latents)
        if x.shape != shape:
            raise InputError(f"latents have shape {x.shape}; expected {shape} for this size and number of images")
        if not np.issubdtype(x.dtype, np.floating):
            raise InputError(f"latents must be floating point, not {x.dtype}")
        return np.ascontiguousarray(x, dtype=np.float32)

    def _img2img_latents(self, init, sched, steps: int, strength: float, total: int, noise: NoiseSource, watch) -> np.ndarray:
        m = self.bundle.manifest
        # diffusers' get_timesteps: skip the first (1 - strength) of the schedule
        init_steps = min(int(steps * strength), steps)
        if init_steps < 1:
            raise InputError(f"strength={strength} with {steps} steps runs no denoising step; raise either")
        t_start = steps - init_steps
        sched.set_begin_index(t_start * sched.order)
        with self.components.use("vae_encoder") as enc, watch.span("vae_encode"):
            out = self._run(enc, {"sample": np.repeat(init, total, axis=0)})[0]
        if out.shape[1] == 2 * m.latent_channels:  # diagonal Gaussian parameters: sample it with our noise
            mean, logvar = np.split(out, 2, axis=1)
            std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
            z = mean + std * noise.standard_normal(mean.shape)
        else:  # optimum's vae_encoder already returns a sample
            z = out
        z = (z - np.float32(m.shift_factor or 0.0)) * np.float32(m.scaling_factor)
        eps = noise.standard_normal(z.shape)
        return sched.add_noise(z.astype(np.float32), eps, sched.begin_index)

    def _denoise(self, x, cond: Conditioning, sched, g: float, noise, callback, cancel, watch: Stopwatch) -> np.ndarray:
        total = len(sched.timesteps)
        precision = self.bundle.component("unet").precision
        with self.components.use("unet") as unet:
            for i in range(sched.begin_index, total):
                if cancel is not None and cancel():
                    raise Cancelled(f"generation cancelled before step {i + 1} of {total}")
                t = sched.timesteps[i]
                with watch.span("step", i):
                    x_in = np.concatenate([x, x]) if cond.guided else x  # (2N or N, C, h, w)
                    with watch.span("scheduler", i):
                        x_in = sched.scale_model_input(x_in, i)
                    feeds = {"sample": x_in, "timestep": np.full((x_in.shape[0],), t, np.float32),
                             "encoder_hidden_states": cond.encoder_hidden_states, **cond.extra}
                    with watch.span("unet", i):
                        eps = self._run(unet, feeds)[0]  # (2N or N, C, h, w) float32
                    with watch.span("scheduler", i):
                        if cond.guided:  # classifier-free guidance (Ho & Salimans 2022): e_u + g (e_c - e_u)
                            eps_u, eps_c = np.split(eps, 2)
                            eps = eps_u + np.float32(g) * (eps_c - eps_u)
                        x = sched.step(eps, i, x, noise)
                    if not np.isfinite(x).all():
                        raise NonFiniteError(f"latents became NaN/Inf at step {i + 1} of {total} (unet precision "
                                             f"{precision}); try an fp32 bundle or another scheduler")
                if callback is not None:
                    callback(i + 1, total, float(t), x)
        return x

    def _postprocess(self, decoded: np.ndarray, output_type: str) -> list:
        if output_type == "np":
            return list(img.to_float(decoded))
        from PIL import Image

        return [Image.fromarray(a) for a in img.to_uint8(decoded)]

    # -- helpers ---------------------------------------------------------------------------------------------
    def _run(self, backend, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Cast feeds to the graph's declared dtypes and outputs back to float32."""
        specs = {s.name: s for s in backend.inputs}
        cast = {k: np.ascontiguousarray(v, dtype=specs[k].dtype) if k in specs else v for k, v in feeds.items()}
        outs = backend.run(cast)
        return [np.asarray(outs[s.name], dtype=np.float32) if outs[s.name].dtype.kind == "f" else outs[s.name]
                for s in backend.outputs]

    def _finite(self, arr: np.ndarray, stage: str, component: str) -> None:
        if not np.isfinite(arr).all():
            precision = self.bundle.component(component).precision
            raise NonFiniteError(f"{stage} produced NaN/Inf ({component} precision {precision}); "
                                 "this would be a black image: use an fp32 VAE")

    def _static_size(self) -> tuple[int, int] | None:
        """(height, width) when the denoiser's spatial dims are fixed (``edgediff optimize --static``)."""
        shape = self.bundle.component("unet").input("sample").shape
        f = self.bundle.manifest.vae_scale_factor
        if isinstance(shape[2], int) and isinstance(shape[3], int):
            return shape[2] * f, shape[3] * f
        return None

    def _check_static(self, h: int, w: int, unet_batch: int, images: int, guided: bool) -> None:
        """A static-shape bundle runs one size and batch only: say which, before any work."""
        shape = self.bundle.component("unet").input("sample").shape
        fixed = self._static_size()
        if fixed is not None and fixed != (h, w):
            raise InputError(f"this bundle is fixed to {fixed[1]}x{fixed[0]} (built with edgediff optimize --static); "
                             f"use --size {fixed[1]}x{fixed[0]}, or the dynamic bundle for {w}x{h}")
        if isinstance(shape[0], int) and shape[0] != unet_batch:
            cfg = "with" if guided else "without"
            raise InputError(f"this bundle's denoiser is fixed to batch {shape[0]} (edgediff optimize --static); "
                             f"{images} image(s) {cfg} guidance need batch {unet_batch}: change the number of images "
                             "or the guidance, or use the dynamic bundle")

    def _check_memory(self, batch: int, h: int, w: int) -> None:
        f = self.bundle.manifest.vae_scale_factor
        heads = self._unet_config.get("attention_head_dim", 8)
        heads = max(heads) if isinstance(heads, (list, tuple)) else heads
        need = check.activation_bytes(batch=batch, latent_h=h // f, latent_w=w // f, attention_heads=int(heads),
                                      channels=self._unet_config.get("block_out_channels", [320]))
        have = check.available_memory()
        if have is not None and need > have:
            raise InputError(f"{w}x{h} with batch {batch} needs about {need / 2**30:.1f} GiB for the denoiser's "
                             f"activations; {have / 2**30:.1f} GiB is available: use a smaller size or fewer images")
