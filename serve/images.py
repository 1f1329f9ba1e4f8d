"""Image bytes in and out of the server: uploads (multipart files, base64 strings) become PIL images after their
header is checked, results become PNG (with the generation parameters, like ``edgediff generate``), JPEG or WebP."""
from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Any

from edgediff.images import MAX_INIT_PIXELS

from .errors import bad_request

OUTPUT_FORMATS = ("png", "jpeg", "webp")
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)


def decode_base64(value: Any, param: str) -> bytes:
    """A base64 string (optionally a ``data:image/...;base64,`` URL, as A1111 clients send) -> bytes."""
    if not isinstance(value, str) or not value:
        raise bad_request(f"{param} must be a non-empty base64 string, not {type(value).__name__}", param)
    text = _DATA_URL.sub("", value.strip(), count=1)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param} is not valid base64 (standard alphabet, padded); send the image file's bytes "
                          "base64-encoded", param) from None


def open_image(data: bytes, param: str):
    """Upload bytes -> an RGB PIL image."""
    return _decode(data, param, "a PNG, JPEG or WebP file").convert("RGB")


def open_mask(data: bytes, param: str):
    """An edits ``mask`` upload -> the pipeline's mask (mode "L", white = repaint). OpenAI's convention: the fully
    transparent pixels (alpha 0) are the ones to edit. A mask without transparency is read as diffusers reads one
    (white = repaint), so a diffusers-style black-and-white mask works too."""
    im = _decode(data, param, "a PNG whose transparent pixels mark what to edit")
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        alpha = im.convert("RGBA").getchannel("A")
        return alpha.point(lambda a: 255 if a == 0 else 0)  # transparent -> repaint (white)
    return im.convert("L")


def _decode(data: bytes, param: str, wanted: str):
    """Upload bytes -> a loaded PIL image in its own mode. The pixel count is checked from the header, before
    decoding, so a decompression bomb is refused without being expanded."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise bad_request(f"{param} is empty; send {wanted}", param)
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > MAX_INIT_PIXELS:
                raise bad_request(f"{param} is {w}x{h}; the limit is {MAX_INIT_PIXELS // 10**6} megapixels", param)
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        raise bad_request(f"{param} is not an image this server can read; send {wanted}", param) from None


def fit(image, size: tuple[int, int] | None):
    """``image`` resized to (height, width) with Lanczos when a size was asked for, else as it is."""
    if size is None or (image.size[1], image.size[0]) == size:
        return image
    from PIL import Image

    return image.resize((size[1], size[0]), resample=Image.LANCZOS)


def encode(image, fmt: str, parameters: dict[str, Any], quality: int | None = None) -> bytes:
    """One result image as file bytes. PNG carries the generation parameters in a tEXt chunk ("parameters",
    JSON), exactly as ``edgediff generate`` writes them; JPEG/WebP take ``quality`` (OpenAI's output_compression,
    default 90)."""
    if fmt == "png":
        from edgediff.outputs import png_bytes

        return png_bytes(image, parameters)
    buf = io.BytesIO()
    image.save(buf, format="JPEG" if fmt == "jpeg" else "WEBP", quality=90 if quality is None else quality)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
