"""Inpainting as diffusers' StableDiffusionInpaintPipeline computes it, without torch: the mask and init image
prepared as its VaeImageProcessors prepare them, the starting latents drawn in its order, and one step extension
(runtime/job.py) that changes what each step computes:

* an inpainting UNet (9 input channels: latents 4 + mask 1 + masked-image latents 4, sd-1.5-inpainting style) gets
  the mask and the masked image's latents next to the latents at every step (``InpaintingUnet.feeds``);
* a regular 4-channel UNet gets the latent blend (``LatentBlend.after_step``): after each step, the region outside
  the mask is replaced by the init image's latents noised to the next step's level.

Which one a bundle gets is read from its UNet's ``sample`` input (9 channels), not from a flag.

Conventions (diffusers'): white (>= 0.5 after conversion to grayscale) is repainted, black is kept; the mask is
binarized at 0.5 after the resize; the masked image is ``image * (mask < 0.5)``; the mask is brought to the latent
grid by nearest-neighbour sampling. Unlike diffusers, which resizes to the model's default size, the output has the
init image's size rounded down to the model's size multiple (as img2img here). ``strength`` defaults to diffusers'
(``DEFAULT_STRENGTH``); at 1.0 the start is pure noise (``is_strength_max``), and the init image reaches the
denoiser only through the mask channels or the blend. ``padding_mask_crop`` crops image and mask to the mask's bounding box grown by that many pixels (and
to the image's aspect ratio), generates that crop at full size, and pastes the result back over the original
(diffusers' ``get_crop_region`` / ``apply_overlay``).

Noise draws, in diffusers' order for one generator: the init image's VAE sample (a 4-channel UNet, or strength <
1), the start noise, the masked image's VAE sample (drawn, and unused, for a 4-channel UNet too, so a stochastic
scheduler's later draws stay where diffusers has them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import images as img
from . import vae_tiling as tiling
from .errors import InputError

# family -> diffusers' default strength in the inpainting pipeline this module reproduces for it:
# StableDiffusionInpaintPipeline (SD 1.x/2.x, SD-Turbo) and StableDiffusionXLInpaintPipeline (SDXL, its Turbo and
# refiner), whose 0.9999 skips the first step and starts from the noised image rather than pure noise
DEFAULT_STRENGTH = {"sd1": 1.0, "sd2": 1.0, "sd2-v": 1.0, "sd-turbo": 1.0,
                    "sdxl": 0.9999, "sdxl-turbo": 0.9999, "sdxl-refiner": 0.9999}
FAMILIES = tuple(DEFAULT_STRENGTH)


@dataclass(frozen=True)
class InpaintInputs:
    """A request's inpainting part, checked and preprocessed (``prepare``)."""

    image: np.ndarray  # (1, 3, H, W) float32 in [-1, 1]: the init image as the model sees it (cropped, resized)
    mask: np.ndarray  # (1, 1, H, W) float32, 1 = repaint, 0 = keep (binarized at 0.5)
    inpainting_unet: bool  # True: 9-channel UNet (mask channels); False: latent blend with a regular UNet
    padding_mask_crop: int | None = None
    crop: tuple[int, int, int, int] | None = None  # (x1, y1, x2, y2) in the original image, with padding_mask_crop
    original: Any = None  # the original PIL image and mask, for pasting back (padding_mask_crop only)
    original_mask: Any = None

    @property
    def masked_image(self) -> np.ndarray:
        return (self.image * (self.mask < 0.5)).astype(np.float32)  # (1, 3, H, W): the kept region, 0 elsewhere

    def parameters(self) -> dict[str, Any]:
        """What the PNG metadata records about the inpainting."""
        out = {"inpaint": "inpainting unet" if self.inpainting_unet else "latent blend"}
        if self.padding_mask_crop is not None:
            out["padding_mask_crop"] = self.padding_mask_crop
        return out


def default_strength(bundle) -> float:
    return DEFAULT_STRENGTH.get(bundle.manifest.family, 1.0)


def unet_channels(bundle) -> int:
    """The UNet's ``sample`` channels, from the graph's input spec (its config as a fallback)."""
    c = bundle.component(bundle.denoiser).input("sample").shape[1]
    return c if isinstance(c, int) else int(bundle.unet_config.get("in_channels", bundle.manifest.latent_channels))


def is_inpainting_unet(bundle) -> bool:
    """latents + mask + masked-image latents: ``2 * latent_channels + 1`` input channels."""
    return unet_channels(bundle) == 2 * bundle.manifest.latent_channels + 1


def check_plain(bundle) -> None:
    """A call without a mask on an inpainting UNet: say what it needs instead of failing inside the graph."""
    if is_inpainting_unet(bundle):
        raise InputError(f"this bundle's UNet is an inpainting UNet ({unet_channels(bundle)} input channels: "
                         "latents, mask, masked image); give image= and mask_image= (--init-image and --mask)")


def prepare(bundle, image, mask_image, *, padding_mask_crop=None, height=None, width=None, multiple: int,
            latents=None, denoising_start=None, denoising_end=None, output_type: str = "pil") -> InpaintInputs:
    """Check an inpainting call's arguments and preprocess image and mask as diffusers does; InputError names the
    first bad one. ``multiple``: the model's size multiple (the output is the image's size rounded down to it)."""
    if mask_image is None:
        raise InputError("padding_mask_crop only applies to inpainting: give mask_image= (--mask) or drop it")
    if image is None:
        raise InputError("a mask needs the image to inpaint: give image= (--init-image) with mask_image=")
    _check_bundle(bundle)
    if latents is not None:
        raise InputError("latents= is for text-to-image; inpainting starts from image=: drop latents")
    if denoising_start is not None or denoising_end is not None:
        raise InputError("denoising_start/denoising_end do not apply to inpainting; use strength")
    pad = _padding(padding_mask_crop)
    if pad is not None and output_type != "pil":
        raise InputError(f"padding_mask_crop pastes the result into the original image, a PIL image; "
                         f"output_type={output_type!r} cannot hold it: use output_type='pil' or drop padding_mask_crop")
    picture = img.open_image(image, "init image", what="image")
    mask = img.open_image(mask_image, "mask", what="mask_image")
    if picture.size != mask.size:
        raise InputError(f"mask_image is {mask.size[0]}x{mask.size[1]} but the init image is {picture.size[0]}x"
                         f"{picture.size[1]}; give a mask of the image's size (white = repaint, black = keep)")
    w, h = (d - d % multiple for d in picture.size)
    if w < multiple or h < multiple:
        raise InputError(f"init image is {picture.size[0]}x{picture.size[1]}; it must be at least "
                         f"{multiple}x{multiple} pixels")
    if (height is not None or width is not None) and (height, width) != (h, w):
        raise InputError(f"height/width {width}x{height} differ from the init image's {w}x{h}; inpainting keeps the "
                         "image's size: drop height/width or resize the image")
    crop, mode = None, "default"
    if pad is not None:
        crop, mode = crop_region(mask, w, h, pad), "fill"
    arr = _to_array(_resize(picture, w, h, crop, mode).convert("RGB"))  # (H, W, 3) in [0, 1]
    m = _to_array(_resize(mask, w, h, crop, mode).convert("L"))  # (H, W) in [0, 1]
    m = np.where(m < 0.5, np.float32(0), np.float32(1))  # diffusers' binarize
    return InpaintInputs(image=(arr.transpose(2, 0, 1)[None] * 2.0 - 1.0).astype(np.float32), mask=m[None, None],
                         inpainting_unet=is_inpainting_unet(bundle), padding_mask_crop=pad, crop=crop,
                         original=picture if pad is not None else None, original_mask=mask if pad is not None else None)


def _check_bundle(bundle) -> None:
    m = bundle.manifest
    if m.family not in FAMILIES:
        raise InputError(f"inpainting is not supported for {m.family} bundles yet (supported: {', '.join(FAMILIES)})")
    if not bundle.has("vae_encoder"):
        raise InputError(f"inpainting encodes the init image, and {bundle.root} has no vae_encoder: re-export the "
                         "bundle with edgediff export")
    c = unet_channels(bundle)
    if c not in (m.latent_channels, 2 * m.latent_channels + 1):
        raise InputError(f"this bundle's UNet takes {c} input channels; inpainting needs a regular UNet "
                         f"({m.latent_channels}) or an inpainting UNet ({2 * m.latent_channels + 1})")


def _padding(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InputError(f"padding_mask_crop={value!r}; expected a number of pixels >= 0")
    return int(value)


def _to_array(im) -> np.ndarray:
    return np.asarray(im, dtype=np.float32) / np.float32(255.0)  # diffusers' pil_to_numpy


# -- diffusers' VaeImageProcessor, PIL part (image_processor.py, diffusers 0.42) -------------------------------------
def _resize(im, w: int, h: int, crop, mode: str):
    from PIL import Image

    if crop is not None:
        im = im.crop(crop)
    if mode == "fill":
        return _resize_and_fill(im, w, h)
    return im.resize((w, h), resample=Image.LANCZOS)


def _resize_and_fill(image, width: int, height: int):
    """Fit inside width x height keeping the aspect ratio, centred, the borders filled by stretching the edges."""
    from PIL import Image

    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.LANCZOS)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            res.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            res.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                      box=(0, fill + src_h))
    elif ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            res.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            res.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                      box=(fill + src_w, 0))
    return res


def _resize_and_crop(image, width: int, height: int):
    from PIL import Image

    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.LANCZOS)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return res


def crop_region(mask, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """The box (x1, y1, x2, y2) holding every non-black mask pixel, grown by ``pad`` and then to the aspect ratio
    of width x height (diffusers' get_crop_region)."""
    a = np.array(mask.convert("L"))
    h, w = a.shape
    cols, rows = np.flatnonzero(a.any(axis=0)), np.flatnonzero(a.any(axis=1))
    if not len(cols):
        raise InputError("mask_image is all black: nothing to repaint, and padding_mask_crop has no region to crop to")
    x1, y1 = max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0)
    x2, y2 = min(int(cols[-1]) + 1 + pad, w), min(int(rows[-1]) + 1 + pad, h)
    if (x2 - x1) / (y2 - y1) > width / height:
        diff = int((x2 - x1) / (width / height) - (y2 - y1))
        y1 -= diff // 2
        y2 += diff - diff // 2
        if y2 >= h:
            y1, y2 = y1 - (y2 - h), h
        if y1 < 0:
            y1, y2 = 0, y2 - y1
        y2 = min(y2, h)
    else:
        diff = int((y2 - y1) * (width / height) - (x2 - x1))
        x1 -= diff // 2
        x2 += diff - diff // 2
        if x2 >= w:
            x1, x2 = x1 - (x2 - w), w
        if x1 < 0:
            x1, x2 = 0, x2 - x1
        x2 = min(x2, w)
    return x1, y1, x2, y2


def overlay(inputs: InpaintInputs, images: list) -> list:
    """padding_mask_crop: each generated PIL image resized into the crop box of the original, under the original's
    kept (black-mask) region (diffusers' apply_overlay)."""
    from PIL import Image, ImageOps

    original, mask, (x, y, x2, y2) = inputs.original, inputs.original_mask, inputs.crop
    width, height = original.width, original.height
    kept = Image.new("RGBa", (width, height))
    kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    kept = kept.convert("RGBA")
    out = []
    for image in images:
        base = Image.new("RGBA", (width, height))
        base.paste(_resize_and_crop(image, x2 - x, y2 - y), (x, y))
        composed = base.convert("RGB").convert("RGBA")
        composed.alpha_composite(kept)
        out.append(composed.convert("RGB"))
    return out


# -- the denoising side -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InpaintingUnet:
    """Step extension for a 9-channel UNet: [latents, mask, masked-image latents] along the channels."""

    extra: np.ndarray  # (N, 1 + C, h, w) float32: mask and masked-image latents, one row per image

    def feeds(self, job, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        extra = np.concatenate([self.extra, self.extra]) if job.cond.guided else self.extra  # CFG: [uncond; cond]
        return {**feeds, "sample": np.concatenate([feeds["sample"], extra], axis=1)}  # (B, 2C + 1, h, w)


@dataclass(frozen=True)
class LatentBlend:
    """Step extension for a regular UNet: keep the init image outside the mask, at the next step's noise level."""

    image_latents: np.ndarray  # (N, C, h, w) float32
    noise: np.ndarray  # (N, C, h, w) float32: the start noise, reused at every level as diffusers does
    mask: np.ndarray  # (N, 1, h, w) float32, 1 = repaint

    def after_step(self, job, x: np.ndarray) -> np.ndarray:
        sched, i = job.scheduler, job.step
        proper = self.image_latents
        if i < len(sched.timesteps) - 1:  # noised to the level of the step that comes next
            proper = sched.add_noise(self.image_latents, self.noise, i + 1)
        return ((1 - self.mask) * proper + self.mask * x).astype(np.float32)


def begin(bundle, components, req, sched, watch) -> tuple[np.ndarray, object]:
    """The starting latents of an inpainting request and its step extension; sets the scheduler's begin index
    for ``strength`` (diffusers' get_timesteps)."""
    inp: InpaintInputs = req.inpaint
    m = bundle.manifest
    f, n, c = m.vae_scale_factor, req.total_images, m.latent_channels
    init_steps = min(int(req.steps * req.strength), req.steps)
    if init_steps < 1:
        raise InputError(f"strength={req.strength} with {req.steps} steps runs no denoising step; raise either")
    sched.set_begin_index((req.steps - init_steps) * sched.order)
    strength_max = req.strength == 1.0
    shape = (n, c, req.height // f, req.width // f)

    def encode(x: np.ndarray) -> np.ndarray:  # (1, 3, H, W) -> (N, C, h, w) scaled latents, one sample per image
        with watch.span("vae_encode"):  # tiled as the request asks (runtime/vae_tiling.py), like img2img
            out = tiling.run_vae(components, bundle, "vae_encoder", x, req.vae_tiling, req.vae_tile_size)
        if out.shape[1] == 2 * c:  # diagonal Gaussian parameters: sample them with the request's noise
            mean, logvar = np.split(out, 2, axis=1)
            z = mean + np.exp(0.5 * np.clip(logvar, -30.0, 20.0)) * req.noise.standard_normal(shape)
        else:  # optimum's vae_encoder returns a sample already
            z = np.repeat(out, n, axis=0)
        return ((z - np.float32(m.shift_factor or 0.0)) * np.float32(m.scaling_factor)).astype(np.float32)

    image_latents = encode(inp.image) if not (inp.inpainting_unet and strength_max) else None
    noise = req.noise.standard_normal(shape)  # (N, C, h, w)
    if strength_max:  # pure noise: the image comes in through the mask channels or the blend only
        x = (noise * np.float32(sched.init_noise_sigma)).astype(np.float32)
    else:
        x = sched.add_noise(image_latents, noise, sched.begin_index)
    mask = np.repeat(inp.mask[:, :, ::f, ::f], n, axis=0)  # (N, 1, h, w): nearest, as F.interpolate
    if inp.inpainting_unet:
        return x, InpaintingUnet(np.concatenate([mask, encode(inp.masked_image)], axis=1))
    if _samples(bundle):
        req.noise.standard_normal(shape)  # diffusers' draw for the masked image it encodes and does not use
    return x, LatentBlend(image_latents, noise, mask)


def _samples(bundle) -> bool:
    """True when the vae_encoder returns Gaussian parameters (sampled with the request's noise), not a sample."""
    spec = bundle.component("vae_encoder").outputs[0]
    return spec.shape[1] == 2 * bundle.manifest.latent_channels if isinstance(spec.shape[1], int) else True
