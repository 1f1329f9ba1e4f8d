"""Stable Diffusion 3 / 3.5-shaped diffusers pipelines with random weights (the SD3 presets of ``random_pipeline``).

``tiny-sd3`` is the test fixture (with ``tiny-sd3-no-t5``: the same without ``text_encoder_3``, as diffusers
allows); ``sd3`` has SD3-medium's layer sizes and ``sd35m`` SD3.5-medium's (stabilityai/stable-diffusion-3-medium-
diffusers and stable-diffusion-3.5-medium configs: MMDiT with 24 blocks of 24 x 64 heads, CLIP-L + OpenCLIP-G, a
16-channel VAE with shift_factor, FlowMatchEulerDiscreteScheduler with shift 3), for measuring memory and speed,
which do not depend on weight values. ``depth`` sets the transformer's block count (the measured per-block cost
scales to the full 24). The full presets leave out T5-XXL (4.7 B parameters, 19 GB in fp32: more than this machine
holds next to anything else) unless ``t5=True``.

Each component is built, saved and freed in turn (one model in memory at a time), and ``model_index.json`` is
written as diffusers' save_pretrained writes it. The CLIP tokenizers are BPE folders trained on a small built-in
corpus (``clip_bpe``); the T5 tokenizer is a SentencePiece-style Unigram model trained with the ``tokenizers``
library and saved by transformers' T5TokenizerFast (``tokenizer.json``), which is what the runtime reads.
"""
from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

SD3_PRESETS = ("tiny-sd3", "tiny-sd3-no-t5", "sd3", "sd35m")
CLIP_VOCAB_SIZE = 49408
T5_VOCAB_SIZE = 32128  # T5 v1.1's embedding rows (full-size presets)
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class Sd3Spec:
    clip_l: dict[str, Any]  # CLIPTextConfig kwargs (CLIPTextModelWithProjection)
    clip_g: dict[str, Any]
    t5: dict[str, Any] | None  # T5Config kwargs (T5EncoderModel); None: no text_encoder_3
    transformer: dict[str, Any]  # SD3Transformer2DModel kwargs
    vae: dict[str, Any]  # AutoencoderKL kwargs
    shift: float  # FlowMatchEulerDiscreteScheduler shift
    full_vocab: bool


def _clip(hidden: int, intermediate: int, layers: int, heads: int, act: str, projection: int) -> dict[str, Any]:
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, hidden_act=act, projection_dim=projection, max_position_embeddings=77)


_CLIP_L = _clip(768, 3072, 12, 12, "quick_gelu", 768)
_CLIP_G = _clip(1280, 5120, 32, 20, "gelu", 1280)
_T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu",
               relative_attention_num_buckets=32, relative_attention_max_distance=128, is_encoder_decoder=False)
_SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                   caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
# SD3.5-medium: MMDiT-X (self-attention on the image stream in the first 13 blocks), RMS-normalised q/k
_SD35_MEDIUM = dict(_SD3_MEDIUM, pos_embed_max_size=384, qk_norm="rms_norm",
                    dual_attention_layers=tuple(range(13)))
_SD3_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, sample_size=1024, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=1.5305, shift_factor=0.0609,
                use_quant_conv=False, use_post_quant_conv=False)

# Tiny: SD3's 16 latent channels and VAE shift; CLIP-L (16 wide) and CLIP-G (24 wide) concatenate to 40 features, padded to T5's 48 (the joint width), so a
# swapped concatenation or a missing pad changes shapes; the projections (12, 20) sum to the pooled width 32.
# Three CLIP layers, so the penultimate hidden state differs from the last one.
_TINY_L = _clip(16, 37, 3, 4, "quick_gelu", 12)
_TINY_G = _clip(24, 37, 3, 4, "gelu", 20)
_TINY_T5 = dict(d_model=48, d_ff=64, d_kv=12, num_heads=4, num_layers=2, feed_forward_proj="gated-gelu",
                relative_attention_num_buckets=8, relative_attention_max_distance=32, is_encoder_decoder=False)
_TINY_TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=48,
                         caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=32,
                         qk_norm="rms_norm", dual_attention_layers=(0,))  # SD3.5's block kinds, both exercised
_TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, sample_size=32, norm_num_groups=8,
                 block_out_channels=(8, 16), layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=1.5305, shift_factor=0.0609,
                 use_quant_conv=False, use_post_quant_conv=False)


def sd3_spec(preset: str, depth: int | None = None, t5: bool | None = None) -> Sd3Spec:
    if preset not in SD3_PRESETS:
        raise ValueError(f"preset {preset!r}; expected one of {list(SD3_PRESETS)}")
    if preset.startswith("tiny"):
        spec = Sd3Spec(_TINY_L, _TINY_G, None if preset == "tiny-sd3-no-t5" else _TINY_T5, _TINY_TRANSFORMER,
                       _TINY_VAE, 3.0, False)
    else:
        transformer = _SD3_MEDIUM if preset == "sd3" else _SD35_MEDIUM
        spec = Sd3Spec(_CLIP_L, _CLIP_G, _T5_XXL if t5 else None, transformer, _SD3_VAE, 3.0, True)
    if depth is not None:
        if not 1 <= depth <= 64:
            raise ValueError(f"depth {depth}; expected 1 to 64 transformer blocks")
        tr = dict(spec.transformer, num_layers=depth)
        if "dual_attention_layers" in tr:
            tr["dual_attention_layers"] = tuple(i for i in tr["dual_attention_layers"] if i < depth)
        spec = Sd3Spec(spec.clip_l, spec.clip_g, spec.t5, tr, spec.vae, spec.shift, spec.full_vocab)
    return spec


def train_t5_tokenizer(corpus: Iterable[str], out: Path, vocab_size: int = 120) -> Path:
    """A T5-format tokenizer folder (tokenizer.json: Unigram over Metaspace pieces, ``</s>`` appended, ``<pad>``
    id 0, ``</s>`` 1, ``<unk>`` 2, no extra ids) trained on ``corpus``; saved by transformers' T5TokenizerFast."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>")
    tok.train_from_iterator(list(corpus), trainer)
    vocab = [(piece, float(score)) for piece, score in json.loads(tok.to_str())["model"]["vocab"]]
    T5TokenizerFast(vocab=vocab, extra_ids=0).save_pretrained(out)
    return Path(out)


def build_sd3_pipeline(out: Path, preset: str, corpus: Iterable[str], seed: int = 0, depth: int | None = None,
                       t5: bool | None = None) -> Path:
    """Write a diffusers StableDiffusion3Pipeline folder (safetensors) with random weights to ``out``."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

    from .clip_bpe import train_clip_bpe

    spec = sd3_spec(preset, depth, t5)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = list(corpus)
    torch.manual_seed(seed)
    index: dict[str, Any] = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": diffusers.__version__,
                             "feature_extractor": [None, None], "image_encoder": [None, None]}
    # CLIP-L pads with its end token, OpenCLIP-G with "!" (stabilityai/stable-diffusion-3-medium-diffusers)
    for name, tok_name, conf, pad in (("text_encoder", "tokenizer", spec.clip_l, EOS),
                                      ("text_encoder_2", "tokenizer_2", spec.clip_g, "!")):
        tok = CLIPTokenizer.from_pretrained(train_clip_bpe(corpus, 300, out / tok_name, pad_token=pad))
        config = CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE if spec.full_vocab else len(tok),
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id, **conf)
        _build_and_save(lambda: CLIPTextModelWithProjection(config), out / name)
        index[name] = ["transformers", "CLIPTextModelWithProjection"]
        index[tok_name] = ["transformers", "CLIPTokenizer"]
    if spec.t5 is not None:
        train_t5_tokenizer(corpus, out / "tokenizer_3")
        t5_config = T5Config(vocab_size=T5_VOCAB_SIZE if spec.full_vocab else 120, **spec.t5)
        _build_and_save(lambda: T5EncoderModel(t5_config), out / "text_encoder_3")
        index["text_encoder_3"] = ["transformers", "T5EncoderModel"]
        index["tokenizer_3"] = ["transformers", "T5TokenizerFast"]
    else:
        index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
    _build_and_save(lambda: diffusers.SD3Transformer2DModel(**spec.transformer), out / "transformer")
    _build_and_save(lambda: diffusers.AutoencoderKL(**spec.vae), out / "vae")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=spec.shift)
    scheduler.save_pretrained(out / "scheduler")
    index.update(transformer=["diffusers", "SD3Transformer2DModel"], vae=["diffusers", "AutoencoderKL"],
                 scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"])
    (out / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n", encoding="utf-8")
    return out


def _build_and_save(make, folder: Path) -> None:
    # No name holds the model: it is freed when this statement ends (one model in memory at a time).
    make().save_pretrained(folder, safe_serialization=True)
    gc.collect()
