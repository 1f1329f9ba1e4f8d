"""Stable Diffusion 1.x / 2.x text conditioning: one CLIP tokenizer and text encoder, last hidden state
(diffusers' StableDiffusionPipeline.encode_prompt with clip_skip=None)."""
from __future__ import annotations

import numpy as np

from ..bundle.reader import Bundle
from ..components import Components
from ..conditioning import Conditioning
from ..request import GenerationRequest
from ..stages import run_component
from ..timing import Stopwatch
from ..tokenizer import ClipTokenizer


class SdTextConditioner:
    options: frozenset[str] = frozenset()  # SD 1.x/2.x take no family-specific arguments

    def __init__(self, bundle: Bundle):
        # exactly the pinned, checked tokenizer files: a file planted beside them is never read
        self.tokenizer = ClipTokenizer.from_files(bundle.tokenizer_files(), max_length=bundle.manifest.text_max_length,
                                                  where=bundle.root / "tokenizer")

    def prepare(self, options: dict, *, img2img: bool) -> dict:
        return {}

    def __call__(self, request: GenerationRequest, components: Components, watch: Stopwatch) -> Conditioning:
        texts = list(request.prompts) if not request.guided else [*request.negatives, *request.prompts]  # [uncond; cond]
        with watch.span("tokenize"):
            ids = self.tokenizer.encode(texts)  # (T, L) int64
        with components.use("text_encoder") as te, watch.span("text_encoder"):
            hidden = run_component(te, {"input_ids": ids})[0]  # (T, L, D) float32
        # each prompt's embedding for each of its n images, as diffusers does
        hidden = np.repeat(hidden, request.images_per_prompt, axis=0)
        return Conditioning(encoder_hidden_states=np.ascontiguousarray(hidden), guided=request.guided)
