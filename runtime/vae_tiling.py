"""Tiled VAE decode and encode: diffusers' ``AutoencoderKL.enable_tiling`` (``tiled_decode`` / ``_tiled_encode``) in
numpy, around the bundle's own ``vae_decoder`` / ``vae_encoder`` graphs, so an image whose full decode does not fit
in memory is decoded a tile at a time.

As diffusers does it: tiles of ``tile_sample_min_size`` = the VAE config's ``sample_size`` pixels
(``tile_latent_min_size`` = that / the VAE factor latents), a stride of 3/4 of a tile (``tile_overlap_factor``
0.25), every tile blended into the one above (``blend_v``) and the one to its left (``blend_h``) with a linear ramp
over a quarter tile, in place and in raster order, then cropped to the stride and concatenated. A latent no larger
than one tile is decoded whole, as diffusers does. Tiles near the right and bottom edges are smaller than the rest.

A graph with fixed spatial dims (a static-shape bundle or engine) takes one tile shape only: every tile is then
full-size and the last one along each side is moved back to end at the edge; its larger overlap with the previous
tile is taken from that tile, then ramped over the same quarter tile (for evenly fitting sizes this is diffusers'
arithmetic exactly).

``tiling=None`` (the default) tiles only when the VAE's activation estimate exceeds the memory available now, in the
VAE's own tiles or, if one of those would not fit either, in tiles halved until one does; ``True`` always (when the
image is larger than one tile); ``False`` never.

``tile_px`` (``vae_tile_size=``) replaces ``tile_sample_min_size`` (and so ``tile_latent_min_size`` = it / the factor),
as setting those two attributes on diffusers' AutoencoderKL does. Peak memory follows the tile, not the image: on the
SD-1.5 VAE a 1024x1024 decode peaks at 4.00 GiB whole, 2.06 GiB in diffusers' 512-pixel tiles and 0.94 GiB in
256-pixel tiles, at 1.4x the untiled time (bench/scripts/issue18/tiled_decode_memory.sh). Smaller tiles also see
less context per tile, so seams are blended over less.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import numpy as np

from . import validation as check
from .bundle import layout
from .errors import InputError
from .stages import run_component

OVERLAP = 0.25  # diffusers' AutoencoderKL.tile_overlap_factor
DECODER, ENCODER = "vae_decoder", "vae_encoder"
# graph -> (its image-side input or output, what it takes): decoder latent_sample -> sample; encoder sample -> params
_INPUT = {DECODER: "latent_sample", ENCODER: "sample"}

Run = Callable[[np.ndarray], np.ndarray]  # one graph call on a tile: (N, C, h, w) -> (N, C', h', w')


@dataclass(frozen=True)
class Tiles:
    """How one graph call is split. Sizes are in the graph's input units (latents for the decoder, pixels for the
    encoder); ``scale`` turns input positions into output positions (the VAE factor, or its inverse)."""

    tile: int  # input tile side (tile_latent_min_size for decode, tile_sample_min_size for encode)
    stride: int  # input distance between tile starts: int(tile * (1 - OVERLAP))
    blend: int  # output rows/columns ramped between neighbours: int(output tile * OVERLAP)
    scale: Fraction  # output units per input unit
    fixed: bool = False  # the graph takes only full tiles: the last tile ends at the edge


# -- the tiled call ----------------------------------------------------------------------------------------------
def tiled(run: Run, x: np.ndarray, t: Tiles) -> np.ndarray:
    """``run`` over overlapping tiles of ``x`` ((N, C, H, W)), blended and assembled as diffusers' tiled_decode /
    _tiled_encode do."""
    rows, cols = _starts(x.shape[2], t), _starts(x.shape[3], t)
    tiles = [[run(np.ascontiguousarray(x[:, :, r:r + t.tile, c:c + t.tile])) for c in cols] for r in rows]
    out_r = [int(r * t.scale) for r in rows]  # output position of each tile
    out_c = [int(c * t.scale) for c in cols]
    result_rows = []
    for i, row in enumerate(tiles):
        result_row = []
        for j, tile in enumerate(row):
            # blend the (already blended) tile above and tile to the left into this one, in place, as diffusers
            if i > 0:
                _join(tiles[i - 1][j], tile, out_r[i - 1], out_r[i], t.blend, axis=2)
            if j > 0:
                _join(row[j - 1], tile, out_c[j - 1], out_c[j], t.blend, axis=3)
            h = out_r[i + 1] - out_r[i] if i + 1 < len(rows) else tile.shape[2]
            w = out_c[j + 1] - out_c[j] if j + 1 < len(cols) else tile.shape[3]
            result_row.append(tile[:, :, :h, :w])
        result_rows.append(np.concatenate(result_row, axis=3))
    return np.concatenate(result_rows, axis=2)


def _starts(length: int, t: Tiles) -> list[int]:
    starts = list(range(0, length, t.stride))
    if t.fixed:  # one tile shape: clamp the last tiles back inside (duplicates collapse)
        starts = sorted({min(s, length - t.tile) for s in starts})
    return starts


def _span(axis: int, start: int | None, stop: int | None) -> tuple:
    return (slice(None),) * axis + (slice(start, stop),)


def _join(a: np.ndarray, b: np.ndarray, pos_a: int, pos_b: int, blend: int, *, axis: int) -> None:
    """Blend the end of tile ``a`` (at output position ``pos_a``) into the start of tile ``b`` (at ``pos_b``), in
    place. Where they overlap by more than ``blend`` (a clamped last tile), ``b`` first takes ``a``'s values."""
    overlap = pos_a + a.shape[axis] - pos_b
    skip = max(0, overlap - blend)
    if skip:
        b[_span(axis, 0, skip)] = a[_span(axis, a.shape[axis] - overlap, a.shape[axis] - overlap + skip)]
    _blend(a, b[_span(axis, skip, None)], blend, axis=axis)


def _blend(a: np.ndarray, b: np.ndarray, extent: int, *, axis: int) -> None:
    """diffusers' blend_v (axis 2) / blend_h (axis 3), in place on ``b``: its first rows ramp from ``a``'s last ones,
    b[y] = a[-e + y] * (1 - y / e) + b[y] * (y / e) with e = min(a's, b's size, extent)."""
    e = min(a.shape[axis], b.shape[axis], extent)
    if e <= 0:
        return
    shape = [1] * b.ndim
    shape[axis] = e
    w = (np.arange(e, dtype=np.float32) / np.float32(e)).reshape(shape)  # y / e
    b[_span(axis, 0, e)] = a[_span(axis, a.shape[axis] - e, None)] * (1 - w) + b[_span(axis, 0, e)] * w


# -- what to tile, decided from the bundle ---------------------------------------------------------------------
def check_flag(value) -> bool | None:
    if value is not None and not isinstance(value, (bool, np.bool_)):
        raise InputError(f"vae_tiling must be True, False or None (tile when needed), not {value!r}")
    return None if value is None else bool(value)


TILE_CELLS = 4  # a tile's side in latent cells is a multiple of this: the quarter-tile overlap is whole cells


def check_tile_size(bundle, tile_px, tiling: bool | None) -> int | None:
    """``vae_tile_size``: None (the VAE config's sample_size, diffusers' default) or a pixel count that is a multiple
    of TILE_CELLS latent cells. Only then is a quarter tile whole in latents and in pixels alike; diffusers' tiled
    decode assumes it (its row limit, tile - quarter tile in pixels, must equal the stride, 3/4 of the tile in latent
    cells, times the factor) and returns an image of the wrong size for other tiles."""
    if tile_px is None:
        return None
    step = TILE_CELLS * bundle.manifest.vae_scale_factor
    if isinstance(tile_px, bool) or not isinstance(tile_px, (int, np.integer)):
        raise InputError(f"vae_tile_size must be a whole number of pixels, e.g. {8 * step}, not {tile_px!r}")
    if tile_px % step or tile_px < step:
        raise InputError(f"vae_tile_size={tile_px}: use a positive multiple of {step} pixels ({TILE_CELLS} latent "
                         f"cells, so the quarter-tile overlap is whole), e.g. {8 * step}")
    if tiling is False:
        raise InputError("vae_tile_size sets the tile of tiled VAE decode, which vae_tiling=False turns off: "
                         "drop one of the two")
    return int(tile_px)


def tile_size(bundle) -> int | None:
    """tile_sample_min_size: the VAE config's ``sample_size`` (pixels), or None when the bundle pins no config."""
    cfg = _vae_config(bundle)
    size = cfg.get("sample_size") if cfg else None
    size = size[0] if isinstance(size, (list, tuple)) and size else size
    return int(size) if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def plan(bundle, graph: str, size: tuple[int, int], batch: int, tiling: bool | None,
         tile_px: int | None = None) -> Tiles | None:
    """How to split a ``graph`` call whose input is ``size`` (latent cells for the decoder, pixels for the encoder),
    in tiles of ``tile_px`` pixels (None: the VAE config's sample_size), or None to run it whole. Raises InputError
    when tiling was asked for (or is needed) and cannot run."""
    if tiling is False:
        return None
    f = bundle.manifest.vae_scale_factor
    sample = tile_px if tile_px is not None else tile_size(bundle)
    if sample is None or sample < f:
        if tiling:
            raise InputError(f"{bundle.root} pins no VAE config with a sample_size, so the tile size is unknown; "
                             "re-export the bundle (edgediff export) or drop vae_tiling")
        return None
    latent = sample // f  # tile_latent_min_size
    tile, out_tile, scale = (latent, sample, Fraction(f)) if graph == DECODER else (sample, latent, Fraction(1, f))
    fixed = _fixed_size(bundle, graph)
    if fixed is not None and fixed == tuple(size):
        return None  # the graph takes this whole input: there is nothing to split
    if max(size) <= tile:
        return None  # diffusers decodes (encodes) a latent (image) of at most one tile whole
    if tiling is None and not _too_big(bundle, graph, size, batch):
        return None
    if tiling is None and tile_px is None and fixed is None:  # tiled because memory is short: tiles that fit it
        sample = _fitting_tile(bundle, graph, sample, batch)
        latent = sample // f
        tile, out_tile = (latent, sample) if graph == DECODER else (sample, latent)
    if fixed is not None:
        unit = "latent cells" if graph == DECODER else "pixels"
        if fixed != (tile, tile):
            raise InputError(f"{graph} is fixed to {fixed[1]}x{fixed[0]} {unit} (a static-shape bundle) and cannot "
                             f"run this {size[1]}x{size[0]} input; tiled VAE needs a graph fixed to one "
                             f"{tile}x{tile} tile: use the dynamic bundle, or the size the bundle was built for")
        if min(size) < tile:
            raise InputError(f"{graph} takes only {tile}x{tile} tiles ({unit}) and this input is "
                             f"{size[1]}x{size[0]}: use sides of at least {tile} or the dynamic bundle")
    return Tiles(tile=tile, stride=int(tile * (1 - OVERLAP)), blend=int(out_tile * OVERLAP), scale=scale,
                 fixed=fixed is not None)


def _fitting_tile(bundle, graph: str, sample: int, batch: int) -> int:
    """The VAE's own tile (pixels), halved while one tile's activation estimate does not fit in the memory available
    either, down to TILE_CELLS latent cells (with less memory than that the call fails as it would have)."""
    f = bundle.manifest.vae_scale_factor
    while sample % (2 * TILE_CELLS * f) == 0:
        side = sample // f if graph == DECODER else sample
        if not _too_big(bundle, graph, (side, side), batch):
            break
        sample //= 2
    return sample


def check_request(bundle, tiling: bool | None, *, latent: tuple[int, int], batch: int, img2img: bool,
                  tile_px: int | None = None) -> None:
    """Refuse a forced tiling that cannot run, before any work (the plan is made again when the VAE runs)."""
    if tiling:
        plan(bundle, DECODER, latent, batch, True, tile_px)
        if img2img and bundle.has(ENCODER):
            f = bundle.manifest.vae_scale_factor
            plan(bundle, ENCODER, (latent[0] * f, latent[1] * f), batch, True, tile_px)


def run_vae(components, bundle, graph: str, x: np.ndarray, tiling: bool | None,
            tile_px: int | None = None) -> np.ndarray:
    """The first output of ``graph`` (vae_decoder or vae_encoder) on ``x``, tiled when ``plan`` says so."""
    with components.use(graph) as backend:
        def run(a: np.ndarray) -> np.ndarray:
            feeds = {_INPUT[graph]: a}
            return run_component(backend, feeds, precision=bundle.component(graph).precision)[0]

        tiles = plan(bundle, graph, (x.shape[2], x.shape[3]), x.shape[0], tiling, tile_px)
        return run(x) if tiles is None else tiled(run, x, tiles)


# -- memory -------------------------------------------------------------------------------------------------------
def activation_bytes(*, batch: int, latent_h: int, latent_w: int, vae_scale_factor: int,
                     channels) -> int:
    """A deliberately rough upper estimate of one AutoencoderKL decoder (or encoder) call's activations: the
    mid-block self-attention over the latent grid (scores and softmax, batch * (h*w)^2 float32) plus a few feature
    maps at each resolution, whose widest channel count meets that resolution (on SD's decoder 256 channels at full
    size)."""
    hw = latent_h * latent_w
    attention = 2 * batch * hw * hw * 4
    levels = list(channels) or [128]
    maps = 0
    for i in range(len(levels)):
        side = vae_scale_factor // (2 ** i) or 1  # pixels per latent cell at this level
        c = max(levels[i], levels[min(i + 1, len(levels) - 1)])
        maps += batch * c * hw * side * side * 4 * 4  # ~4 live maps (input, norm, conv out, residual)
    return attention + maps


def _too_big(bundle, graph: str, size: tuple[int, int], batch: int) -> bool:
    f = bundle.manifest.vae_scale_factor
    latent = size if graph == DECODER else (size[0] // f, size[1] // f)
    cfg = _vae_config(bundle) or {}
    need = activation_bytes(batch=batch, latent_h=latent[0], latent_w=latent[1], vae_scale_factor=f,
                            channels=cfg.get("block_out_channels", [128]))
    have = check.available_memory()
    return have is not None and need > have


def _fixed_size(bundle, graph: str) -> tuple[int, int] | None:
    shape = bundle.component(graph).input(_INPUT[graph]).shape
    return (shape[2], shape[3]) if isinstance(shape[2], int) and isinstance(shape[3], int) else None


def _vae_config(bundle) -> dict | None:
    pinned = {f.path for f in bundle.manifest.files}
    for folder in (DECODER, ENCODER, "vae"):
        rel = layout.config_path(folder)
        if rel in pinned:
            return bundle.config(rel)
    return None
