"""Stable Diffusion 1.x / 2.x text conditioning: one CLIP tokenizer and text encoder, last hidden state
(diffusers' StableDiffusionPipeline.encode_prompt with clip_skip=None), plus A1111-style long and weighted prompts
(runtime/prompt_weights.py): a plain prompt of up to 75 tokens gives exactly diffusers' embeddings."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .. import prompt_weights
from ..bundle.reader import Bundle
from ..components import Components
from ..conditioning import Conditioning
from ..request import GenerationRequest
from ..stages import run_component
from ..timing import Stopwatch
from ..tokenizer import ClipTokenizer


# backends whose denoiser engines fix the text axis at the encoder's length whatever the bundle says: the native
# TensorRT engines of `edgediff build` (engines/tensorrt/profiles.py builds "sequence" as text_max_length)
FIXED_TEXT_BACKENDS = ("trt",)


def takes_long_prompts(bundle: Bundle) -> bool:
    """True when the denoiser's text axis is symbolic (an exported bundle): it attends over any number of tokens,
    so prompts longer than the text encoder's window can be given as several chunks. A bundle made static
    (``edgediff optimize --static``) fixes it at the encoder's length: prompts are cut there, with a warning."""
    shape = bundle.component("unet").input("encoder_hidden_states").shape
    return len(shape) == 3 and not isinstance(shape[1], int)


class SdTextConditioner:
    options: frozenset[str] = frozenset()  # SD 1.x/2.x take no family-specific arguments

    def __init__(self, bundle: Bundle):
        # exactly the pinned, checked tokenizer files: a file planted beside them is never read
        self.tokenizer = ClipTokenizer.from_files(bundle.tokenizer_files(), max_length=bundle.manifest.text_max_length,
                                                  where=bundle.root / "tokenizer")
        self.long_prompts = takes_long_prompts(bundle)

    def prepare(self, options: dict, *, img2img: bool) -> dict:
        return {}

    def check_prompts(self, prompts: Sequence[str], negatives: Sequence[str] | None) -> None:
        """The weighting grammar of every prompt, before any work: an unbalanced bracket is one InputError."""
        for what, texts in (("prompt", prompts), ("negative_prompt", negatives or ())):
            for k, text in enumerate(texts):
                prompt_weights.parse(text, what=what if len(texts) == 1 else f"{what} {k}")

    def __call__(self, request: GenerationRequest, components: Components, watch: Stopwatch) -> Conditioning:
        texts = list(request.prompts) if not request.guided else [*request.negatives, *request.prompts]  # [uncond; cond]
        with watch.span("tokenize"):
            tokens = prompt_weights.weighted_tokens(self.tokenizer, texts)
            long = self.long_prompts and getattr(components, "backend", None) not in FIXED_TEXT_BACKENDS
            chunks = prompt_weights.chunk(self.tokenizer, tokens, long=long)
        t, c, length = chunks.ids.shape  # T texts, C chunks of the encoder's length each
        with components.use("text_encoder") as te, watch.span("text_encoder"):
            hidden = run_component(te, {"input_ids": chunks.ids.reshape(t * c, length)})[0]  # (T * C, L, D) float32
        hidden = chunks.apply(hidden)  # (T, C * L, D): weighted, chunks side by side
        # each prompt's embedding for each of its n images, as diffusers does
        hidden = np.repeat(hidden, request.images_per_prompt, axis=0)
        return Conditioning(encoder_hidden_states=np.ascontiguousarray(hidden), guided=request.guided)
