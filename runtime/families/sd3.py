"""Stable Diffusion 3 / 3.5 text conditioning, numpy only: what diffusers 0.42's StableDiffusion3Pipeline.encode_prompt
gives, as the transformer's inputs (``encoder_hidden_states`` plus ``extra`` = ``pooled_projections``).

Three text towers (export/components_sd3.py names their graphs' I/O): CLIP ViT-L (``text_encoder``) and OpenCLIP
ViT-bigG (``text_encoder_2``), each giving its penultimate hidden state (B, 77, D; an earlier one with ``clip_skip``)
and its projected pooled embedding; and T5 v1.1 (``text_encoder_3``, optional) giving (B, L, J) for L =
``max_sequence_length`` tokens. The CLIP states
are concatenated on the feature axis and zero-padded to T5's width J (the transformer's joint_attention_dim), then
concatenated with T5's along the sequence: (B, 77 + L, J). Without T5 its part is zeros, as diffusers does with
``text_encoder_3=None``. The pooled input is concat(pooled_L, pooled_G).

Guidance is classifier-free (guided when guidance_scale > 1): the unconditional rows come first, from the negative
prompts ("" when none is given); ``negative_prompt_2`` / ``_3`` default to ``negative_prompt`` and ``prompt_2`` /
``prompt_3`` to ``prompt``, as in diffusers (whose ``prompt_2 or prompt`` also falls back on an empty string).

Refused with one line (diffusers would ignore them silently): ``prompt_3`` / ``negative_prompt_3`` on a bundle without
T5 (they would change nothing, which a caller who passes them does not expect), and ``max_sequence_length`` above
the length the bundle was exported for (``Manifest.max_sequence_length``; re-export with a longer one).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .. import validation as check
from ..bundle import layout
from ..bundle.reader import Bundle
from ..components import Components
from ..conditioning import Conditioning
from ..errors import BundleError, InputError
from ..request import GenerationRequest
from ..stages import run_component
from ..t5_tokenizer import T5Tokenizer, sequence_length
from ..timing import Stopwatch
from ..tokenizer import ClipTokenizer

CLIP_ENCODERS = ("text_encoder", "text_encoder_2")  # CLIP-L, OpenCLIP-G: diffusers' concatenation order
T5_ENCODER = "text_encoder_3"
POOLED = "text_embeds"
DEFAULT_MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default call length; also the limit of older bundles


def _layers(bundle: Bundle, enc: str) -> int:
    """The tower's layer count, after checking its graph has the penultimate state (what clip_skip None reads)."""
    layers = bundle.config(layout.config_path(enc)).get("num_hidden_layers")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 2:
        raise BundleError(f"{bundle.root}/{enc}/config.json: num_hidden_layers={layers!r}; expected an integer >= 2")
    if _state(layers, 0) not in {o.name for o in bundle.component(enc).outputs}:
        raise BundleError(f"{bundle.root}: {enc} has no output {_state(layers, 0)!r} (the penultimate hidden state); "
                          "re-export the bundle with edgediff export")
    return layers


def _state(layers: int, clip_skip: int) -> str:
    """The graph output diffusers reads with ``clip_skip``: hidden_states[-(clip_skip + 2)] of layers + 1 states."""
    return f"hidden_states.{layers - 1 - clip_skip}"


class Sd3TextConditioner:
    options: frozenset[str] = frozenset({"prompt_2", "prompt_3", "negative_prompt_2", "negative_prompt_3",
                                         "max_sequence_length", "clip_skip"})

    def __init__(self, bundle: Bundle):
        m = bundle.manifest
        for name in (*CLIP_ENCODERS, bundle.denoiser):
            bundle.component(name)  # a missing tower is one BundleError now, not at the first call
        self.layers = {enc: _layers(bundle, enc) for enc in CLIP_ENCODERS}
        self.outputs = {enc: {o.name for o in bundle.component(enc).outputs} for enc in CLIP_ENCODERS}
        dirs = {"text_encoder": layout.TOKENIZER_DIR, "text_encoder_2": layout.TOKENIZER_2_DIR}
        self.tokenizers = {enc: ClipTokenizer.from_files(bundle.tokenizer_files(dirs[enc]),
                                                         max_length=m.text_max_length, where=bundle.root / dirs[enc])
                           for enc in CLIP_ENCODERS}
        self.t5 = None  # a T5-less bundle (diffusers' text_encoder_3=None)
        if bundle.has(T5_ENCODER):
            self.t5 = T5Tokenizer.from_files(bundle.tokenizer_files(layout.TOKENIZER_3_DIR))
        self.max_sequence_length = m.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH
        # T5's width = the transformer's joint_attention_dim (the text axis of its encoder_hidden_states)
        width = bundle.component(bundle.denoiser).input("encoder_hidden_states").shape[-1]
        self.joint_dim = int(width) if isinstance(width, int) else int(bundle.unet_config["joint_attention_dim"])

    def prepare(self, options: dict[str, Any], *, img2img: bool) -> dict[str, Any]:
        """Check a call's SD3 options before any work; what ``__call__`` reads back from ``request.extra``."""
        extra: dict[str, Any] = {}
        for key in ("prompt_2", "prompt_3", "negative_prompt_2", "negative_prompt_3"):
            if options.get(key) == "":  # diffusers' `prompt_2 or prompt`: an empty string falls back, as None does
                continue
            if options.get(key) is not None:
                if key.endswith("_3") and self.t5 is None:
                    raise InputError(f"{key}= goes to T5 (text_encoder_3), which this bundle was exported without; "
                                     "drop it (diffusers would ignore it silently), or use a bundle exported with "
                                     "text_encoder_3")
                extra[key] = check.prompts(options[key], what=key)
        default = min(DEFAULT_MAX_SEQUENCE_LENGTH, self.max_sequence_length)  # diffusers' default, not the limit
        extra["max_sequence_length"] = sequence_length(options.get("max_sequence_length"), default=default,
                                                       limit=self.max_sequence_length)
        extra["clip_skip"] = self._clip_skip(options.get("clip_skip"))
        return extra

    def _clip_skip(self, k) -> int:
        """diffusers' clip_skip: layers skipped from the end of both CLIP towers (None: 0, the penultimate state)."""
        if k is None:
            return 0
        most = min(self.layers.values()) - 1
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= most:
            raise InputError(f"clip_skip={k!r}; expected an integer from 0 to {most} (layers skipped from the end of "
                             "the CLIP text encoders)")
        for enc, layers in self.layers.items():
            if _state(layers, int(k)) not in self.outputs[enc]:
                raise InputError(f"clip_skip={k}: this bundle's {enc} was exported with its penultimate state only; "
                                 "re-export it with this edgediff to use clip_skip")
        return int(k)

    def img2img_steps(self, steps: int, strength: float) -> int:
        """Steps img2img runs: StableDiffusion3Img2ImgPipeline.get_timesteps rounds the skipped steps down
        (t_start = int(steps - min(steps * strength, steps))), where SD's pipelines round the run steps down."""
        return steps - int(max(steps - min(steps * strength, steps), 0))

    def __call__(self, request: GenerationRequest, components: Components, watch: Stopwatch) -> Conditioning:
        extra, n = request.extra, request.images_per_prompt
        count = len(request.prompts)
        streams = [self._texts(extra, "prompt", list(request.prompts), count, k) for k in (1, 2, 3)]
        if request.guided:  # [uncond; cond] rows, one batch per encoder
            negs = list(request.negatives)
            streams = [[*self._texts(extra, "negative_prompt", negs, count, k), *s] for k, s in zip((1, 2, 3), streams)]
        uncond = count if request.guided else 0  # rows of negative prompts, first
        hidden, pooled = self._encode(streams, extra["max_sequence_length"], extra["clip_skip"], uncond, components,
                                      watch)
        # each prompt's embedding for each of its n images (prompt-major, diffusers' repeat + view)
        hidden, pooled = np.repeat(hidden, n, axis=0), np.repeat(pooled, n, axis=0)
        return Conditioning(encoder_hidden_states=np.ascontiguousarray(hidden), guided=request.guided,
                            extra={"pooled_projections": np.ascontiguousarray(pooled)})

    @staticmethod
    def _texts(extra: dict, base: str, default: list[str], count: int, k: int) -> list[str]:
        """The texts of stream ``k`` (1: CLIP-L, 2: OpenCLIP-G, 3: T5): ``<base>_k`` if given, else ``default``."""
        if k == 1:
            return default
        given = extra.get(f"{base}_{k}")
        if given is None:
            return default
        if len(given) == 1:
            return list(given) * count
        if len(given) != count:
            raise InputError(f"{base}_{k} has {len(given)} entries for {count} prompts; give one, or one per prompt")
        return list(given)

    def _encode(self, streams: Sequence[list[str]], length: int, clip_skip: int, uncond: int, components: Components,
                watch: Stopwatch) -> tuple[np.ndarray, np.ndarray]:
        """(B, 77 + length, J) text states and (B, P_L + P_G) pooled embeddings of the three text streams, whose
        first ``uncond`` rows are negative prompts: diffusers' encode_prompt applies clip_skip to the prompts only
        (the negatives always take the penultimate state)."""
        states, pooled = [], []
        for enc, texts in zip(CLIP_ENCODERS, streams):
            with watch.span("tokenize"):
                ids = self.tokenizers[enc].encode(texts)  # (B, 77) int64
            with components.use(enc) as be, watch.span("text_encoder"):
                outs = dict(zip([o.name for o in be.outputs], run_component(be, {"input_ids": ids})))
            state = outs[_state(self.layers[enc], clip_skip)]  # (B, 77, D) float32
            if clip_skip and uncond:
                state = np.concatenate([outs[_state(self.layers[enc], 0)][:uncond], state[uncond:]])
            states.append(state)
            pooled.append(outs[POOLED])  # (B, P) float32
        clip = np.concatenate(states, axis=-1)  # (B, 77, D_L + D_G)
        d = clip.shape[-1]
        # torch.nn.functional.pad(clip, (0, J - d)): zeros up to T5's width (a negative pad would crop)
        if d <= self.joint_dim:
            clip = np.pad(clip, ((0, 0), (0, 0), (0, self.joint_dim - d)))  # (B, 77, J)
        else:
            clip = clip[..., :self.joint_dim]
        if self.t5 is None:  # diffusers' text_encoder_3=None: zeros of the joint width
            t5 = np.zeros((clip.shape[0], length, self.joint_dim), np.float32)  # (B, L, J)
        else:
            with watch.span("tokenize"):
                ids = self.t5.encode(streams[2], length)  # (B, L) int64
            with components.use(T5_ENCODER) as be, watch.span("text_encoder"):
                t5 = run_component(be, {"input_ids": ids})[0]  # (B, L, J) float32
        hidden = np.concatenate([clip.astype(np.float32), t5], axis=1)  # (B, 77 + L, J)
        return hidden, np.concatenate(pooled, axis=-1)  # (B, P_L + P_G)
