"""TensorRT optimization profiles derived from a bundle's manifest: one source of truth for input names,
dynamic axes, profile shapes and the runtime's buffer shapes.

A profile is given in user terms -- images per call, image height and width in pixels, classifier-free guidance
on or off -- and each component's symbolic dims are mapped from them:

    batch         images x 2 for the denoiser and text encoders with CFG (one conditional and one unconditional
                  row per image; without CFG, or at the minimum, images), images for the VAE
    height, width image size / vae_scale_factor (latents)
    image_height, image_width   image size in pixels (VAE image side)
    feature_height, feature_width   a DeepCache shallow graph's cached feature (export --deepcache B): the
                  latent size halved once per down block above the branch's block (block = B // 3), rounded up as
                  the UNet's stride-2 downsamplers round
    sequence      the text tokens: CLIP's fixed length (77); for the transformer families a T5 encoder's
                  ``max_sequence_length``, chosen per call up to the bundle's limit (a range, even in a static
                  profile), and the SD3 transformer's joint CLIP + T5 sequence (77 + that)

The denoiser batch (DeepCache's full and shallow UNets' too) doubles with classifier-free guidance, except in
families that never run it: FLUX.1's guidance is an input of its transformer (one batch per step,
runtime/families/flux.py).

Dims named differently by other exporters (optimum's ``batch_size``, ``sequence_length``, ...) are aliased; an
unknown symbolic dim is refused with its name, since guessing it would build an engine that rejects real inputs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from edgediff.bundle.manifest import Component, Manifest, TensorSpec
from edgediff.bundle.schema import DEEPCACHE_COMPONENTS, DEEPCACHE_MAX_BRANCHES, deepcache_shallow
from edgediff.deepcache import branch_position
from edgediff.errors import EngineError, InputError

ALIASES = {"batch_size": "batch", "N": "batch", "sequence_length": "sequence", "seq_len": "sequence",
           "num_channels": None}
CFG_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", *DEEPCACHE_COMPONENTS)
# a DeepCache shallow graph -> its branch's down block: the cached feature is at the latent size / 2 ** block
FEATURE_BLOCK = {deepcache_shallow(b): branch_position(b)[0] for b in range(DEEPCACHE_MAX_BRANCHES)}
NO_CFG_FAMILIES = ("flux",)
# the component that is T5 in a family, and the length diffusers' SD3 pipeline and FLUX.1-schnell run by default
# (the profile's opt point; FLUX.1-dev's 512 lies within the range when the bundle's limit allows it)
T5_ENCODER = {"sd3": "text_encoder_3", "flux": "text_encoder_2"}
T5_DEFAULT_LENGTH = 256
Triple = tuple[int, int, int]


@dataclass(frozen=True)
class ShapeRange:
    """min / opt / max of each user-facing quantity; opt is what TensorRT tunes kernels for."""

    images: Triple = (1, 1, 4)
    height: Triple = (256, 512, 768)
    width: Triple = (256, 512, 768)
    cfg: bool = True

    def __post_init__(self) -> None:
        for name in ("images", "height", "width"):
            lo, opt, hi = getattr(self, name)
            if not 1 <= lo <= opt <= hi:
                raise InputError(f"profile {name} {lo}:{opt}:{hi}; expected 1 <= min <= opt <= max")

    @property
    def static(self) -> bool:
        return all(len(set(getattr(self, n))) == 1 for n in ("images", "height", "width"))

    def describe(self) -> dict:
        return {"images": list(self.images), "height": list(self.height), "width": list(self.width), "cfg": self.cfg}


def static_range(images: int, height: int, width: int, cfg: bool = True) -> ShapeRange:
    return ShapeRange((images,) * 3, (height,) * 3, (width,) * 3, cfg)


def default_range(manifest: Manifest, multiple: int) -> ShapeRange:
    """Half to one and a half times the model's native size, tuned for the native size, 1-4 images. ``multiple``:
    the size step of the model (VAE factor x UNet downsampling: 64 for SD 1.x/2.x)."""
    h, w = manifest.default_height, manifest.default_width
    m = multiple
    lo = lambda v: max(m, (v // 2) // m * m)  # noqa: E731
    hi = lambda v: (v * 3 // 2 + m - 1) // m * m  # noqa: E731
    return ShapeRange((1, 1, 4), (lo(h), h, hi(h)), (lo(w), w, hi(w)), True)


def parse_profile(text: str, manifest: Manifest, multiple: int) -> ShapeRange:
    """``images=1:1:4,height=256:512:768,width=256:512:768`` (any subset; the rest from ``default_range``)."""
    base = default_range(manifest, multiple).describe()
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(images|height|width)=(\d+):(\d+):(\d+)", part)
        if not m:
            raise InputError(f"--profile {part!r}; expected NAME=MIN:OPT:MAX with NAME one of images, height, width")
        base[m.group(1)] = [int(m.group(i)) for i in (2, 3, 4)]
    for name in ("height", "width"):
        if any(v % multiple for v in base[name]):
            raise InputError(f"--profile {name}={':'.join(map(str, base[name]))}: sizes must be multiples of {multiple}")
    return ShapeRange(tuple(base["images"]), tuple(base["height"]), tuple(base["width"]), True)


def text_sequence(component: str, manifest: Manifest) -> Triple:
    """min / opt / max of ``component``'s ``sequence`` axis (see the module doc). CLIP's is one fixed length."""
    clip = manifest.text_max_length
    t5_name = T5_ENCODER.get(manifest.family)
    if t5_name is None or component not in (t5_name, "transformer"):
        return (clip, clip, clip)
    # without T5 (an SD3 folder saved with text_encoder_3=None) the transformer still takes L zero rows
    limit = manifest.max_sequence_length or T5_DEFAULT_LENGTH
    t5 = (1, min(T5_DEFAULT_LENGTH, limit), limit)
    if component == "transformer" and manifest.family == "sd3":
        return tuple(clip + v for v in t5)  # type: ignore[return-value]
    return t5


def dim_values(component: str, manifest: Manifest, images: int, height: int, width: int, cfg: bool,
               *, at_min: bool = False, point: int = 1) -> dict[str, int]:
    """Each symbolic dim's value for ``images`` x ``height`` x ``width`` (pixels); ``point`` 0/1/2 picks the
    text sequence's min/opt/max (text_sequence)."""
    f = manifest.vae_scale_factor
    if height % f or width % f:
        raise InputError(f"{width}x{height} is not a multiple of the VAE factor {f}")
    doubled = cfg and component in CFG_COMPONENTS and manifest.family not in NO_CFG_FAMILIES and not at_min
    values = {"batch": images * (2 if doubled else 1), "height": height // f, "width": width // f,
              "image_height": height, "image_width": width, "sequence": text_sequence(component, manifest)[point]}
    if component in FEATURE_BLOCK:
        scale = 2 ** FEATURE_BLOCK[component]
        values.update(feature_height=-(-(height // f) // scale), feature_width=-(-(width // f) // scale))
    return values


def profile_shapes(comp: Component, manifest: Manifest, r: ShapeRange) -> dict[str, tuple[tuple[int, ...], ...]]:
    """``{input name: (min shape, opt shape, max shape)}`` for ``comp``, ready for IOptimizationProfile.set_shape.
    The minimum batch is the no-CFG one (a guidance <= 1 call runs the denoiser at batch = images). A static range
    fixes images and size; a T5 sequence stays a range (each call picks its max_sequence_length)."""
    points = [dim_values(comp.name, manifest, r.images[i], r.height[i], r.width[i], r.cfg, at_min=(i == 0), point=i)
              for i in range(3)]
    if r.static:
        points = [dim_values(comp.name, manifest, r.images[1], r.height[1], r.width[1], r.cfg, point=i)
                  for i in range(3)]
    hint = "re-export with edgediff export, or fix the shapes with edgediff optimize --static"
    return {spec.name: tuple(input_shape(comp.name, spec, values, hint=hint) for values in points)
            for spec in comp.inputs}


def input_shape(component: str, spec: TensorSpec, values: Mapping[str, int], *, hint: str) -> tuple[int, ...]:
    """``spec``'s shape with each symbolic dim replaced by its value from ``dim_values``; the same rule for every
    input a family adds (SDXL's ``text_embeds`` (batch, 1280) and ``time_ids`` (batch, 6) follow the batch like
    ``sample``). An unknown symbolic dim is refused with its name and ``hint``."""
    shape = []
    for d in spec.shape:
        if isinstance(d, int):
            shape.append(d)
            continue
        name = ALIASES.get(d, d)
        if name not in values:
            raise EngineError(f"{component}.{spec.name}: symbolic dim {d!r} has no known meaning; {hint}")
        shape.append(values[name])
    return tuple(shape)


def shape_range_for(bundle, *, static: str | None = None, profile: str | None = None, cfg: bool = True) -> ShapeRange:
    """The shape range ``edgediff build`` builds for: one fixed shape (``--static IMAGESxHEIGHTxWIDTH``), a given
    ``--profile``, or the bundle's default range; ``cfg=False`` when the denoiser never runs guided."""
    import dataclasses

    from edgediff.engines.optimize import parse_static
    from edgediff.errors import InputError

    if static and profile:
        raise InputError("give --static or --profile, not both")
    if static:
        s = parse_static(static, cfg=cfg)
        return static_range(s.images, s.height, s.width, cfg=cfg)
    r = parse_profile(profile, bundle.manifest, bundle.size_multiple) if profile else \
        default_range(bundle.manifest, bundle.size_multiple)
    return r if cfg else dataclasses.replace(r, cfg=False)
