"""runtime/families/sdxl.py (numpy, exported ONNX text encoders on ONNX Runtime CPU) against diffusers 0.42's
StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline on tiny random pipelines: encode_prompt's four arrays,
_get_add_time_ids, and the denoiser inputs diffusers builds before its loop (prompt_embeds, add_text_embeds,
add_time_ids, read through callback_on_step_end). Tolerance: 1e-5 max abs; the worst element is named on failure."""
from __future__ import annotations

import dataclasses
import warnings
from types import SimpleNamespace

import numpy as np
import pytest

from edgediff.bundle.reader import Bundle
from edgediff.errors import BundleError, InputError
from edgediff.families.sdxl import SdxlTextConfig, condition, encode_prompt
from edgediff.families.sdxl_time_ids import MicroConditioning, time_id_rows

pytest.importorskip("diffusers")

from sdxl_fixtures import OrtBackend, tiny_sdxl  # noqa: E402

ATOL = 1e-5
SIZE = 16  # the tiny pipelines' native output size (latent 8 x VAE factor 2)


class Model:
    """An exported tiny SDXL bundle with its towers on ONNX Runtime, and the diffusers pipeline it came from."""

    def __init__(self, built, cls_name: str):
        import diffusers

        self.bundle = Bundle.open(built.bundle)
        self.config = SdxlTextConfig.from_bundle(self.bundle)
        self.backends = [OrtBackend(self.bundle, e) for e in self.config.encoders]
        self.towers = self.config.towers(self.config.tokenizers(self.bundle), self.backends)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.pipe = getattr(diffusers, cls_name).from_pretrained(built.source)
        self.pipe.set_progress_bar_config(disable=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return Model(tiny_sdxl(tmp_path_factory, "tiny-sdxl"), "StableDiffusionXLPipeline")


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    return Model(tiny_sdxl(tmp_path_factory, "tiny-sdxl-refiner"), "StableDiffusionXLImg2ImgPipeline")


def assert_close(ours: np.ndarray, ref, what: str) -> None:
    ref = ref.detach().numpy() if hasattr(ref, "detach") else np.asarray(ref)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape}, diffusers {ref.shape}"
    err = np.abs(ours.astype(np.float64) - ref)
    worst = np.unravel_index(int(np.argmax(err)), err.shape) if err.size else ()
    assert err.max(initial=0.0) <= ATOL, (f"{what}: max abs {err.max():.2e} at {worst} (ours {ours[worst]}, diffusers "
                                          f"{ref[worst]}); tolerance {ATOL}")


def diffusers_encode(pipe, **kw):
    import torch

    with torch.no_grad():
        return pipe.encode_prompt(device="cpu", **kw)


def diffusers_denoiser_inputs(pipe, *, img2img: bool, **kw) -> dict:
    """What diffusers feeds its UNet (one step, latents out): prompt_embeds, add_text_embeds, add_time_ids."""
    import torch

    seen = {}

    def grab(_pipe, _step, _t, tensors):
        seen.update({k: v.clone() for k, v in tensors.items()})
        return {}

    extra = dict(image=torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)), strength=0.5,
                 num_inference_steps=2) if img2img else dict(height=SIZE, width=SIZE, num_inference_steps=1)
    with torch.no_grad():
        pipe(**kw, **extra, output_type="latent", generator=torch.Generator().manual_seed(0),
             callback_on_step_end=grab, callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds",
                                                                            "add_time_ids"])
    return seen


def check_against_diffusers(model: Model, *, img2img: bool, guidance_scale: float = 5.0, micro=MicroConditioning(),
                            **kw) -> None:
    """Our encode_prompt and denoiser inputs vs diffusers' for the same call arguments ``kw``."""
    guided = guidance_scale > 1
    cfg = model.pipe.config
    ours = encode_prompt(model.towers, kw["prompt"], kw.get("prompt_2"), negative_prompt=kw.get("negative_prompt"),
                         negative_prompt_2=kw.get("negative_prompt_2"),
                         num_images_per_prompt=kw.get("num_images_per_prompt", 1), do_classifier_free_guidance=guided,
                         force_zeros_for_empty_prompt=cfg.force_zeros_for_empty_prompt)
    ref = diffusers_encode(model.pipe, do_classifier_free_guidance=guided, **kw)
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    for name, r in zip(names, ref):
        if r is None:
            assert getattr(ours, name) is None, name
        else:
            assert_close(getattr(ours, name), r, name)

    config = dataclasses.replace(model.config, force_zeros_for_empty_prompt=cfg.force_zeros_for_empty_prompt)
    got = condition(model.towers, config, height=SIZE, width=SIZE, guided=guided, micro=micro,
                    pipeline="img2img" if img2img else "txt2img", **kw)
    call = {**kw, **{f.name: getattr(micro, f.name) for f in dataclasses.fields(micro)
                     if img2img or "aesthetic" not in f.name}}
    want = diffusers_denoiser_inputs(model.pipe, img2img=img2img, guidance_scale=guidance_scale, **call)
    assert got.guided == guided
    assert_close(got.encoder_hidden_states, want["prompt_embeds"], "encoder_hidden_states")
    assert_close(got.extra["text_embeds"], want["add_text_embeds"], "text_embeds")
    assert_close(got.extra["time_ids"], want["add_time_ids"], "time_ids")


# -- base (StableDiffusionXLPipeline) -----------------------------------------------------------------------------
def test_plain_prompt_zero_negative(base):
    # no negative prompt + force_zeros_for_empty_prompt (SDXL base): the unconditional embeddings are zeros
    check_against_diffusers(base, img2img=False, prompt="a red circle on a white background")


def test_prompt_2_and_negative_prompt_2_go_to_the_second_tower(base):
    check_against_diffusers(base, img2img=False, prompt=["a photograph of an astronaut riding a horse", "a cat!"],
                            prompt_2=["an oil painting", "city street at night, rain"],
                            negative_prompt="blurry", negative_prompt_2=["a bowl of fruit", "snow!!"])


def test_prompt_2_changes_only_the_second_towers_features(base):
    a = encode_prompt(base.towers, "a cat", do_classifier_free_guidance=False)
    b = encode_prompt(base.towers, "a cat", "a dog", do_classifier_free_guidance=False)
    np.testing.assert_array_equal(a.prompt_embeds[..., :32], b.prompt_embeds[..., :32])  # CLIP-L: 32 features
    assert np.abs(a.prompt_embeds[..., 32:] - b.prompt_embeds[..., 32:]).max() > 1e-3
    assert np.abs(a.pooled_prompt_embeds - b.pooled_prompt_embeds).max() > 1e-3


@pytest.mark.parametrize("force_zeros", [True, False])
def test_no_negative_prompt_follows_force_zeros_for_empty_prompt(base, force_zeros):
    base.pipe.register_to_config(force_zeros_for_empty_prompt=force_zeros)
    try:
        check_against_diffusers(base, img2img=False, prompt="a small blue square")
        ours = encode_prompt(base.towers, "a small blue square", force_zeros_for_empty_prompt=force_zeros)
        assert (not ours.negative_prompt_embeds.any()) == force_zeros  # else: the encoded empty prompt
    finally:
        base.pipe.register_to_config(force_zeros_for_empty_prompt=True)


def test_empty_string_negative_is_encoded_even_with_force_zeros(base):
    # diffusers zeroes only a *missing* negative prompt (None), not ""
    check_against_diffusers(base, img2img=False, prompt="a small blue square", negative_prompt="")
    assert encode_prompt(base.towers, "x", negative_prompt="").negative_prompt_embeds.any()


def test_num_images_per_prompt_repeats_each_prompt(base):
    check_against_diffusers(base, img2img=False, prompt=["a red circle", "an oil painting of a cat"],
                            negative_prompt=["rain", "snow"], num_images_per_prompt=2)


def test_without_guidance_only_the_prompt_is_encoded(base):
    for b in base.backends:
        b.calls.clear()
    check_against_diffusers(base, img2img=False, guidance_scale=1.0, prompt="a cat", negative_prompt="ignored")
    # our run is the first call per tower: batch 1 (no unconditional rows); the rest are diffusers' references
    assert [b.calls[0] for b in base.backends] == [(1, 77), (1, 77)]


def test_guided_call_runs_each_tower_once(base):
    for b in base.backends:
        b.calls.clear()
    encode_prompt(base.towers, ["a", "b"], negative_prompt="c")
    assert [b.calls for b in base.backends] == [[(4, 77)], [(4, 77)]]  # [uncond; cond] in one batch


def test_non_default_micro_conditioning(base):
    micro = MicroConditioning(original_size=(1024, 768), crops_coords_top_left=(32, 8), target_size=(512, 512),
                              negative_original_size=(256, 256), negative_crops_coords_top_left=(4, 4),
                              negative_target_size=(64, 96))
    check_against_diffusers(base, img2img=False, micro=micro, prompt="a cozy cabin", negative_prompt="rain")
    # and with two images: diffusers tiles [neg, pos] per image (module doc of sdxl_time_ids), reproduced
    check_against_diffusers(base, img2img=False, micro=micro, prompt="a cozy cabin", negative_prompt="rain",
                            num_images_per_prompt=2)


def test_time_id_rows_equal_get_add_time_ids(base):
    import torch

    micro = MicroConditioning(original_size=(300, 200), crops_coords_top_left=(1, 2), target_size=(40, 48))
    pos, neg = time_id_rows(SIZE, SIZE, micro, requires_aesthetics_score=False, pipeline="txt2img")
    ref = base.pipe._get_add_time_ids((300, 200), (1, 2), (40, 48), dtype=torch.float32, text_encoder_projection_dim=24)
    assert_close(pos, ref, "time_ids")
    np.testing.assert_array_equal(neg, pos)  # no negative sizes given: diffusers reuses the positive row
    default, _ = time_id_rows(24, 40, MicroConditioning(), requires_aesthetics_score=False, pipeline="txt2img")
    np.testing.assert_array_equal(default, [[24, 40, 0, 0, 24, 40]])  # original = target = output size


def test_base_img2img_uses_diffusers_img2img_micro_conditioning(base):
    import diffusers

    # the base weights in diffusers' img2img pipeline (no aesthetic score): its own micro-conditioning defaults
    img2img = SimpleNamespace(towers=base.towers, config=base.config,
                              pipe=diffusers.StableDiffusionXLImg2ImgPipeline(**base.pipe.components))
    img2img.pipe.set_progress_bar_config(disable=True)
    micro = MicroConditioning(original_size=(64, 64), crops_coords_top_left=(8, 0), negative_original_size=(32, 32),
                              negative_crops_coords_top_left=(2, 2))
    check_against_diffusers(img2img, img2img=True, micro=micro, prompt=["a lake", "mountains"],
                            negative_prompt="fog", num_images_per_prompt=2)


# -- refiner (StableDiffusionXLImg2ImgPipeline, requires_aesthetics_score) -----------------------------------------
def test_refiner_aesthetic_scores(refiner):
    assert refiner.config.encoders == ("text_encoder_2",) and refiner.config.time_ids == 5
    micro = MicroConditioning(aesthetic_score=7.5, negative_aesthetic_score=1.5, original_size=(40, 32),
                              crops_coords_top_left=(3, 5), negative_crops_coords_top_left=(1, 1))
    check_against_diffusers(refiner, img2img=True, micro=micro, prompt="a bowl of fruit", negative_prompt="dark",
                            num_images_per_prompt=2)


def test_refiner_reads_only_prompt_not_prompt_2(refiner):
    # diffusers zips [prompt, prompt_2] with the refiner's single tower: prompt_2 is never read
    check_against_diffusers(refiner, img2img=True, prompt="a bowl of fruit", prompt_2="ignored by the refiner")


def test_refiner_default_scores_and_no_zeroing(refiner):
    assert refiner.config.force_zeros_for_empty_prompt is False  # the refiner encodes "" as its negative
    check_against_diffusers(refiner, img2img=True, prompt="a bowl of fruit")


# -- tokenizers ---------------------------------------------------------------------------------------------------
def test_both_tokenizers_match_transformers_pad_and_truncation(base):
    from transformers import CLIPTokenizer

    prompts = ["", "a cat!", "hello!! world !", "!!!", "a photograph of an astronaut riding a horse " * 8]
    for folder, tok, pad in (("tokenizer", base.towers[0].tokenizer, "<|endoftext|>"),
                             ("tokenizer_2", base.towers[1].tokenizer, "!")):
        ref = CLIPTokenizer.from_pretrained(base.bundle.root / folder)
        assert ref.pad_token == pad
        want = np.array(ref(prompts, padding="max_length", max_length=ref.model_max_length, truncation=True).input_ids)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the long prompt's truncation warning
            got = tok.encode(prompts)
        np.testing.assert_array_equal(got, want, err_msg=folder)
        assert got[0, 2] == ref.pad_token_id  # "" -> BOS, EOS, then this tokenizer's own pad


# -- bad input: one clear line each ---------------------------------------------------------------------------------
def test_refiner_used_for_text_to_image_is_refused(refiner):
    with pytest.raises(InputError, match="SDXL refiner .* pass image="):
        condition(refiner.towers, refiner.config, prompt="x", height=SIZE, width=SIZE, pipeline="txt2img")


@pytest.mark.parametrize("kwargs,message", [
    (dict(negative_prompt=["a", "b", "c"]), "negative_prompt has 3 entries for 2 prompts"),
    (dict(prompt_2=["a", "b", "c"]), "prompt_2 has 3 entries for 2 prompts"),
    (dict(negative_prompt="n", negative_prompt_2=["a", "b", "c"]), "negative_prompt_2 has 3 entries"),
    (dict(prompt_2=3), "prompt_2 must be a string"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt"),
])
def test_bad_prompt_arguments(base, kwargs, message):
    with pytest.raises(InputError, match=message):
        encode_prompt(base.towers, ["p", "q"], **kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(original_size=(0, 64)), r"original_size=\(0, 64\); expected \(height, width\) as two positive integers"),
    (dict(crops_coords_top_left=(-1, 0)), "crops_coords_top_left=.*two integers >= 0"),
    (dict(target_size=(64,)), "target_size"),
    (dict(aesthetic_score=float("nan")), "aesthetic_score=nan; expected a finite number"),
])
def test_bad_micro_conditioning(kwargs, message):
    with pytest.raises(InputError, match=message):
        MicroConditioning(**kwargs)


def test_unknown_pipeline_kind():
    with pytest.raises(InputError, match="pipeline='inpaint'"):
        time_id_rows(SIZE, SIZE, MicroConditioning(), requires_aesthetics_score=False, pipeline="inpaint")


def test_towers_must_match_the_encoders(base):
    with pytest.raises(InputError, match="needs 2 tokenizer"):
        base.config.towers(base.config.tokenizers(base.bundle), base.backends[:1])


def test_aesthetic_flag_that_does_not_fit_the_unet_is_named(base, refiner):
    as_refiner = dataclasses.replace(base.bundle, model_index={**base.bundle.model_index, "requires_aesthetics_score": True})
    with pytest.raises(BundleError, match="takes 6 time ids .* requires_aesthetics_score: remove it"):
        SdxlTextConfig.from_bundle(as_refiner)
    as_base = dataclasses.replace(refiner.bundle, model_index={**refiner.bundle.model_index, "requires_aesthetics_score": False})
    with pytest.raises(BundleError, match="takes 5 time ids .* lacks requires_aesthetics_score"):
        SdxlTextConfig.from_bundle(as_base)


def test_bundle_without_the_penultimate_output_is_named(base):
    m = base.bundle.manifest
    te = m.components["text_encoder"]
    cut = dataclasses.replace(te, outputs=te.outputs[:2])
    bundle = dataclasses.replace(base.bundle, manifest=dataclasses.replace(m, components={**m.components, "text_encoder": cut}))
    with pytest.raises(BundleError, match="text_encoder has no 'hidden_states.2' output"):
        SdxlTextConfig.from_bundle(bundle)
