"""A pixel judge of prompt adherence for the shapes world (no neural network): from an image alone, decide the
shape's colour, type, size and grid position.

Method: the background is the median of the border pixels; the foreground mask is every pixel far from it in RGB;
the largest connected component is the shape. Colour: nearest named colour to the mask's median. Position: the
grid cell of the mask's centroid. Size: mask area against a threshold between the two sizes. Shape: geometry of the
mask — fill ratio of its bounding box (square ~1, circle ~pi/4, cross and triangle ~1/2) and where the mass sits
(a triangle's is low and wide at the bottom, a cross's at the centre lines).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgediff.export.recipes.shapes.dataset import BACKGROUNDS, COLOURS, POSITIONS, SIZE, SIZES, Scene

_COLOUR_NAMES = list(COLOURS)
_COLOUR_RGB = np.array([COLOURS[c] for c in _COLOUR_NAMES], np.float32)
# area threshold between small and large: geometric mean of the two sizes' typical areas
_AREA_SPLIT = (2 * SIZES["small"]) * (2 * SIZES["large"]) * 0.62


@dataclass(frozen=True)
class Verdict:
    shape: str | None
    colour: str | None
    size: str | None
    position: str | None

    def check(self, want: Scene) -> dict[str, bool]:
        got = {"shape": self.shape == want.shape, "colour": self.colour == want.colour,
               "size": self.size == want.size, "position": self.position == want.position}
        got["all"] = all(got.values())
        return got


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """4-connected largest component by a simple flood fill (64x64: fast enough in numpy/python)."""
    labels = np.zeros(mask.shape, np.int32)
    best, best_size, current = 0, 0, 0
    ys, xs = np.nonzero(mask)
    for y0, x0 in zip(ys, xs):
        if labels[y0, x0]:
            continue
        current += 1
        stack = [(y0, x0)]
        labels[y0, x0] = current
        size = 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else mask


def judge(image: np.ndarray) -> Verdict:
    """``image``: (64, 64, 3) uint8 (or PIL). Returns what the image shows; None where nothing is found."""
    img = np.asarray(image, dtype=np.float32)[..., :3]
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(img - bg, axis=-1)
    peak = float(dist.max())
    if peak < 60.0:
        return Verdict(None, None, None, None)
    # half the peak contrast: the edge of a blurred shape, independent of how contrasty the colours are
    mask = _largest_component(dist > 0.5 * peak)
    if mask.sum() < 6:
        return Verdict(None, None, None, None)
    ys, xs = np.nonzero(mask)
    core = mask & (dist > 0.8 * peak)  # away from edges blended with the background
    core = core if core.any() else mask
    colour = _COLOUR_NAMES[int(np.argmin(np.linalg.norm(_COLOUR_RGB - np.median(img[core], axis=0), axis=1)))]
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
    # the triangle's centroid sits below its bounding-box centre; use the bbox centre for the grid cell
    by, bx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    cell = SIZE / 3
    position = POSITIONS[int(min(2, by // cell)) * 3 + int(min(2, bx // cell))]
    area = float(mask.sum())
    size = "large" if area > _AREA_SPLIT else "small"
    shape = _classify(mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1], cy - ys.min(), cx - xs.min())
    return Verdict(shape=shape, colour=colour, size=size, position=position)


def _classify(box: np.ndarray, cy: float, cx: float) -> str:
    """Corner patches of the bounding box tell squares (all four full) and triangles (bottom full, top empty) from
    circles and crosses (all empty); a row a fifth of the way down then separates the circle (a wide chord) from
    the cross (only its narrow vertical bar)."""
    h, w = box.shape
    k = max(1, min(h, w) // 4)
    top = (box[:k, :k].mean() + box[:k, -k:].mean()) / 2
    bottom = (box[-k:, :k].mean() + box[-k:, -k:].mean()) / 2
    if top > 0.55 and bottom > 0.55:
        return "square"
    if bottom - top > 0.3:
        return "triangle"
    return "circle" if box[max(1, h // 5)].mean() > 0.5 else "cross"
