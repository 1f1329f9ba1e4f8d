"""SDXL-shaped diffusers pipelines with random weights (the SDXL presets of ``random_pipeline``).

Tiny ones are the test fixtures; ``sdxl`` / ``sdxl-turbo`` have the real SDXL base layer sizes (stabilityai/
stable-diffusion-xl-base-1.0 and sdxl-turbo configs), for measuring memory and speed, which do not depend on weight
values. Each component is built, saved and freed in turn, so the full-size build holds one model at a time (the
UNet is 2.6 B parameters, 10.3 GB in fp32), and ``model_index.json`` is written as diffusers' save_pretrained
writes it. The tokenizers are CLIP-format BPE folders trained on a small built-in corpus: ``tokenizer`` pads with
"<|endoftext|>" like CLIP ViT-L's, ``tokenizer_2`` with "!" like OpenCLIP ViT-bigG's in SDXL.
"""
from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

SDXL_PRESETS = ("tiny-sdxl", "tiny-sdxl-refiner", "sdxl", "sdxl-turbo")
CLIP_VOCAB_SIZE = 49408  # the real CLIP vocabulary: full-size presets get the real embedding tables
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class SdxlSpec:
    """What one preset is made of; every field is a constructor argument dict of the diffusers/transformers class."""

    pipeline_class: str  # StableDiffusionXLPipeline | StableDiffusionXLImg2ImgPipeline
    text_encoder: dict[str, Any] | None  # CLIPTextConfig kwargs of CLIP ViT-L (None: the refiner has no first tower)
    text_encoder_2: dict[str, Any]  # CLIPTextConfig kwargs of OpenCLIP ViT-bigG (CLIPTextModelWithProjection)
    unet: dict[str, Any]
    vae: dict[str, Any]
    scheduler_class: str  # EulerDiscreteScheduler (SDXL) | EulerAncestralDiscreteScheduler (SDXL-Turbo)
    scheduler: dict[str, Any]
    pipeline_config: dict[str, Any]  # registered pipeline flags (force_zeros_for_empty_prompt, requires_aesthetics_score)
    full_vocab: bool  # embedding tables of CLIP's real vocabulary size instead of the trained tokenizer's


def _text(hidden: int, intermediate: int, layers: int, heads: int, act: str, projection: int) -> dict[str, Any]:
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, hidden_act=act, projection_dim=projection, max_position_embeddings=77)


# SDXL base 1.0 configs (text_encoder = CLIP ViT-L/14, text_encoder_2 = OpenCLIP ViT-bigG/14)
_CLIP_L = _text(768, 3072, 12, 12, "quick_gelu", 768)
_CLIP_G = _text(1280, 5120, 32, 20, "gelu", 1280)
_SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    # 2816 = pooled OpenCLIP-G projection (1280) + 6 time ids x addition_time_embed_dim (256)
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
_SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=1024, layers_per_block=2,
                 block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, force_upcast=True)
_SCHED = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              steps_offset=1, prediction_type="epsilon")

# Tiny: the two towers differ in width (32 vs 48) and the projection (24) differs from both, so a swapped
# concatenation order or a hidden state taken for the pooled one changes shapes instead of passing silently.
# Three layers each, so the penultimate hidden state differs from the last one.
_TINY_L = _text(32, 37, 3, 4, "quick_gelu", 32)
_TINY_G = _text(48, 64, 3, 4, "gelu", 24)
_TIME_DIM = 8  # tiny addition_time_embed_dim


def _tiny_unet(cross_attention_dim: int, time_ids: int) -> dict[str, Any]:
    return dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=cross_attention_dim, addition_embed_type="text_time", addition_time_embed_dim=_TIME_DIM,
        projection_class_embeddings_input_dim=_TINY_G["projection_dim"] + time_ids * _TIME_DIM, norm_num_groups=16,
    )


_TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=16, norm_num_groups=16,
                 block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=0.13025, force_upcast=True)


def sdxl_spec(preset: str) -> SdxlSpec:
    if preset not in SDXL_PRESETS:
        raise ValueError(f"preset {preset!r}; expected one of {list(SDXL_PRESETS)}")
    euler = dict(_SCHED, timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False)
    if preset == "tiny-sdxl":
        return SdxlSpec("StableDiffusionXLPipeline", _TINY_L, _TINY_G,
                        _tiny_unet(_TINY_L["hidden_size"] + _TINY_G["hidden_size"], 6), _TINY_VAE,
                        "EulerDiscreteScheduler", euler, dict(force_zeros_for_empty_prompt=True), False)
    if preset == "tiny-sdxl-refiner":  # like stable-diffusion-xl-refiner-1.0: OpenCLIP-G only, aesthetic score
        return SdxlSpec("StableDiffusionXLImg2ImgPipeline", None, _TINY_G, _tiny_unet(_TINY_G["hidden_size"], 5),
                        _TINY_VAE, "EulerDiscreteScheduler", euler,
                        dict(force_zeros_for_empty_prompt=False, requires_aesthetics_score=True), False)
    if preset == "sdxl":
        return SdxlSpec("StableDiffusionXLPipeline", _CLIP_L, _CLIP_G, _SDXL_UNET, _SDXL_VAE,
                        "EulerDiscreteScheduler", euler, dict(force_zeros_for_empty_prompt=True), True)
    # sdxl-turbo: SDXL's layers, 512x512 native, EulerAncestral on trailing timesteps (its scheduler_config.json)
    return SdxlSpec("StableDiffusionXLPipeline", _CLIP_L, _CLIP_G, dict(_SDXL_UNET, sample_size=64), _SDXL_VAE,
                    "EulerAncestralDiscreteScheduler", dict(_SCHED, timestep_spacing="trailing"),
                    dict(force_zeros_for_empty_prompt=True), True)


def build_sdxl_pipeline(out: Path, preset: str, corpus: Iterable[str], seed: int = 0) -> Path:
    """Write a diffusers SDXL pipeline folder (safetensors) with random weights to ``out``; return ``out``."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from .clip_bpe import train_clip_bpe

    spec = sdxl_spec(preset)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = list(corpus)
    toks = {}
    for name, conf, pad in (("tokenizer", spec.text_encoder, EOS), ("tokenizer_2", spec.text_encoder_2, "!")):
        if conf is not None:
            toks[name] = CLIPTokenizer.from_pretrained(train_clip_bpe(corpus, 300, out / name, pad_token=pad))

    torch.manual_seed(seed)
    index: dict[str, Any] = {"_class_name": spec.pipeline_class, "_diffusers_version": diffusers.__version__,
                             "feature_extractor": [None, None], "image_encoder": [None, None], **spec.pipeline_config}
    for name, tok_name, cls, conf in (("text_encoder", "tokenizer", CLIPTextModel, spec.text_encoder),
                                      ("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection, spec.text_encoder_2)):
        if conf is None:
            index[name] = index[tok_name] = [None, None]
            continue
        tok = toks[tok_name]
        config = CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE if spec.full_vocab else len(tok), bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **conf)
        _build_and_save(lambda: cls(config), out / name)
        index[name], index[tok_name] = ["transformers", cls.__name__], ["transformers", "CLIPTokenizer"]
    _build_and_save(lambda: diffusers.UNet2DConditionModel(**spec.unet), out / "unet")
    _build_and_save(lambda: diffusers.AutoencoderKL(**spec.vae), out / "vae")
    getattr(diffusers, spec.scheduler_class)(**spec.scheduler).save_pretrained(out / "scheduler")
    index.update(unet=["diffusers", "UNet2DConditionModel"], vae=["diffusers", "AutoencoderKL"],
                 scheduler=["diffusers", spec.scheduler_class])
    (out / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n", encoding="utf-8")
    return out


def _build_and_save(make, folder: Path) -> None:
    # No name holds the model: it is freed when this statement ends, so one model is in memory at a time (the
    # full-size UNet alone is 10.3 GB); collect() also frees any reference cycles inside it.
    make().save_pretrained(folder, safe_serialization=True)
    gc.collect()
