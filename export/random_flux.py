"""FLUX.1-shaped diffusers pipelines (``FluxPipeline`` folders) with random weights: the test fixtures and the
full-width models the bench measures per-block cost on (compute and memory do not depend on weight values).

    python -m edgediff.export.random_pipeline flux-schnell DIR [--depth N]    # then: edgediff export DIR OUT

Presets: ``tiny-flux-schnell`` / ``tiny-flux-dev`` (test fixtures: a few thousand parameters per model, a 4-channel
2-level VAE so 2x2 packing is exercised on a small grid) and ``flux-schnell`` / ``flux-dev`` (black-forest-labs'
FLUX.1 configs: CLIP ViT-L, T5 v1.1 XXL, the 12 B transformer with 19 double-stream and 38 single-stream blocks,
the 16-channel VAE with scaling 0.3611 and shift 0.1159). ``--depth N`` keeps every width and cuts the depth:
N double-stream and 2N single-stream blocks (FLUX's 1:2 ratio) and min(N, 24) T5 layers. The two variants differ
exactly where the real ones do: dev's transformer has ``guidance_embeds`` and its scheduler uses dynamic shifting
(shift 3.0); schnell's has neither (shift 1.0). Each model is built, saved and freed in turn (one in memory), and
``model_index.json`` is written as diffusers' save_pretrained writes it.
"""
from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

FLUX_PRESETS = ("tiny-flux-schnell", "tiny-flux-dev", "flux-schnell", "flux-dev")
FULL_DEPTH = 19  # FLUX.1's double-stream blocks (and 38 single-stream ones)
T5_LAYERS = 24  # T5 v1.1 XXL's encoder layers
CLIP_VOCAB_SIZE = 49408
T5_VOCAB_SIZE = 32128
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class FluxSpec:
    """One preset: constructor arguments of each model (CLIPTextConfig, T5Config, FluxTransformer2DModel,
    AutoencoderKL, FlowMatchEulerDiscreteScheduler)."""

    clip: dict[str, Any]
    t5: dict[str, Any]
    transformer: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any]
    full_vocab: bool  # embedding tables of the real vocabularies instead of the trained tokenizers'


# black-forest-labs/FLUX.1-schnell and FLUX.1-dev configs
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               hidden_act="quick_gelu", projection_dim=768, max_position_embeddings=77)
_T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=T5_LAYERS, feed_forward_proj="gated-gelu",
               relative_attention_num_buckets=32, relative_attention_max_distance=128, dense_act_fn="gelu_new",
               is_gated_act=True, tie_word_embeddings=False)
_FLUX = dict(patch_size=1, in_channels=64, num_layers=FULL_DEPTH, num_single_layers=2 * FULL_DEPTH,
             attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
             axes_dims_rope=(16, 56, 56))
_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, sample_size=1024, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.3611, shift_factor=0.1159,
            use_quant_conv=False, use_post_quant_conv=False)
_SCHED = dict(num_train_timesteps=1000, base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
              max_shift=1.15)
_SCHNELL_SCHED = dict(_SCHED, shift=1.0, use_dynamic_shifting=False)
_DEV_SCHED = dict(_SCHED, shift=3.0, use_dynamic_shifting=True)

# Tiny: CLIP and T5 widths differ (32 vs 24) and from the transformer's inner width (2 heads x 16), so a pooled
# output taken for the sequence one, or the towers swapped, changes shapes instead of passing silently.
_TINY_CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  hidden_act="quick_gelu", projection_dim=32, max_position_embeddings=77)
_TINY_T5 = dict(d_model=24, d_ff=37, d_kv=8, num_heads=3, num_layers=2, feed_forward_proj="gated-gelu",
                relative_attention_num_buckets=8, relative_attention_max_distance=16, dense_act_fn="gelu_new",
                is_gated_act=True, tie_word_embeddings=False)
_TINY_FLUX = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
_TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=32, norm_num_groups=16,
                 block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=0.3611, shift_factor=0.1159,
                 use_quant_conv=False, use_post_quant_conv=False)


def flux_spec(preset: str, depth: int | None = None) -> FluxSpec:
    """The models of ``preset``; ``depth`` (full-size presets only) cuts the transformer to ``depth`` double- and
    ``2 * depth`` single-stream blocks and T5 to ``min(depth, 24)`` layers, every width kept."""
    if preset not in FLUX_PRESETS:
        raise ValueError(f"preset {preset!r}; expected one of {list(FLUX_PRESETS)}")
    dev = preset.endswith("-dev")
    sched = _DEV_SCHED if dev else _SCHNELL_SCHED
    if preset.startswith("tiny-"):
        if depth is not None:
            raise ValueError("--depth applies to the full-width presets (flux-schnell, flux-dev), not the tiny ones")
        return FluxSpec(_TINY_CLIP, _TINY_T5, dict(_TINY_FLUX, guidance_embeds=dev), _TINY_VAE, sched, False)
    if depth is None:  # the whole model
        return FluxSpec(_CLIP_L, _T5_XXL, dict(_FLUX, guidance_embeds=dev), _VAE, sched, True)
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= FULL_DEPTH:
        raise ValueError(f"--depth {depth!r}; expected an integer from 1 to {FULL_DEPTH}")
    transformer = dict(_FLUX, num_layers=depth, num_single_layers=2 * depth, guidance_embeds=dev)
    return FluxSpec(_CLIP_L, dict(_T5_XXL, num_layers=min(depth, T5_LAYERS)), transformer, _VAE, sched, True)


def build_flux_pipeline(out: Path, preset: str, corpus: Iterable[str], *, seed: int = 0,
                        depth: int | None = None) -> Path:
    """Write a diffusers FluxPipeline folder (safetensors) with random weights to ``out``; return ``out``."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    from .clip_bpe import train_clip_bpe
    from .random_sd3 import train_t5_tokenizer  # SD3's tokenizer_3 format: the same T5TokenizerFast folders

    spec = flux_spec(preset, depth)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = list(corpus)
    clip_tok = CLIPTokenizer.from_pretrained(train_clip_bpe(corpus, 300, out / "tokenizer", pad_token=EOS))
    t5_tok = T5TokenizerFast.from_pretrained(train_t5_tokenizer(corpus, out / "tokenizer_2"))

    torch.manual_seed(seed)
    clip = CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE if spec.full_vocab else len(clip_tok),
                          bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
                          pad_token_id=clip_tok.pad_token_id, **spec.clip)
    _build_and_save(lambda: CLIPTextModel(clip), out / "text_encoder")
    t5 = T5Config(vocab_size=T5_VOCAB_SIZE if spec.full_vocab else len(t5_tok), pad_token_id=t5_tok.pad_token_id,
                  eos_token_id=t5_tok.eos_token_id, decoder_start_token_id=t5_tok.pad_token_id, **spec.t5)
    _build_and_save(lambda: T5EncoderModel(t5), out / "text_encoder_2")
    _build_and_save(lambda: diffusers.FluxTransformer2DModel(**spec.transformer), out / "transformer")
    _build_and_save(lambda: diffusers.AutoencoderKL(**spec.vae), out / "vae")
    diffusers.FlowMatchEulerDiscreteScheduler(**spec.scheduler).save_pretrained(out / "scheduler")
    index = {
        "_class_name": "FluxPipeline", "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None], "image_encoder": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def _build_and_save(make, folder: Path) -> None:
    # No name holds the model: it is freed when this statement ends, so one model is in memory at a time (FLUX's
    # transformer alone is 47.6 GB in fp32 at full depth); collect() also frees any reference cycles inside it.
    make().save_pretrained(folder, safe_serialization=True)
    gc.collect()
