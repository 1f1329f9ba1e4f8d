"""Pixels <-> arrays, as diffusers' VaeImageProcessor does it (so images match diffusers' to the last bit)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError


def to_uint8(decoded: np.ndarray) -> np.ndarray:
    """VAE output (B, 3, H, W) float32 in [-1, 1] -> (B, H, W, 3) uint8: denormalize, clamp, *255, round."""
    x = np.clip(decoded / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)  # (B, H, W, 3) float32 in [0, 1]
    return (x * 255).round().astype(np.uint8)


def to_float(decoded: np.ndarray) -> np.ndarray:
    """VAE output -> (B, H, W, 3) float32 in [0, 1], diffusers' ``output_type="np"``."""
    return np.clip(decoded / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1).astype(np.float32)


MAX_INIT_PIXELS = 64 * 2**20  # 8192 x 8192: far beyond any model's size, far below what exhausts memory


def _check_pixels(size: tuple[int, int]) -> None:
    w, h = size
    if w * h > MAX_INIT_PIXELS:
        raise InputError(f"init image is {w}x{h} ({w * h / 1e6:.0f} megapixels); the limit is "
                         f"{MAX_INIT_PIXELS / 1e6:.0f} megapixels: downscale it first")


def open_image(source, name: str = "init image", *, what: str = "image"):
    """A path or PIL image -> a loaded PIL image in its own mode. The pixel limit is checked from the file's header,
    before decoding (a decompression bomb never reaches memory); ``name`` and ``what`` name it in messages."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise InputError(f"{name} not found: {path}")
        try:
            with Image.open(path) as im:
                _check_pixels(im.size)
                im.load()
                return im.copy()
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"cannot read {name} {path}: {exc.__class__.__name__}; use a PNG or JPEG") from None
        except Image.DecompressionBombError:
            raise InputError(f"{name} {path} is too large to decode safely; use one of at most "
                             f"{MAX_INIT_PIXELS // 10**6} megapixels") from None
    if isinstance(source, Image.Image):
        _check_pixels(source.size)
        return source
    raise InputError(f"{what} must be an image (a path or a PIL.Image), not {type(source).__name__}")


def load_image(source, *, multiple: int):
    """An init image (path or PIL image) -> (1, 3, H, W) float32 in [-1, 1], H and W rounded down to ``multiple``
    (diffusers' VaeImageProcessor.preprocess: resize with Lanczos, normalize)."""
    from PIL import Image

    img = open_image(source).convert("RGB")
    w, h = (d - d % multiple for d in img.size)
    if w < multiple or h < multiple:
        raise InputError(f"init image is {img.size[0]}x{img.size[1]}; it must be at least {multiple}x{multiple} pixels")
    if (w, h) != img.size:
        img = img.resize((w, h), resample=Image.LANCZOS)
    arr = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3)
    return (arr.transpose(2, 0, 1)[None] * 2.0 - 1.0).astype(np.float32)  # (1, 3, H, W) in [-1, 1]
