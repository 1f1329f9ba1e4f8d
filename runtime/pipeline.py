"""txt2img and img2img over a bundle, with numpy schedulers and any Backend: the denoising loop of diffusers'
StableDiffusionPipeline / StableDiffusionImg2ImgPipeline, computed without PyTorch.

Thread safety: a Pipeline may be called from several threads at once. Each call builds its own scheduler state,
noise streams and arrays; the backends are shared, and ONNX Runtime sessions are safe to run concurrently. In
low-memory mode calls are serialized (each one loads and frees the components it uses).
"""
from __future__ import annotations

import threading
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import cfg_cutoff as cutoff
from . import deepcache
from . import images as img
from . import controlnet
from . import inpaint
from . import presets
from . import tiny_vae
from . import vae_tiling as tiling
from . import validation as check
from .bundle import layout
from .bundle.reader import Bundle
from .components import Components
from .conditioning import Conditioning, TextConditioner
from .errors import BundleError, InputError, NonFiniteError
from .families import text_conditioner
from .job import DenoiseJob, StepCallback, StepExtension
from .noise import NoiseSource, make_noise, seeds_for
from .request import GenerationRequest
from .rows import ROW_BACKENDS, run_in_rows
from .schedulers import make_scheduler, name_for_class
from .schedulers.config import SchedulerConfig
from .stages import run_component
from .timing import Span, Stopwatch

__all__ = ["Pipeline", "GenerationResult", "GenerationRequest", "Conditioning"]



@dataclass(frozen=True)
class GenerationResult:
    images: list  # PIL.Image.Image per image (or (H, W, 3) float32 arrays with output_type="np")
    seeds: tuple[int, ...]  # the seed of each image's noise stream: pass it back to reproduce that image
    timings: dict[str, float]  # seconds per stage (summed over steps) and "total"
    spans: tuple[Span, ...] = ()  # raw per-stage/per-step spans, for the bench harness and traces
    parameters: dict[str, Any] = field(default_factory=dict)  # what produced the images (PNG metadata)
    latents: np.ndarray | None = None  # (N, C, H/f, W/f) float32 with output_type="latent": pass on as image=

    def image_parameters(self, k: int, **more: Any) -> dict[str, Any]:
        """The parameters that reproduce image ``k`` alone (its own seed), plus ``more`` (e.g. the backend)."""
        return dict(self.parameters, seed=self.seeds[k], **more)


class Pipeline:
    def __init__(self, bundle: Bundle, components: Components, conditioner: TextConditioner,
                 scheduler_config: SchedulerConfig, default_scheduler: str):
        self.bundle = bundle
        self.components = components
        self.conditioner = conditioner
        self.scheduler_config = scheduler_config
        self.default_scheduler = default_scheduler
        self.size_multiple = bundle.size_multiple
        self._call_lock = threading.Lock() if components.low_memory else None
        # low-memory mode runs the denoiser one batch row at a time: classifier-free guidance's two halves in turn,
        # so its activations (SDXL 1024x1024: ~2.4 GB a row) are held for one row only (runtime/rows.py)
        self._denoiser_rows = 1 if components.low_memory and components.backend in ROW_BACKENDS else None
        self._loras = None  # the LoRAs applied (runtime/lora/apply.py AppliedLoras), set by load / set_loras

    # -- loading ---------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, backend: str = "cpu", *, scheduler: str | None = None, low_memory: bool = False,
             options: Any = None, verify: bool = True, loras: Any = None) -> "Pipeline":
        """Open a bundle. ``backend``: "cpu", "cuda", "tensorrt" (ONNX Runtime providers). ``scheduler``: a name
        from ``edgediff.schedulers.SCHEDULERS``; default: the bundle's own. ``loras``: ``{"file.safetensors":
        weight, ...}`` applied without re-export (``set_loras`` swaps them; runtime/lora/)."""
        if not isinstance(path, (str, Path)):
            raise InputError(f"Pipeline.load takes a bundle folder path, not {type(path).__name__}")
        low_memory = check.flag(low_memory, what="low_memory")
        verify = check.flag(verify, what="verify")
        bundle = Bundle.open(path)
        conditioner = text_conditioner(bundle)  # refuses families this runtime cannot run, before any session
        raw = bundle.config(layout.SCHEDULER_CONFIG)
        sched_cfg = SchedulerConfig.from_dict(raw, source=f"{bundle.root}/{layout.SCHEDULER_CONFIG}")
        default = name_for_class(raw.get("_class_name", "PNDMScheduler"))
        if scheduler is not None:
            make_scheduler(scheduler, sched_cfg)  # fail now, listing the names, not at the first call
        from .lora import apply_loras

        applied = apply_loras(bundle, loras, verify=verify)  # every LoRA checked before any session opens
        components = Components(bundle, backend, options, low_memory=low_memory, verify=verify,
                                weights=applied.weights)
        pipe = cls(bundle, components, conditioner, sched_cfg, scheduler or default)
        pipe._loras = applied
        return pipe

    @property
    def loras(self) -> dict[str, float]:
        """The LoRAs applied, file -> weight ({} for none)."""
        return self._loras.as_dict() if self._loras is not None else {}

    def set_loras(self, loras: Any) -> None:
        """Swap the LoRAs (``{"file.safetensors": weight, ...}``; ``{}`` returns to the bundle's own weights)
        without re-export: the weights are recomputed from the bundle's base weights and only the components they
        change are reopened. Every file is checked first; on any error the pipeline keeps its LoRAs. Call it
        between generations."""
        from .lora.session import swap_loras

        self._loras = swap_loras(self.bundle, self.components, self._loras, loras)

    def close(self) -> None:
        self.components.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def default_steps(self) -> int:
        """The bundle's recommended step count, else the runtime's DEFAULT_STEPS."""
        return self.bundle.default_steps

    @property
    def default_guidance(self) -> float:
        """The bundle's recommended guidance scale, else its family's diffusers default."""
        return self.bundle.default_guidance

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
        strength: float | None = None,
        mask_image: Any = None,
        padding_mask_crop: int | None = None,
        scheduler: str | None = None,
        callback: StepCallback | None = None,
        cancel: Callable[[], bool] | None = None,
        output_type: str = "pil",
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        cfg_cutoff: float | None = None,
        decoder: str = "full",
        vae_tiling: bool | None = None,
        vae_tile_size: int | None = None,
        preset: str | None = None,
        cache_interval: int | None = None,
        cache_branch: int | None = None,
        cache_schedule: str | None = None,
        cache_center: int | None = None,
        cache_pow: float | None = None,
        control_image: Any = None,
        controlnet_conditioning_scale: float | Sequence[float] | None = None,
        control_guidance_start: float | Sequence[float] | None = None,
        control_guidance_end: float | Sequence[float] | None = None,
        guess_mode: bool | None = None,
        controlnets: str | Sequence[str] | None = None,
        **family_options: Any,
    ) -> GenerationResult:
        """Generate images. Keyword names follow diffusers' StableDiffusionPipeline. With ``image=`` (a path or
        PIL image) this is img2img: the image is noised to ``strength`` (default 0.8) and denoised from there.
        With ``mask_image=`` too it is inpainting (runtime/inpaint.py; white is repainted; ``strength`` and
        ``padding_mask_crop`` as in diffusers' StableDiffusion(XL)InpaintPipeline, default strength 1.0 / SDXL 0.9999).
        Steps and guidance left as None take the bundle's recommended ones (``default_steps``, ``default_guidance``).
        Every argument is checked before any work (``request``); ``callback(step, total, t, latents)`` is called
        after each step and ``cancel()`` before each.

        ``denoising_end`` / ``denoising_start`` (fractions of the schedule) split one schedule between two models,
        diffusers' ensemble of experts: the base stops at ``denoising_end`` with ``output_type="latent"`` and the
        refiner continues from those latents (``image=result.latents``) at ``denoising_start``. A family's own
        arguments (SDXL: ``prompt_2``, ``negative_prompt_2``, ``original_size``, ``crops_coords_top_left``,
        ``target_size``, their ``negative_`` forms, ``aesthetic_score``, ``negative_aesthetic_score``; SD3:
        ``prompt_2``, ``prompt_3``, ``negative_prompt_2``, ``negative_prompt_3``, ``max_sequence_length``,
        ``clip_skip``) are passed by name as in diffusers; one the bundle's family does not take is refused.

        Speed options (each off by default): ``cfg_cutoff`` in [0, 1] stops classifier-free guidance after that
        fraction of the steps (diffusers' SDCFGCutoffCallback; no effect on an unguided call); ``decoder="tiny"``
        decodes with the bundle's tiny autoencoder (export --tiny-vae); ``vae_tiling`` True/False forces/forbids
        tiled VAE decode and encode (default: tiled only when the full one would not fit in memory) and
        ``vae_tile_size`` sets its tile in pixels (default the VAE's sample_size, as diffusers; smaller tiles lower
        the peak memory further);
        ``cache_interval=N`` runs DeepCache (runtime/deepcache.py): the full UNet every N-th step, the shallow graph
        of ``cache_branch`` (default 0) with the cached deep feature between (export --deepcache B);
        ``cache_schedule="quadratic"`` places the same number of full steps by the paper's non-uniform power law
        around step ``cache_center`` (default floor(0.3 x steps)) with exponent ``cache_pow`` (default 1.2).
        ``preset="lcm"`` (runtime/presets.py) sets the LCM-LoRA recipe: scheduler lcm, 4 steps, guidance 1.0; steps,
        guidance or scheduler given in the call win over it.

        ControlNet (a bundle exported with --controlnet; runtime/controlnet.py): ``control_image`` (one per ControlNet)
        for the ``controlnets`` named (default: the bundle's only one), with diffusers' ``controlnet_conditioning_scale``,
        ``control_guidance_start``/``end`` (a number, or one per ControlNet) and ``guess_mode``; with ``image=`` it is
        diffusers' ControlNet img2img."""
        callback = check.hook(callback, what="callback")
        cancel = check.hook(cancel, what="cancel")
        req = self.request(prompt, negative_prompt, num_inference_steps=num_inference_steps,
                           guidance_scale=guidance_scale, height=height, width=width,
                           num_images_per_prompt=num_images_per_prompt, seed=seed, rng=rng, latents=latents,
                           image=image, strength=strength, mask_image=mask_image,
                           padding_mask_crop=padding_mask_crop, scheduler=scheduler, output_type=output_type,
                           denoising_start=denoising_start, denoising_end=denoising_end, cfg_cutoff=cfg_cutoff,
                           decoder=decoder, vae_tiling=vae_tiling, vae_tile_size=vae_tile_size, preset=preset,
                           cache_interval=cache_interval,
                           cache_branch=cache_branch, cache_schedule=cache_schedule, cache_center=cache_center,
                           cache_pow=cache_pow, control_image=control_image,
                           controlnet_conditioning_scale=controlnet_conditioning_scale,
                           control_guidance_start=control_guidance_start, control_guidance_end=control_guidance_end,
                           guess_mode=guess_mode, controlnets=controlnets, **family_options)
        return self.generate(req, callback=callback, cancel=cancel)

    def request(self, prompt, negative_prompt=None, *, num_inference_steps=None, guidance_scale=None, height=None,
                width=None, num_images_per_prompt=1, seed=None, rng="numpy", latents=None, image=None, strength=None,
                mask_image=None, padding_mask_crop=None,
                scheduler=None, output_type="pil", denoising_start=None, denoising_end=None, cfg_cutoff=None,
                decoder="full", vae_tiling=None, vae_tile_size=None, preset=None, cache_interval=None,
                cache_branch=None, cache_schedule=None, cache_center=None, cache_pow=None,
                control_image=None, controlnet_conditioning_scale=None, control_guidance_start=None,
                control_guidance_end=None, guess_mode=None, controlnets=None,
                **family_options) -> GenerationRequest:
        """Validate and resolve a call's arguments (same names as ``__call__``) into a ``GenerationRequest``;
        raises InputError naming the first bad one. Nothing is loaded or run."""
        m = self.bundle.manifest
        if preset is not None:  # runtime/presets.py: its steps/guidance/scheduler where the call names none
            num_inference_steps, guidance_scale, scheduler = presets.resolve(
                preset, self.bundle, steps=num_inference_steps, guidance=guidance_scale, scheduler=scheduler)
        prompts = check.prompts(prompt)
        if hasattr(self.conditioner, "check_guidance"):  # the call's own value: FLUX.1-schnell has no guidance input
            self.conditioner.check_guidance(guidance_scale)
        steps = check.steps(self.default_steps if num_inference_steps is None else num_inference_steps,
                            max_steps=self.scheduler_config.num_train_timesteps)
        g = check.guidance(self.default_guidance if guidance_scale is None else guidance_scale)
        n = check.count(num_images_per_prompt)
        output_type = check.output_type(output_type)
        scheduler = scheduler or self.default_scheduler
        schedule = make_scheduler(scheduler, self.scheduler_config)  # unknown name: now; its steps once h, w are known
        cfg = getattr(self.conditioner, "classifier_free_guidance", True)  # False: g is a model input (LCM)
        if not cfg and negative_prompt not in (None, ""):  # "" (e.g. a form's empty field) asks for nothing
            raise InputError(f"negative_prompt does not apply to this {m.family} bundle: its guidance is distilled into "
                             "the model (no unconditional branch, guidance_scale sets its strength); drop it")
        guided = cfg and g > 1.0
        negatives = self._negatives(negative_prompt, len(prompts)) if guided else None
        if hasattr(self.conditioner, "check_prompts"):  # e.g. SD's weighting grammar: a bad bracket fails now
            self.conditioner.check_prompts(prompts, negatives)
        unknown = sorted(set(family_options) - self.conditioner.options)
        if unknown:
            takes = ", ".join(sorted(self.conditioner.options)) or "none"
            raise InputError(f"{unknown[0]}= does not apply to this {m.family} bundle (its family's own arguments: "
                             f"{takes})")
        start = check.fraction(denoising_start, what="denoising_start")
        end = check.fraction(denoising_end, what="denoising_end")
        if start is not None and end is not None and start >= end:
            raise InputError(f"denoising_start={start} must be below denoising_end={end}")
        init = init_latents = inpainting = None
        if mask_image is not None or padding_mask_crop is not None:  # runtime/inpaint.py
            inpainting = inpaint.prepare(self.bundle, image, mask_image, padding_mask_crop=padding_mask_crop,
                                         height=height, width=width, multiple=self.size_multiple, latents=latents,
                                         denoising_start=start, denoising_end=end, output_type=output_type)
            strength = check.strength(inpaint.default_strength(self.bundle) if strength is None else strength)
            init = inpainting.image
            height, width = init.shape[2], init.shape[3]
        elif image is not None:
            if latents is not None:
                raise InputError("latents= is for text-to-image; with image= the starting latents come from the "
                                 "image: drop one of them")
            if start is not None and strength is not None:
                raise InputError("give strength or denoising_start, not both: with denoising_start the schedule "
                                 "starts there and strength does not apply")
            if start is None:
                # diffusers' img2img default: 0.8, or the family's (FluxImg2ImgPipeline: 0.6)
                strength = check.strength(getattr(self.conditioner, "img2img_strength", 0.8) if strength is None
                                          else strength)
            if isinstance(image, np.ndarray) and image.ndim == 4 and image.shape[1] == m.latent_channels:
                init_latents = self._init_latents(image, len(prompts) * n)  # latents handed on by a base model
                ih, iw = init_latents.shape[2] * m.vae_scale_factor, init_latents.shape[3] * m.vae_scale_factor
            else:
                init = img.load_image(image, multiple=self.size_multiple)
                ih, iw = init.shape[2], init.shape[3]
            if (height is not None or width is not None) and (height, width) != (ih, iw):
                raise InputError(f"height/width {width}x{height} differ from the init image's {iw}x{ih}; "
                                 "img2img keeps the image's size: drop height/width or resize the image")
            height, width = ih, iw
        elif strength is not None:
            raise InputError("strength only applies to img2img: give an init image (image= / --init-image) or "
                             "drop strength")
        elif start is not None:
            raise InputError("denoising_start continues from an image or latents: give image= (e.g. the base "
                             "model's latents from output_type='latent' with denoising_end)")
        if inpainting is None:
            inpaint.check_plain(self.bundle)  # an inpainting UNet needs its mask
        extra = self.conditioner.prepare(family_options, img2img=image is not None)
        control = controlnet.prepare(  # runtime/controlnet.py; its control image may set the size
            self.bundle, control_image, controlnets=controlnets, scale=controlnet_conditioning_scale,
            start=control_guidance_start, end=control_guidance_end, guess_mode=guess_mode, height=height,
            width=width, multiple=self.size_multiple, total=len(prompts) * n, inpainting=inpainting is not None,
            loras=self.loras)
        if control is not None:  # (DeepCache with ControlNet is refused by deepcache.check_request below)
            height, width = control.height, control.width
        h, w = check.size(height, width, multiple=self.size_multiple,
                          default=self._static_size() or (m.default_height, m.default_width))
        self.set_timesteps(schedule, steps, h, w, strength)  # a bad count (or schedule input) fails now
        total = len(prompts) * n
        self._check_static(h, w, total * (2 if guided else 1), total, guided)
        self._check_memory(total * (2 if guided else 1), h, w)
        cfg_cutoff = cutoff.check_cutoff(cfg_cutoff)
        cache_interval, cache_branch = deepcache.check_request(self.bundle, cache_interval, cache_branch,
                                                               cfg_cutoff=cfg_cutoff, loras=self.loras,
                                                               controlnet=control)
        cache_schedule, cache_center, cache_pow = deepcache.check_schedule(cache_schedule, cache_center, cache_pow,
                                                                           interval=cache_interval, steps=steps)
        decoder = tiny_vae.check_decoder(self.bundle, decoder)
        vae_tiling = tiling.check_flag(vae_tiling)
        vae_tile_size = tiling.check_tile_size(self.bundle, vae_tile_size, vae_tiling)
        tiling.check_request(self.bundle, vae_tiling, latent=(h // m.vae_scale_factor, w // m.vae_scale_factor),
                             batch=total, img2img=init is not None, tile_px=vae_tile_size)
        seeds = seeds_for(seed, total)
        if isinstance(rng, str):
            noise = make_noise(rng, seeds)
        elif callable(getattr(rng, "standard_normal", None)):
            noise = rng
        else:
            raise InputError(f"rng must be 'numpy', 'torch' or a NoiseSource (an object with standard_normal(shape)), "
                             f"not {type(rng).__name__}")
        shape = (total, m.latent_channels, h // m.vae_scale_factor, w // m.vae_scale_factor)
        lat = None if latents is None else self._initial_latents(latents, shape)
        return GenerationRequest(prompts=tuple(prompts), negatives=None if negatives is None else tuple(negatives),
                                 steps=steps, guidance_scale=g, height=h, width=w, images_per_prompt=n, seeds=seeds,
                                 noise=noise, scheduler=scheduler, output_type=output_type, latents=lat,
                                 init_image=init, init_latents=init_latents,
                                 strength=strength if image is not None else None,
                                 negative_given=negative_prompt is not None, denoising_start=start,
                                 denoising_end=end, rng=rng if isinstance(rng, str) else "custom", extra=extra,
                                 inpaint=inpainting,
                                 cfg_cutoff=cfg_cutoff, decoder=decoder, vae_tiling=vae_tiling,
                                 vae_tile_size=vae_tile_size,
                                 cache_interval=cache_interval, cache_branch=cache_branch,
                                 cache_schedule=cache_schedule, cache_center=cache_center, cache_pow=cache_pow,
                                 controlnet=control)

    def generate(self, req: GenerationRequest, *, callback: StepCallback | None = None,
                 cancel: Callable[[], bool] | None = None,
                 extensions: Sequence[StepExtension] = ()) -> GenerationResult:
        """Run a validated request (from ``request``), with optional step ``extensions``."""
        with self._call_lock or nullcontext():
            return self._generate(req, callback, cancel, extensions)

    def _generate(self, req: GenerationRequest, callback, cancel, extensions=()) -> GenerationResult:
        job = self.start(req, callback=callback, cancel=cancel, extensions=extensions)
        with ExitStack() as stack:  # each graph the steps use, opened once for the whole loop
            graphs: dict[str, object] = {}
            while not job.done:
                job.check_cancel()
                graph = job.graph()
                if graph not in graphs:
                    graphs[graph] = stack.enter_context(self.components.use(graph))
                feeds = job.unet_feeds()
                with job.watch.span(job.span_name(graph), job.step):
                    eps = self._denoise(graphs[graph], feeds)  # (2N or N, C, h, w) float32, checked finite
                job.advance(eps)
        return self.finish(job)

    def run_denoiser(self, graph: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """One denoiser call on the resident graph ``graph`` (the step-level scheduler's ``run``,
        runtime/batching.py): its first output, (B, C, h, w) float32, checked finite; a graph with several
        outputs (DeepCache's full UNet) gives them all, {name: array}, the noise prediction first."""
        return self._denoise(self.components.get(graph), feeds)

    def _denoise(self, backend, feeds: dict[str, np.ndarray]) -> np.ndarray | dict[str, np.ndarray]:
        outs = run_in_rows(lambda f: self._run(backend, f), backend, feeds, self._denoiser_rows)
        return outs[0] if len(outs) == 1 else {s.name: a for s, a in zip(backend.outputs, outs)}

    # -- the steps of a generation, for step-level schedulers (runtime/batching.py) ------------------------------
    def start(self, req: GenerationRequest, *, callback: StepCallback | None = None,
              cancel: Callable[[], bool] | None = None, extensions: Sequence[StepExtension] = ()) -> DenoiseJob:
        """Text conditioning, timesteps and initial latents of a validated request: a job ready for its first
        denoising step. Run its steps (``job.graph``, ``job.unet_feeds`` -> that graph -> ``job.advance``), then
        ``finish``. ``extensions`` change what each step computes (runtime/job.py, StepExtension)."""
        m = self.bundle.manifest
        watch = Stopwatch()
        t0 = time.perf_counter()
        sched = make_scheduler(req.scheduler, self.scheduler_config)
        shape = (req.total_images, m.latent_channels, req.height // m.vae_scale_factor, req.width // m.vae_scale_factor)
        cond = self.conditioner(req, self.components, watch)
        self.set_timesteps(sched, req.steps, req.height, req.width, req.strength)
        if req.inpaint is not None:  # its own starting latents, and the step extension that applies the mask
            x, masking = inpaint.begin(self.bundle, self.components, req, sched, watch)
            extensions = (masking, *extensions)
        elif not req.img2img:
            x = req.latents if req.latents is not None else req.noise.standard_normal(shape)  # (N, C, h, w)
            x = x * np.float32(sched.init_noise_sigma)
        else:
            x = self._img2img_latents(req, sched, watch)
        return DenoiseJob(request=req, scheduler=sched, cond=cond, x=x, end=self._end_index(req, sched), watch=watch,
                          start_time=t0, callback=callback, cancel=cancel,
                          extensions=(*controlnet.extensions_for(req, self.components, self.bundle),
                                      *extensions, *cutoff.extensions_for(req),
                                                  *deepcache.extensions_for(req)), denoiser=self.bundle.denoiser)

    def finish(self, job: DenoiseJob) -> GenerationResult:
        """Decode a job's latents (unless output_type="latent") into the call's result."""
        return self._result(job, None if job.request.output_type == "latent" else self._decode([job]))

    def finish_many(self, jobs: Sequence[DenoiseJob]) -> list[GenerationResult | BaseException]:
        """``finish`` for several jobs, one decoder call for each group whose latents and decoding settings agree
        (a step-level scheduler's finished jobs). The decoder computes each row on its own, so every result is the
        one ``finish`` gives; a group whose shared call fails is decoded job by job, so each failure is its own."""
        out: dict[int, GenerationResult | BaseException] = {}
        groups: dict[tuple, list[int]] = {}
        for k, job in enumerate(jobs):
            r = job.request
            if r.output_type == "latent":
                out[k] = self._settle(job, None)
            else:
                groups.setdefault((job.x.shape[1:], r.decoder, r.vae_tiling, r.vae_tile_size), []).append(k)
        for members in groups.values():
            try:
                decoded = self._decode([jobs[k] for k in members])
            except Exception:
                for k in members:
                    out[k] = self._settle(jobs[k], "alone")
                continue
            offset = 0
            for k in members:
                n = jobs[k].x.shape[0]
                out[k] = self._settle(jobs[k], decoded[offset:offset + n])
                offset += n
        return [out[k] for k in range(len(jobs))]

    def _settle(self, job: DenoiseJob, decoded) -> GenerationResult | BaseException:
        try:
            if isinstance(decoded, str):  # "alone": decode this job by itself
                return self.finish(job)
            return self._result(job, decoded)
        except Exception as exc:
            return exc

    def _decode(self, jobs: Sequence[DenoiseJob]) -> np.ndarray:
        """The decoder's pixels for these jobs' latents, concatenated: (sum N, 3, H, W) float32 in [-1, 1]."""
        m, req = self.bundle.manifest, jobs[0].request
        x = jobs[0].x if len(jobs) == 1 else np.concatenate([j.x for j in jobs])
        t0 = time.perf_counter()
        if req.decoder == "tiny":
            decoded = tiny_vae.decode(self.components, self.bundle, x)
        else:
            z = x / np.float32(m.scaling_factor) + np.float32(m.shift_factor or 0.0)
            decoded = tiling.run_vae(self.components, self.bundle, "vae_decoder", z, req.vae_tiling, req.vae_tile_size)
        t1 = time.perf_counter()
        for j in jobs:
            j.watch.spans.append(Span("vae_decode", t0, t1))
        return decoded

    def _result(self, job: DenoiseJob, decoded: np.ndarray | None) -> GenerationResult:
        """The call's result from its decoded pixels (None: output_type="latent", the latents themselves)."""
        req, watch = job.request, job.watch
        latents_out = None
        if decoded is None:  # handed on undecoded (diffusers' output_type="latent")
            latents_out, out = job.x, list(job.x)
        else:
            pixels = img.to_uint8(decoded)  # (N, H, W, 3) uint8: what the user gets, judged and converted once
            self._check_not_constant(pixels)
            with watch.span("postprocess"):
                out = self._postprocess(decoded, pixels, req.output_type)
                if req.inpaint is not None and req.inpaint.crop is not None:  # padding_mask_crop: paste back
                    out = inpaint.overlay(req.inpaint, out)
        watch.spans.append(Span("total", job.start_time, time.perf_counter()))
        params = dict(prompt=list(req.prompts), negative_prompt=None if req.negatives is None else list(req.negatives),
                      steps=req.steps, scheduler=job.scheduler.name, guidance_scale=req.guidance_scale,
                      height=req.height, width=req.width, strength=req.strength, bundle=self.bundle.digest)
        if self.loras:  # the LoRAs applied (files and weights) are part of what made these images
            params["loras"] = self.loras
        for key in ("denoising_start", "denoising_end", "cfg_cutoff"):
            if getattr(req, key) is not None:
                params[key] = getattr(req, key)
        if deepcache.extensions_for(req):  # DeepCache ran (interval >= 2)
            params.update(cache_interval=req.cache_interval, cache_branch=req.cache_branch)
            if req.cache_schedule != "uniform":  # the default schedule leaves the record as it was
                params.update(cache_schedule=req.cache_schedule, cache_center=req.cache_center,
                              cache_pow=req.cache_pow)
        if req.inpaint is not None:
            params.update(req.inpaint.parameters())
        if req.controlnet is not None:
            params.update(req.controlnet.parameters())
        if req.decoder != "full" and req.output_type != "latent":
            params["decoder"] = req.decoder
        return GenerationResult(images=out, seeds=req.seeds, timings=watch.totals(), spans=tuple(watch.spans),
                                parameters=params, latents=latents_out)

    def preview(self, latents) -> list:
        """Cheap preview images of a step callback's latents ((N, C, h, w)) through the bundle's tiny decoder
        (export --tiny-vae): e.g. every k steps, ``callback=lambda i, n, t, x: i % k or pipe.preview(x)[0].save(...)``.
        Safe to call from a callback (it takes no call lock)."""
        return tiny_vae.preview(self.components, self.bundle, latents)

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

    def _initial_latents(self, latents, shape) -> np.ndarray:
        x = np.asarray(latents)
        if x.shape != shape:
            raise InputError(f"latents have shape {x.shape}; expected {shape} for this size and number of images")
        if not np.issubdtype(x.dtype, np.floating):
            raise InputError(f"latents must be floating point, not {x.dtype}")
        if not np.isfinite(x).all():
            raise InputError("latents contain NaN/Inf; pass finite values (or no latents: they are drawn from the seed)")
        return np.ascontiguousarray(x, dtype=np.float32)

    def _init_latents(self, image: np.ndarray, total: int) -> np.ndarray:
        """Latents given as the init image ((1 or N, C, h, w), already scaled: another model's output)."""
        m = self.bundle.manifest
        if image.shape[0] not in (1, total):
            raise InputError(f"image= latents have batch {image.shape[0]}; give 1 or one per image ({total})")
        if not np.issubdtype(image.dtype, np.floating) or not np.isfinite(image).all():
            raise InputError("image= latents must be finite floating-point values")
        h, w = image.shape[2] * m.vae_scale_factor, image.shape[3] * m.vae_scale_factor
        check.size(h, w, multiple=self.size_multiple, default=(h, w))
        x = np.ascontiguousarray(image, dtype=np.float32)
        return np.repeat(x, total, axis=0) if x.shape[0] == 1 and total > 1 else x

    def _img2img_latents(self, req: GenerationRequest, sched, watch: Stopwatch) -> np.ndarray:
        """The starting latents of img2img and where in the schedule they start (diffusers' get_timesteps)."""
        m = self.bundle.manifest
        if req.denoising_start is None:  # skip the first (1 - strength) of the schedule, then noise to that level
            run = getattr(self.conditioner, "img2img_steps", None)  # a family whose pipeline rounds otherwise (SD3)
            init_steps = run(req.steps, req.strength) if run else min(int(req.steps * req.strength), req.steps)
            if init_steps < 1:
                raise InputError(f"strength={req.strength} with {req.steps} steps runs no denoising step; raise either")
            sched.set_begin_index((req.steps - init_steps) * sched.order)
        else:  # ensemble of experts: start where the previous model stopped, from its latents, adding no noise
            cutoff = self._cutoff(req.denoising_start)
            remaining = int((sched.timesteps < cutoff).sum())
            if sched.order == 2 and remaining % 2 == 0:  # second-order solvers take steps in pairs
                remaining += 1
            if remaining < 1:
                raise InputError(f"denoising_start={req.denoising_start} with {req.steps} steps leaves no step to "
                                 "run; lower it or raise the steps")
            sched.set_begin_index(len(sched.timesteps) - remaining)
        if req.init_latents is not None:
            z = req.init_latents
        else:
            with watch.span("vae_encode"):
                image = np.repeat(req.init_image, req.total_images, axis=0)  # (N, 3, H, W)
                out = tiling.run_vae(self.components, self.bundle, "vae_encoder", image, req.vae_tiling,
                                     req.vae_tile_size)
            if out.shape[1] == 2 * m.latent_channels:  # diagonal Gaussian parameters: sample it with our noise
                mean, logvar = np.split(out, 2, axis=1)
                std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
                z = mean + std * req.noise.standard_normal(mean.shape)
            else:  # optimum's vae_encoder already returns a sample
                z = out
            z = ((z - np.float32(m.shift_factor or 0.0)) * np.float32(m.scaling_factor)).astype(np.float32)
        if req.denoising_start is not None:
            return z
        eps = req.noise.standard_normal(z.shape)
        return sched.add_noise(z, eps, sched.begin_index)

    def set_timesteps(self, sched, steps: int, height: int, width: int, strength: float | None = None) -> None:
        """``sched.set_timesteps`` with what the family's pipeline also passes, as every caller that needs this
        bundle's schedule must call it (the bench's like-for-like check too): the conditioner's optional
        ``schedule_inputs(steps, height, width)``: FLUX's mu from the image's token count and its sigmas; and for
        img2img its optional ``img2img_schedule(sched, strength)``: an LCM's timesteps within ``strength``)."""
        family = getattr(self.conditioner, "schedule_inputs", None)
        inputs = dict(family(steps, height, width)) if family is not None else {}
        partial = getattr(self.conditioner, "img2img_schedule", None)
        if strength is not None and partial is not None:
            inputs.update(partial(sched, strength))
        sched.set_timesteps(steps, **inputs)

    def _cutoff(self, fraction: float) -> int:
        """The training timestep at ``fraction`` of the way from pure noise (diffusers' discrete_timestep_cutoff)."""
        T = self.scheduler_config.num_train_timesteps
        return int(round(T - fraction * T))

    def _end_index(self, req: GenerationRequest, sched) -> int:
        """One past the last step to run: all of them, or those at or above ``denoising_end``'s cutoff."""
        total = len(sched.timesteps)
        if req.denoising_end is None:
            return total
        end = int((sched.timesteps >= self._cutoff(req.denoising_end)).sum())
        if end <= sched.begin_index:
            raise InputError(f"denoising_end={req.denoising_end} with {req.steps} steps leaves no step to run; raise "
                             "it or the steps")
        return end

    def _postprocess(self, decoded: np.ndarray, pixels: np.ndarray, output_type: str) -> list:
        if output_type == "np":
            return list(img.to_float(decoded))
        from PIL import Image

        return [Image.fromarray(a) for a in pixels]

    # -- helpers ---------------------------------------------------------------------------------------------
    def _run(self, backend, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run a component; NaN/Inf in its outputs is reported by that component."""
        return run_component(backend, feeds, precision=self.bundle.component(backend.component).precision)

    def _check_not_constant(self, pixels: np.ndarray) -> None:
        """A decoder that saturates (every pixel at -1 or +1) or returns one flat colour is broken, not an image:
        refuse it rather than write an all-black, all-white or flat PNG. Judged on the uint8 pixels the user gets."""
        flat = [k for k in range(len(pixels)) if (pixels[k] == pixels[k, :1, :1]).all()]
        if flat:
            rgb = tuple(int(v) for v in pixels[flat[0], 0, 0])
            precision = self.bundle.component("vae_decoder").precision
            raise NonFiniteError(f"vae_decoder returned a constant image (every pixel RGB {rgb}) for image "
                                 f"{flat[0]}: the decoder is broken, not the prompt (precision {precision}); verify "
                                 "the bundle (edgediff inspect --verify) or use an fp32 VAE")

    def _static_size(self) -> tuple[int, int] | None:
        """(height, width) when the denoiser's spatial dims are fixed (``edgediff optimize --static``)."""
        shape = self.bundle.component(self.bundle.denoiser).input("sample").shape
        f = self.bundle.manifest.vae_scale_factor
        if isinstance(shape[2], int) and isinstance(shape[3], int):
            return shape[2] * f, shape[3] * f
        return None

    def _check_static(self, h: int, w: int, unet_batch: int, images: int, guided: bool) -> None:
        """A static-shape bundle runs one size and batch only: say which, before any work."""
        shape = self.bundle.component(self.bundle.denoiser).input("sample").shape
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
        unet_config = self.bundle.unet_config
        if self.bundle.denoiser != "unet":  # a transformer: its heads, and attention over its tokens, each
            # size_multiple pixels square (VAE factor x patch size, x 2 for FLUX's packing: Bundle.size_multiple)
            heads, f = int(unet_config.get("num_attention_heads", 8)), self.bundle.size_multiple
        else:
            heads = check.unet_attention_heads(unet_config)
        need = check.activation_bytes(batch=batch, latent_h=h // f, latent_w=w // f, attention_heads=heads,
                                      channels=unet_config.get("block_out_channels", [320]))
        have = check.available_memory()
        if have is not None and need > have:
            raise InputError(f"{w}x{h} with batch {batch} needs about {need / 2**30:.1f} GiB for the denoiser's "
                             f"activations; {have / 2**30:.1f} GiB is available: use a smaller size or fewer images")
