"""Procedural 64x64 scenes: one shape of a named colour and size at a 3x3 grid position on a plain background,
with varied natural captions. Seeded; no downloads. Some (colour, shape) pairs never occur in training: they are
held out to test compositional generalisation (every colour and every shape still appears in training).

The training recipe renders from it and the torch-free eval (``edgediff.bench.shapes``) judges against it, so it
imports numpy only: no torch, here or in the package ``__init__`` files above it."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

SIZE = 64
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {  # name -> RGB, far apart from each other
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (35, 70, 220), "yellow": (240, 220, 30),
    "purple": (140, 40, 180), "orange": (245, 140, 20), "cyan": (30, 210, 220), "pink": (250, 120, 190),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
SIZES = {"small": 5.5, "large": 10.5}  # half-width of the shape's bounding box in pixels
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
POSITIONS = tuple(f"{r} {c}" for r in ROWS for c in COLS)
# (colour, shape) pairs never rendered for training: each colour and each shape is still seen with others
HELDOUT = frozenset({("red", "triangle"), ("green", "cross"), ("blue", "circle"), ("yellow", "square"),
                     ("purple", "cross"), ("orange", "circle"), ("cyan", "triangle"), ("pink", "square")})


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str  # "top left" ... "bottom right"
    background: str

    @property
    def heldout(self) -> bool:
        return (self.colour, self.shape) in HELDOUT

    def center(self) -> tuple[float, float]:
        """(x, y) pixel centre of the grid cell."""
        row, col = self.position.split()
        cell = SIZE / 3
        return (COLS.index(col) + 0.5) * cell, (ROWS.index(row) + 0.5) * cell


def all_scenes(split: str) -> list[Scene]:
    """Every scene of a split: "train" (pairs not held out) or "heldout"."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split {split!r}; expected 'train' or 'heldout'")
    out = []
    for shape, colour, size, pos, bg in itertools.product(SHAPES, COLOURS, SIZES, POSITIONS, BACKGROUNDS):
        s = Scene(shape, colour, size, pos, bg)
        if s.heldout == (split == "heldout"):
            out.append(s)
    return out


def sample_scenes(rng: np.random.Generator, n: int, split: str = "train") -> list[Scene]:
    pool = all_scenes(split)
    return [pool[i] for i in rng.integers(0, len(pool), n)]


def render(scene: Scene) -> np.ndarray:
    """(64, 64, 3) uint8, anti-aliased by 4x supersampling."""
    ss = 4
    n = SIZE * ss
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / ss  # pixel-centre coordinates in output pixels
    cx, cy = scene.center()
    r = SIZES[scene.size]
    dx, dy = x - cx, y - cy
    if scene.shape == "circle":
        mask = dx**2 + dy**2 <= r**2
    elif scene.shape == "square":
        mask = (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    elif scene.shape == "triangle":  # upright isosceles, base at the bottom
        h = 1.8 * r
        top = cy - h / 2
        t = (y - top) / h
        mask = (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
    else:  # cross: two bars, a third of the width each
        w = r / 3
        mask = ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    img = np.empty((n, n, 3), np.float32)
    img[:] = BACKGROUNDS[scene.background]
    img[mask] = COLOURS[scene.colour]
    img = img.reshape(SIZE, ss, SIZE, ss, 3).mean(axis=(1, 3))
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


_POSITION_WORDS = {
    "top left": ["top left corner", "upper left", "top-left"], "top center": ["top center", "top middle", "top"],
    "top right": ["top right corner", "upper right", "top-right"],
    "middle left": ["middle left", "left side", "center left"], "middle center": ["center", "middle", "centre"],
    "middle right": ["middle right", "right side", "center right"],
    "bottom left": ["bottom left corner", "lower left", "bottom-left"],
    "bottom center": ["bottom center", "bottom middle", "bottom"],
    "bottom right": ["bottom right corner", "lower right", "bottom-right"],
}
_SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big", "huge"]}
_TEMPLATES = [
    "a {size} {colour} {shape} in the {pos} on a {bg} background",
    "{colour} {shape}, {size}, {pos}, {bg} backdrop",
    "a {size} {colour} {shape} at the {pos} over a {bg} background",
    "{size} {colour} {shape} {pos} on {bg}",
    "there is a {size} {colour} {shape} in the {pos}, the background is {bg}",
]


def caption(scene: Scene, rng: np.random.Generator) -> str:
    pick = lambda xs: xs[int(rng.integers(0, len(xs)))]  # noqa: E731
    return pick(_TEMPLATES).format(size=pick(_SIZE_WORDS[scene.size]), colour=scene.colour, shape=scene.shape,
                                   pos=pick(_POSITION_WORDS[scene.position]), bg=scene.background)


def canonical_caption(scene: Scene) -> str:
    """The first template with the first word of each attribute: the prompts the evaluation uses."""
    return _TEMPLATES[0].format(size=scene.size, colour=scene.colour, shape=scene.shape,
                                pos=_POSITION_WORDS[scene.position][0], bg=scene.background)


def parse_prompt(prompt: str) -> Scene:
    """Attributes of a prompt written with this module's vocabulary (any template)."""
    p = " " + prompt.lower().replace(",", " ").replace("-", " ") + " "

    def find(options: dict[str, list[str]], what: str) -> str:
        hits = [k for k, words in options.items() for w in words if f" {w.replace('-', ' ')} " in p]
        if not hits:
            raise ValueError(f"no {what} in prompt {prompt!r}")
        return max(hits, key=lambda k: max(len(w) for w in options[k] if f" {w.replace('-', ' ')} " in p))

    shape = find({s: [s] for s in SHAPES}, "shape")
    size = find(_SIZE_WORDS, "size")
    pos = find(_POSITION_WORDS, "position")
    words = p.split()
    colours = [w for w in words if w in COLOURS]
    bgs = [w for w in words if w in BACKGROUNDS]
    if not colours or not bgs:
        raise ValueError(f"no colour or background in prompt {prompt!r}")
    return Scene(shape=shape, colour=colours[0], size=size, position=pos, background=bgs[-1])


def make_dataset(seed: int, n: int, split: str = "train") -> tuple[np.ndarray, list[str], list[Scene]]:
    """(n, 64, 64, 3) uint8 images, their captions, their scenes; deterministic given the seed."""
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(rng, n, split)
    images = np.stack([render(s) for s in scenes])
    captions = [caption(s, rng) for s in scenes]
    return images, captions, scenes
