"""FLUX.1 (schnell and dev) text conditioning and schedule inputs, numpy only: what diffusers 0.42's
FluxPipeline.encode_prompt and its timestep set-up give, as the transformer's inputs.

Two text towers (export/components_flux.py names their graphs' I/O): CLIP ViT-L (``text_encoder``) gives only its
pooled output, (B, 768) -> ``pooled_projections``; T5 v1.1 XXL (``text_encoder_2``) gives (B, L, 4096) for
L = ``max_sequence_length`` tokens -> ``encoder_hidden_states``. ``prompt_2`` goes to T5 and defaults to ``prompt``.

Guidance is not classifier-free: FLUX.1-dev is guidance-distilled and takes ``guidance_scale`` as one more input
(``guidance``, one value per row; FluxPipeline's default 3.5); schnell has no such input. So the runtime runs one
batch per step (``classifier_free_guidance = False``: the pipeline then refuses a ``negative_prompt``) and the
conditioning is never ``guided``. FluxPipeline's ``true_cfg_scale`` (a second, negative-prompt pass) is refused
above 1 (its default, which turns it off): the loop's guidance combines with ``guidance_scale``, which here means
the distilled input, so it cannot be expressed without a second scale in the loop.

The packed 2x2 latents and the position ids live in the exported transformer graph (why: components_flux.py),
so the loop, the initial noise and the flow scheduler see (B, C, h, w) latents exactly as FluxPipeline draws them
before packing. The schedule: FluxPipeline passes ``sigmas = np.linspace(1, 1/n, n)`` and ``mu`` from the image's
token count (h/16 x w/16 at 8x VAE downsampling) to the scheduler, also for schnell (whose config does not use it):
``schedule_inputs`` gives both to ``set_timesteps`` (runtime/schedulers/flow_shift.py).

Refused with one line: ``guidance_scale`` on a schnell bundle (its transformer has no guidance input; diffusers
ignores the value silently), ``max_sequence_length`` above the bundle's exported limit, ``true_cfg_scale`` > 1.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import validation as check
from ..bundle import layout
from ..bundle.reader import Bundle
from ..components import Components
from ..conditioning import Conditioning
from ..errors import BundleError, InputError
from ..request import GenerationRequest
from ..schedulers.config import SchedulerConfig
from ..schedulers.flow_shift import flux_sigmas, mu_for
from ..stages import run_component
from ..t5_tokenizer import T5_LIMIT, T5Tokenizer, sequence_length
from ..timing import Stopwatch
from ..tokenizer import ClipTokenizer

CLIP_ENCODER, T5_ENCODER = "text_encoder", "text_encoder_2"
POOLED, T5_STATES = "pooler_output", "last_hidden_state"  # the towers' graph outputs (components_flux.py)
GUIDANCE = "guidance"  # FLUX.1-dev's transformer input
# FluxPipeline's max_sequence_length default is 512; FLUX.1-schnell's model card runs 256 (its T5 was trained so)
DEFAULT_LENGTH = {"schnell": 256, "dev": 512}


class FluxTextConditioner:
    """The runtime's conditioner for FLUX bundles: tokenizers, the variant and the limits read once at load."""

    options: frozenset[str] = frozenset({"prompt_2", "max_sequence_length", "true_cfg_scale"})
    classifier_free_guidance = False  # guidance_scale is dev's distilled guidance input: one batch per step
    img2img_strength = 0.6  # FluxImg2ImgPipeline's default strength (SD's img2img: 0.8)

    def __init__(self, bundle: Bundle):
        m = bundle.manifest
        for name in (CLIP_ENCODER, T5_ENCODER, bundle.denoiser):
            bundle.component(name)  # a missing component is one BundleError now, not at the first call
        _require_output(bundle, CLIP_ENCODER, POOLED)
        _require_output(bundle, T5_ENCODER, T5_STATES)
        inputs = {s.name for s in bundle.component(bundle.denoiser).inputs}
        configured = bundle.unet_config.get("guidance_embeds", False)
        if configured != (GUIDANCE in inputs):  # the variant is the config's; the graph must agree
            raise BundleError(f"{bundle.root}: transformer/config.json has guidance_embeds={configured!r} but the "
                              f"graph {'lacks' if configured else 'has'} a {GUIDANCE!r} input; re-export the bundle")
        self.variant = "dev" if GUIDANCE in inputs else "schnell"
        self.clip = ClipTokenizer.from_files(bundle.tokenizer_files(layout.TOKENIZER_DIR), max_length=m.text_max_length,
                                             where=bundle.root / layout.TOKENIZER_DIR)
        self.t5 = T5Tokenizer.from_files(bundle.tokenizer_files(layout.TOKENIZER_2_DIR))
        self.max_sequence_length = m.max_sequence_length or T5_LIMIT  # the longest T5 prompt the bundle takes
        self.default_length = min(DEFAULT_LENGTH[self.variant], self.max_sequence_length)
        self.vae_scale_factor = m.vae_scale_factor
        self.scheduler_config = SchedulerConfig.from_dict(bundle.config(layout.SCHEDULER_CONFIG),
                                                          source=f"{bundle.root}/{layout.SCHEDULER_CONFIG}")

    # -- checks before any work ------------------------------------------------------------------------------
    def check_guidance(self, guidance_scale) -> None:
        """``guidance_scale`` as the call gave it (None: not given). schnell has nothing to apply it to: 0 (its model
        card's value, and its bundle's recorded default) is accepted as "none", any other value refused."""
        if guidance_scale is not None and guidance_scale != 0 and self.variant == "schnell":
            raise InputError(f"guidance_scale={guidance_scale} does not apply to FLUX.1-schnell: its transformer has "
                             "no guidance input (diffusers' FluxPipeline ignores the value); drop it, or use a "
                             "FLUX.1-dev bundle")

    def prepare(self, options: dict[str, Any], *, img2img: bool) -> dict[str, Any]:
        """Check a call's FLUX options; what ``__call__`` reads back from ``request.extra``."""
        extra: dict[str, Any] = {}
        if options.get("prompt_2") is not None:
            extra["prompt_2"] = check.prompts(options["prompt_2"], what="prompt_2")
        true_cfg = options.get("true_cfg_scale")
        if true_cfg is not None:
            if isinstance(true_cfg, bool) or not isinstance(true_cfg, (int, float)) or not math.isfinite(true_cfg):
                raise InputError(f"true_cfg_scale={true_cfg!r}; expected a number (1 turns it off)")
            if true_cfg > 1:
                raise InputError(f"true_cfg_scale={true_cfg}: FluxPipeline's second, negative-prompt pass is not "
                                 "supported by this runtime; drop it (FLUX's guidance is guidance_scale, dev's "
                                 "distilled guidance input)")
        extra["max_sequence_length"] = sequence_length(options.get("max_sequence_length"), default=self.default_length,
                                                       limit=self.max_sequence_length)
        return extra

    # -- schedule ----------------------------------------------------------------------------------------------
    def schedule_inputs(self, steps: int, height: int, width: int) -> dict[str, Any]:
        """What FluxPipeline passes to set_timesteps besides the step count: mu from the packed image sequence
        length ((H / f / 2) x (W / f / 2) tokens, FluxPipeline's image_seq_len) and sigmas linspace(1, 1/n, n)."""
        f = self.vae_scale_factor
        tokens = (int(height) // f // 2) * (int(width) // f // 2)
        return {"mu": mu_for(self.scheduler_config, tokens), "sigmas": flux_sigmas(steps)}

    def img2img_steps(self, steps: int, strength: float) -> int:
        """Steps img2img runs: FluxImg2ImgPipeline.get_timesteps (as SD3's) rounds the skipped steps down,
        t_start = int(steps - min(steps * strength, steps))."""
        return steps - int(max(steps - min(steps * strength, steps), 0))

    # -- conditioning ----------------------------------------------------------------------------------------
    def __call__(self, request: GenerationRequest, components: Components, watch: Stopwatch) -> Conditioning:
        prompts = list(request.prompts)
        t5_prompts = _per_prompt(request.extra.get("prompt_2"), prompts)
        length = request.extra.get("max_sequence_length", self.default_length)
        with watch.span("tokenize"):
            clip_ids = self.clip.encode(prompts)  # (B, 77) int64
            t5_ids = self.t5.encode(t5_prompts, length)  # (B, L) int64
        with components.use(CLIP_ENCODER) as be, watch.span("text_encoder"):
            pooled = _output(be, run_component(be, {"input_ids": clip_ids}), POOLED)  # (B, 768) float32
        with components.use(T5_ENCODER) as be, watch.span("text_encoder"):
            states = _output(be, run_component(be, {"input_ids": t5_ids}), T5_STATES)  # (B, L, 4096) float32
        n = request.images_per_prompt  # each prompt's rows once per image (prompt-major, diffusers' repeat + view)
        extra = {"pooled_projections": np.ascontiguousarray(np.repeat(pooled, n, axis=0))}
        if self.variant == "dev":  # torch.full([1], guidance_scale).expand(B): (N,) float32
            extra[GUIDANCE] = np.full((len(prompts) * n,), request.guidance_scale, np.float32)
        return Conditioning(encoder_hidden_states=np.ascontiguousarray(np.repeat(states, n, axis=0)), guided=False,
                            extra=extra)


def _per_prompt(given, prompts: list[str]) -> list[str]:
    """``prompt_2`` for each prompt: one for all, one per prompt, or (None) the prompts themselves."""
    if given is None:
        return prompts
    if len(given) == 1:
        return list(given) * len(prompts)
    if len(given) != len(prompts):
        raise InputError(f"prompt_2 has {len(given)} entries for {len(prompts)} prompts; give one, or one per prompt")
    return list(given)


def _output(backend, outs: list[np.ndarray], name: str) -> np.ndarray:
    return outs[[s.name for s in backend.outputs].index(name)]


def _require_output(bundle: Bundle, component: str, name: str) -> None:
    have = [s.name for s in bundle.component(component).outputs]
    if name not in have:
        raise BundleError(f"{bundle.root}: {component} has no {name!r} output (FLUX reads it; it has {have}); "
                          "re-export the bundle with edgediff export")
