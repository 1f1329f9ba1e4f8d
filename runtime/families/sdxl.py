"""SDXL text conditioning, numpy only: what diffusers 0.42's StableDiffusionXLPipeline.encode_prompt and
_get_add_time_ids give, as the denoiser's inputs (``encoder_hidden_states`` plus ``extra`` = ``text_embeds``,
``time_ids``: the fields of the runtime's ``Conditioning``; the denoising loop does not change).

Two text towers: CLIP ViT-L (``text_encoder``, tokenizer pads with "<|endoftext|>") and OpenCLIP ViT-bigG with its
projection (``text_encoder_2``, tokenizer pads with "!"). Each gives its penultimate hidden state; they are
concatenated along the features ((N, 77, 768 + 1280) for SDXL), and the projected pooled embedding of the second one
is ``text_embeds``. The refiner has only the second tower.

    config = SdxlTextConfig.from_bundle(bundle)
    towers = config.towers(config.tokenizers(bundle), [backend_1, backend_2])     # backends of config.encoders
    c = condition(towers, config, prompt=["a cat"], height=1024, width=1024, guided=True)
    Conditioning(c.encoder_hidden_states, c.guided, c.extra)
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .. import validation as check
from ..backends.base import Backend
from ..bundle import layout
from ..bundle.reader import Bundle
from ..errors import BundleError, InputError, NonFiniteError
from ..tokenizer import ClipTokenizer
from .sdxl_time_ids import MicroConditioning, batch_time_ids, check_add_embedding, time_id_rows

ENCODERS = ("text_encoder", "text_encoder_2")  # diffusers' order: CLIP-L first, OpenCLIP-G (with projection) second
TOKENIZER_DIRS = {"text_encoder": layout.TOKENIZER_DIR, "text_encoder_2": layout.TOKENIZER_2_DIR}
POOLED = "text_embeds"  # text_encoder_2's projected pooled output (optimum's name)


def penultimate_output(num_hidden_layers: int) -> str:
    """The graph output holding ``hidden_states[-2]`` (of layers + 1 hidden states), as optimum names it."""
    return f"hidden_states.{num_hidden_layers - 1}"


@dataclass(frozen=True)
class TextTower:
    """One text encoder as the conditioning uses it: its tokenizer, an open backend, the outputs it reads."""

    tokenizer: ClipTokenizer
    backend: Backend
    hidden: str  # penultimate hidden state output, (B, L, D) float32
    pooled: str | None = None  # projected pooled output, (B, P) float32; only text_encoder_2 has one


@dataclass(frozen=True)
class SdxlTextConfig:
    """What an SDXL bundle says about its text conditioning, read and checked once when it is opened."""

    encoders: tuple[str, ...]  # bundle components, in diffusers' order: both towers, or text_encoder_2 (refiner)
    hidden_outputs: tuple[str, ...]  # the penultimate hidden state output of each encoder
    force_zeros_for_empty_prompt: bool  # model_index.json: no negative prompt -> zero embeddings (SDXL base)
    requires_aesthetics_score: bool  # model_index.json: 5 time ids with an aesthetic score (the refiner)
    pooled_output: str = POOLED

    @property
    def time_ids(self) -> int:
        return 5 if self.requires_aesthetics_score else 6

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> "SdxlTextConfig":
        index = bundle.model_index
        flags = {}
        for key, default in (("force_zeros_for_empty_prompt", True), ("requires_aesthetics_score", False)):
            flags[key] = index.get(key, default)  # diffusers' pipeline defaults when model_index.json has none
            if not isinstance(flags[key], bool):
                raise BundleError(f"{bundle.root}/model_index.json: {key}={flags[key]!r}; expected true or false")
        encoders = tuple(e for e in ENCODERS if bundle.has(e))
        if "text_encoder_2" not in encoders:
            raise BundleError(f"{bundle.root}: an SDXL bundle needs text_encoder_2 (OpenCLIP-G with projection); "
                              "re-export it with edgediff export")
        hidden = []
        for enc in encoders:
            layers = bundle.config(layout.config_path(enc)).get("num_hidden_layers")
            if isinstance(layers, bool) or not isinstance(layers, int) or layers < 2:
                raise BundleError(f"{bundle.root}/{enc}/config.json: num_hidden_layers={layers!r}; expected an "
                                  "integer >= 2")
            hidden.append(_require_output(bundle, enc, penultimate_output(layers), "the penultimate hidden state"))
        pooled = _require_output(bundle, "text_encoder_2", POOLED, "the projected pooled embedding")
        width = bundle.component("text_encoder_2").output(pooled).shape[-1]
        if not isinstance(width, int):
            width = bundle.config(layout.config_path("text_encoder_2")).get("projection_dim")
        config = cls(encoders=encoders, hidden_outputs=tuple(hidden), **flags)
        check_add_embedding(bundle.unet_config, time_ids=config.time_ids, pooled_dim=int(width), where=str(bundle.root))
        return config

    def tokenizers(self, bundle: Bundle) -> tuple[ClipTokenizer, ...]:
        """One tokenizer per encoder, from its own folder (the two pad differently), padded to the encoders' length."""
        return tuple(ClipTokenizer.from_files(bundle.tokenizer_files(TOKENIZER_DIRS[e]),
                                              max_length=bundle.manifest.text_max_length,
                                              where=bundle.root / TOKENIZER_DIRS[e]) for e in self.encoders)

    def towers(self, tokenizers: Sequence[ClipTokenizer], backends: Sequence[Backend]) -> tuple[TextTower, ...]:
        """Pair tokenizers and open backends (both in ``encoders`` order) with the outputs to read."""
        if len(tokenizers) != len(self.encoders) or len(backends) != len(self.encoders):
            raise InputError(f"SDXL conditioning needs {len(self.encoders)} tokenizer(s) and backend(s) for "
                             f"{list(self.encoders)}, got {len(tokenizers)} and {len(backends)}")
        return tuple(TextTower(tok, be, hid, self.pooled_output if enc == "text_encoder_2" else None)
                     for enc, tok, be, hid in zip(self.encoders, tokenizers, backends, self.hidden_outputs))


@dataclass(frozen=True)
class PromptEmbeds:
    """encode_prompt's four results, already repeated for each image of a prompt (prompt-major)."""

    prompt_embeds: np.ndarray  # (N, L, D1 + D2) float32, N = prompts x images per prompt
    pooled_prompt_embeds: np.ndarray  # (N, P) float32
    negative_prompt_embeds: np.ndarray | None = None  # same shapes; None without guidance
    negative_pooled_prompt_embeds: np.ndarray | None = None


@dataclass(frozen=True)
class SdxlConditioning:
    """The denoiser's inputs besides latents and timestep; the same fields as the runtime's ``Conditioning``."""

    encoder_hidden_states: np.ndarray  # (2N, L, D) float32 [uncond; cond] when guided, else (N, L, D)
    guided: bool
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # text_embeds (2N, P), time_ids (2N, 6 or 5)


def encode_prompt(towers: Sequence[TextTower], prompt, prompt_2=None, *, negative_prompt=None, negative_prompt_2=None,
                  num_images_per_prompt: int = 1, do_classifier_free_guidance: bool = True,
                  force_zeros_for_empty_prompt: bool = True) -> PromptEmbeds:
    """diffusers' StableDiffusionXLPipeline.encode_prompt (clip_skip None, no LoRA, no precomputed embeddings).

    As there: ``prompt_2`` / ``negative_prompt_2`` go to the second tower and default (when None or empty) to
    ``prompt`` / ``negative_prompt``; with one tower (the refiner) only ``prompt`` / ``negative_prompt`` are read;
    no ``negative_prompt`` (None, not "") with ``force_zeros_for_empty_prompt`` gives zero negative embeddings.
    Unlike there, a single string for ``prompt_2`` or a negative applies to every prompt.
    """
    if not towers or sum(t.pooled is not None for t in towers) != 1:
        raise InputError("SDXL conditioning needs its text towers with exactly one pooled (projection) output")
    prompts = check.prompts(prompt)
    n = check.count(num_images_per_prompt)
    texts = [prompts, _per_prompt(prompt_2 or prompts, len(prompts), "prompt_2")]
    zero_negative = negative_prompt is None and force_zeros_for_empty_prompt
    encode_negative = do_classifier_free_guidance and not zero_negative
    if encode_negative:
        negative_prompt = negative_prompt or ""
        negatives = [_per_prompt(negative_prompt, len(prompts), "negative_prompt"),
                     _per_prompt(negative_prompt_2 or negative_prompt, len(prompts), "negative_prompt_2")]

    hidden, neg_hidden, pooled, neg_pooled = [], [], None, None
    for i, tower in enumerate(towers):  # zip semantics: the refiner's single tower reads the first prompt list
        batch = [*negatives[i], *texts[i]] if encode_negative else texts[i]  # one run: [uncond; cond]
        ids = tower.tokenizer.encode(batch)  # (T, L) int64
        outs = _run(tower, ids)
        h = outs[tower.hidden]  # (T, L, D_i) float32
        p = outs[tower.pooled] if tower.pooled is not None else None  # (T, P) float32
        if encode_negative:
            neg_hidden.append(h[: len(prompts)])
            h = h[len(prompts):]
            if p is not None:
                neg_pooled, p = p[: len(prompts)], p[len(prompts):]
        hidden.append(h)
        pooled = p if p is not None else pooled
    prompt_embeds = np.concatenate(hidden, axis=-1)  # (B, L, sum D_i)
    if do_classifier_free_guidance and zero_negative:
        negative_embeds, neg_pooled = np.zeros_like(prompt_embeds), np.zeros_like(pooled)
    elif do_classifier_free_guidance:
        negative_embeds = np.concatenate(neg_hidden, axis=-1)
    else:
        negative_embeds, neg_pooled = None, None

    def per_image(a):  # each prompt's rows once per image: torch .repeat(1, n, 1).view(B * n, ...)
        return None if a is None else np.ascontiguousarray(np.repeat(a, n, axis=0), dtype=np.float32)

    return PromptEmbeds(per_image(prompt_embeds), per_image(pooled), per_image(negative_embeds), per_image(neg_pooled))


def denoiser_inputs(embeds: PromptEmbeds, time_ids: np.ndarray, negative_time_ids: np.ndarray, *,
                    pipeline: str) -> SdxlConditioning:
    """Stack [uncond; cond] as diffusers does before its loop: prompt_embeds, add_text_embeds, add_time_ids."""
    guided = embeds.negative_prompt_embeds is not None
    images = embeds.prompt_embeds.shape[0]
    ids = batch_time_ids(time_ids, negative_time_ids, images=images, guided=guided, pipeline=pipeline)
    if guided:
        hidden = np.concatenate([embeds.negative_prompt_embeds, embeds.prompt_embeds])  # (2N, L, D)
        pooled = np.concatenate([embeds.negative_pooled_prompt_embeds, embeds.pooled_prompt_embeds])  # (2N, P)
    else:
        hidden, pooled = embeds.prompt_embeds, embeds.pooled_prompt_embeds
    return SdxlConditioning(encoder_hidden_states=np.ascontiguousarray(hidden), guided=guided,
                            extra={"text_embeds": np.ascontiguousarray(pooled), "time_ids": np.ascontiguousarray(ids)})


def condition(towers: Sequence[TextTower], config: SdxlTextConfig, *, prompt, height: int, width: int,
              prompt_2=None, negative_prompt=None, negative_prompt_2=None, num_images_per_prompt: int = 1,
              guided: bool = True, micro: MicroConditioning = MicroConditioning(),
              pipeline: str = "txt2img") -> SdxlConditioning:
    """Everything above for one call: ``height`` x ``width`` is the output size (img2img: the init image's),
    ``pipeline`` "txt2img" or "img2img" picks which diffusers pipeline's micro-conditioning defaults apply."""
    # time ids first: a refiner asked for text-to-image fails before any encoder runs
    pos, neg = time_id_rows(height, width, micro, requires_aesthetics_score=config.requires_aesthetics_score,
                            pipeline=pipeline)
    embeds = encode_prompt(towers, prompt, prompt_2, negative_prompt=negative_prompt,
                           negative_prompt_2=negative_prompt_2, num_images_per_prompt=num_images_per_prompt,
                           do_classifier_free_guidance=guided,
                           force_zeros_for_empty_prompt=config.force_zeros_for_empty_prompt)
    return denoiser_inputs(embeds, pos, neg, pipeline=pipeline)


def _per_prompt(value, count: int, what: str) -> list[str]:
    items = check.prompts(value, what=what)
    if len(items) == 1:
        return items * count
    if len(items) != count:
        raise InputError(f"{what} has {len(items)} entries for {count} prompts; give one, or one per prompt")
    return items


def _run(tower: TextTower, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Run one tower on token ids cast to its graph's declared dtype; its outputs as float32, checked finite."""
    spec = next((s for s in tower.backend.inputs if s.name == "input_ids"), None)
    name = getattr(tower.backend, "component", "text encoder")
    if spec is None:
        raise BundleError(f"{name}: the graph has no 'input_ids' input; it has {[s.name for s in tower.backend.inputs]}")
    outs = tower.backend.run({"input_ids": np.ascontiguousarray(ids, dtype=spec.dtype)})
    result = {}
    for key in (tower.hidden, tower.pooled):
        if key is None:
            continue
        if key not in outs:
            raise BundleError(f"{name}: the graph gave no {key!r} output; it gave {sorted(outs)}")
        a = np.asarray(outs[key], dtype=np.float32)
        if not np.isfinite(a).all():
            raise NonFiniteError(f"{name} produced NaN/Inf in {key!r}; verify the bundle (edgediff inspect --verify)")
        result[key] = a
    return result


def _require_output(bundle: Bundle, component: str, name: str, what: str) -> str:
    have = [s.name for s in bundle.component(component).outputs]
    if name not in have:
        raise BundleError(f"{bundle.root}: {component} has no {name!r} output ({what} SDXL uses; it has {have}); "
                          "re-export the bundle with edgediff export")
    return name


class SdxlTextConditioner:
    """The runtime's text conditioner for SDXL bundles (base, refiner, Turbo): both towers' tokenizers and outputs
    read once at load; per call the encoders run through the pipeline's components and ``condition`` builds the
    denoiser inputs. Options it reads from ``GenerationRequest.extra``: ``prompt_2``, ``negative_prompt_2`` and the
    micro-conditioning (``micro``: a ``MicroConditioning``)."""

    options = frozenset({"prompt_2", "negative_prompt_2", "original_size", "crops_coords_top_left", "target_size",
                         "negative_original_size", "negative_crops_coords_top_left", "negative_target_size",
                         "aesthetic_score", "negative_aesthetic_score"})

    def __init__(self, bundle: Bundle):
        self.config = SdxlTextConfig.from_bundle(bundle)
        self.tokenizers = self.config.tokenizers(bundle)
        self.refiner = self.config.requires_aesthetics_score

    def prepare(self, options: dict, *, img2img: bool) -> dict:
        """Check a call's SDXL options before any work; what ``__call__`` reads back from ``request.extra``."""
        micro_keys = self.options - {"prompt_2", "negative_prompt_2"}
        micro = MicroConditioning(**{k: options[k] for k in micro_keys if options.get(k) is not None})
        if self.refiner and not img2img:
            raise InputError("this is an SDXL refiner bundle: it refines an image (image= / --init-image, e.g. the "
                             "base's latents with denoising_start); use an SDXL base bundle for text-to-image")
        extra = {"micro": micro}
        for key in ("prompt_2", "negative_prompt_2"):
            if options.get(key) is not None:
                extra[key] = check.prompts(options[key], what=key)
        return extra

    def __call__(self, request, components, watch) -> "Conditioning":
        from ..conditioning import Conditioning

        extra = request.extra
        with ExitStack() as stack:
            backends = [stack.enter_context(components.use(name)) for name in self.config.encoders]
            towers = self.config.towers(self.tokenizers, backends)
            with watch.span("text_encoder"):
                c = condition(towers, self.config, prompt=list(request.prompts), height=request.height,
                              width=request.width, prompt_2=extra.get("prompt_2"),
                              negative_prompt=None if not request.guided or not request.negative_given
                              else list(request.negatives),
                              negative_prompt_2=extra.get("negative_prompt_2"),
                              num_images_per_prompt=request.images_per_prompt, guided=request.guided,
                              micro=extra.get("micro", MicroConditioning()),
                              pipeline="img2img" if request.img2img else "txt2img")
        return Conditioning(encoder_hidden_states=c.encoder_hidden_states, guided=c.guided, extra=c.extra)
