"""Stable Diffusion pipelines with random weights, built from configs in-process: the test fixtures (tiny SD1- and
SD2-v-shaped) and the SD-1.5-shaped model that memory and speed are measured on (compute and memory do not depend
on weight values). Nothing is downloaded: the tokenizer is a CLIP-format BPE trained on a small built-in corpus.

    python -m edgediff.export.random_pipeline sd15 /tmp/sd15-random       # then: edgediff export /tmp/sd15-random OUT

SDXL-shaped presets (tiny-sdxl, tiny-sdxl-refiner, sdxl, sdxl-turbo) are built by ``random_sdxl``; ``sd-turbo`` has
SD 2.1's layer sizes with SD-Turbo's scheduler (Euler, trailing timesteps, 512x512 native); ``tiny-sd1-inpaint`` is
tiny-sd1 with a 9-channel inpainting UNet (latents + mask + masked-image latents), saved as a
StableDiffusionInpaintPipeline; ``tiny-lcm`` / ``lcm`` are Latent Consistency Models (``random_lcm``);
``tiny-flux-schnell``, ``tiny-flux-dev``, ``flux-schnell``, ``flux-dev`` are FLUX.1 (``random_flux``).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from .random_flux import FLUX_PRESETS
from .random_lcm import LCM_PRESETS
from .random_sd3 import SD3_PRESETS
from .random_sdxl import SDXL_PRESETS

PRESETS = ("tiny-sd1", "tiny-sd1-inpaint", "tiny-sd2v", "sd15", "sd-turbo", *SDXL_PRESETS, *LCM_PRESETS, *SD3_PRESETS,
           *FLUX_PRESETS)

_CORPUS = [
    "a photograph of an astronaut riding a horse", "a red circle on a white background", "an oil painting of a cat",
    "a small blue square in the top left corner", "a watercolor landscape with mountains and a lake at sunset",
    "portrait of a woman, studio lighting, 85mm", "a bowl of fruit on a wooden table", "city street at night, rain",
    "ein Hund im Schnee", "un château au bord de la mer", "a cozy cabin in the woods, snow, warm light",
]


def build_random_pipeline(out: Path, preset: str = "tiny-sd1", seed: int = 0, depth: int | None = None) -> Path:
    """Write a diffusers StableDiffusionPipeline (or, for the SDXL presets, StableDiffusionXL[Img2Img]Pipeline)
    folder (safetensors) with random weights to ``out``."""
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}; expected one of {list(PRESETS)}")
    if preset in SDXL_PRESETS:
        from .random_sdxl import build_sdxl_pipeline

        return build_sdxl_pipeline(Path(out), preset, _CORPUS, seed=seed)
    if preset in SD3_PRESETS:  # StableDiffusion3Pipeline (random_sd3.py); depth: transformer blocks
        from .random_sd3 import build_sd3_pipeline

        return build_sd3_pipeline(Path(out), preset, _CORPUS, seed=seed, depth=depth)
    if preset in FLUX_PRESETS:  # FluxPipeline (random_flux.py); depth: transformer blocks, T5 layers
        from .random_flux import build_flux_pipeline

        return build_flux_pipeline(Path(out), preset, _CORPUS, seed=seed, depth=depth)
    if depth is not None:
        raise ValueError(f"--depth applies to the transformer presets, not {preset!r}")
    if preset in LCM_PRESETS:  # SD 1.5 with a guidance-embedding UNet and LCMScheduler (random_lcm.py)
        from .random_lcm import build_lcm_pipeline

        return build_lcm_pipeline(Path(out), preset, seed=seed)
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler,
                           StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .clip_bpe import train_clip_bpe

    out = Path(out)
    turbo = preset == "sd-turbo"  # stabilityai/sd-turbo: SD 2.1 (OpenCLIP-H text tower, pad "!"), epsilon, 512x512
    sd2 = preset == "tiny-sd2v" or turbo
    tok_dir = train_clip_bpe(_CORPUS, 300, out / "_tokenizer_src", pad_token="!" if sd2 else "<|endoftext|>")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    vocab_size = None  # the trained tokenizer's
    if turbo:  # the real SD 2.1 layer sizes (stabilityai/sd-turbo configs) and CLIP's real vocabulary size
        text_cfg = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                        hidden_act="gelu", projection_dim=512)
        vocab_size = 49408
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                    use_linear_projection=True)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=768, layers_per_block=2,
                            block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    elif preset == "sd15":  # the real SD-1.5 layer sizes (CompVis/stable-diffusion-v1-5 configs)
        text_cfg = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        hidden_act="quick_gelu")
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
                            block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    else:
        text_cfg = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                        hidden_act="gelu" if sd2 else "quick_gelu")
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=9 if preset == "tiny-sd1-inpaint" else 4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8 if not sd2 else (4, 8), norm_num_groups=16,
            use_linear_projection=sd2,
        )
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=16, norm_num_groups=16,
                            block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=0.3)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size or len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **text_cfg))
    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  steps_offset=1, set_alpha_to_one=False)
    if turbo:
        common.pop("set_alpha_to_one")  # a DDIM/PNDM argument; Euler has none
        scheduler = EulerDiscreteScheduler(prediction_type="epsilon", timestep_spacing="trailing",
                                           interpolation_type="linear", **common)
    else:
        scheduler = (DDIMScheduler(prediction_type="v_prediction", clip_sample=False, **common) if sd2
                     else PNDMScheduler(skip_prk_steps=True, **common))
    cls = StableDiffusionInpaintPipeline if preset == "tiny-sd1-inpaint" else StableDiffusionPipeline
    pipe = cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; real SD 1.x/2.x folders carry CLIP's vocab.json + merges.txt
    shutil.rmtree(out / "tokenizer")
    shutil.move(out / "_tokenizer_src", out / "tokenizer")
    return out


if __name__ == "__main__":
    args, depth = sys.argv[1:], None
    if len(args) == 4 and args[2] == "--depth" and args[3].isdigit():  # transformer presets: blocks to build
        args, depth = args[:2], int(args[3])
    if len(args) != 2 or args[0] not in PRESETS:
        sys.stderr.write(f"usage: python -m edgediff.export.random_pipeline {{{','.join(PRESETS)}}} OUT [--depth N]\n")
        raise SystemExit(2)
    print(build_random_pipeline(Path(args[1]), args[0], depth=depth))
