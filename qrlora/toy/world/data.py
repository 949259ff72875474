"""Procedural, seeded data of the CPU world: a shape (content) filled with a style (pattern + palette).

Every image is a pure function of ``(shape, style, seed)``: position, size, background, pattern phase and colour
jitter are drawn from ``numpy.random.default_rng(seed)``.  Shapes are drawn as an anti-aliased mask (PIL at 4x the
size, box-filtered down), so edges are soft like a decoded latent, and composited over a plain greyish background.

The shapes are chosen to differ in more than their corners (a probe found 16x16-latent models turn squares and
crosses into rounded blobs): a disc, a ring (a hole), a plus (four arms), a triangle (one flat side, apex up), a square
(large and blocky), a star (five thin points) and a heart (two lobes, a point down).  Styles differ in pattern *and*
palette, so the style is readable from a few pixels and the shape from the silhouette.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "heart")
STYLES = ("flat", "stripes", "dots", "gradient", "noise", "checker")
HELD_OUT_SHAPE = "heart"  # the new content adapters learn; never in base training
HELD_OUT_STYLE = "checker"  # the new style adapters learn; never in base training
SEEN_SHAPES = tuple(s for s in SHAPES if s != HELD_OUT_SHAPE)
SEEN_STYLES = tuple(s for s in STYLES if s != HELD_OUT_STYLE)
# Seen shapes and styles, but never this *combination* in base training: one per seen shape, a diagonal, so every
# seen shape and style still trains with the others. Sampling them measures whether the base model composes a
# shape word and a style word it knows, which a merged content + style adapter pair relies on.
HELD_OUT_PAIRS = tuple((shape, SEEN_STYLES[i % len(SEEN_STYLES)]) for i, shape in enumerate(SEEN_SHAPES))
TRAINED_PAIRS = tuple((shape, style) for shape in SEEN_SHAPES for style in SEEN_STYLES if (shape, style) not in HELD_OUT_PAIRS)
IMAGE_SIZE = 32
_SUPERSAMPLE = 4

# (colour A, colour B) of each style, RGB 0..255; jittered by +-12 per channel per image.
_PALETTES = {
    "flat": ((220, 40, 40), (220, 40, 40)),  # solid red
    "stripes": ((30, 60, 210), (240, 240, 240)),  # blue / white diagonal stripes
    "dots": ((250, 210, 30), (30, 140, 60)),  # yellow dots on green
    "gradient": ((130, 30, 170), (40, 210, 220)),  # purple -> cyan, top to bottom
    "noise": ((250, 140, 20), (90, 40, 10)),  # orange / brown speckle
    "checker": ((15, 15, 15), (150, 235, 40)),  # black / lime checkerboard
}


def caption(shape: str, style: str) -> str:
    """The one caption template of the world: ``a {shape} in {style} style``."""
    return f"a {shape} in {style} style"


def corpus() -> tuple[str, ...]:
    """Every caption of the world, held-out words included so the tokenizers know them (one token per word); the
    world's tokenizers are learned from exactly these lines."""
    return tuple(caption(shape, style) for shape in SHAPES for style in STYLES)


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Anti-aliased coverage mask (size, size) float32 in [0, 1] of ``shape`` centred at (cx, cy), radius ``r`` px."""
    k = _SUPERSAMPLE
    canvas = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = cx * k, cy * k, r * k

    def polygon(points):
        draw.polygon([(cx + x * r, cy + y * r) for x, y in points], fill=255)

    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        inner = 0.5 * r
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif shape == "square":
        h = 0.85 * r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=255)
    elif shape == "triangle":
        # equilateral, circumradius 1.25 r, moved down 0.3 r so its bounding box is centred like the other shapes
        polygon([(1.25 * math.cos(a), 1.25 * math.sin(a) + 0.3) for a in (math.radians(d) for d in (-90, 30, 150))])
    elif shape == "star":
        pts = []
        for i in range(10):
            rad = 1.15 if i % 2 == 0 else 0.45
            a = math.radians(-90 + 36 * i)
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        polygon(pts)
    elif shape == "cross":
        t = 0.36  # half arm thickness
        polygon([(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)])
    elif shape == "heart":
        pts = []
        for i in range(64):
            a = 2 * math.pi * i / 64
            x = 16 * math.sin(a) ** 3
            y = 13 * math.cos(a) - 5 * math.cos(2 * a) - 2 * math.cos(3 * a) - math.cos(4 * a)
            pts.append((x / 16.5, -(y + 2.5) / 15.5))
        polygon(pts)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    small = canvas.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _style_fill(style: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """The style's fill (size, size, 3) float32 in 0..255: pattern of its two jittered palette colours."""
    a, b = (np.clip(np.array(c, np.float32) + rng.uniform(-12, 12, 3), 0, 255) for c in _PALETTES[style])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    px, py = rng.uniform(0, 6, 2)  # pattern phase
    if style == "flat":
        t = np.zeros((size, size), np.float32)
    elif style == "stripes":
        t = (((xx + yy + px) % 6.0) < 3.0).astype(np.float32)
    elif style == "dots":
        dx, dy = (xx + px) % 6.0 - 3.0, (yy + py) % 6.0 - 3.0
        t = 1.0 - np.clip(np.sqrt(dx * dx + dy * dy) - 1.3, 0.0, 1.0)  # soft dots of radius ~1.8 px
    elif style == "gradient":
        t = np.clip((yy + rng.uniform(-3, 3)) / (size - 1), 0.0, 1.0)
    elif style == "noise":
        t = (rng.random((size, size)) < 0.5).astype(np.float32)
    elif style == "checker":
        t = ((((xx + px) // 4) + ((yy + py) // 4)) % 2).astype(np.float32)
    else:
        raise ValueError(f"unknown style {style!r}")
    t = t[..., None]
    return (1.0 - t) * a + t * b if style != "dots" else t * a + (1.0 - t) * b


def render(shape: str, style: str, seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """One image (size, size, 3) uint8: ``shape`` filled with ``style`` over a greyish background, from ``seed``."""
    rng = np.random.default_rng(seed)
    r = rng.uniform(0.30, 0.40) * size  # radius: objects span 60-80% of the image
    cx, cy = (size / 2 + rng.uniform(-0.1, 0.1, 2) * size)
    grey = rng.uniform(70, 190)
    background = np.clip(grey + rng.uniform(-15, 15, 3), 0, 255).astype(np.float32)
    mask = _shape_mask(shape, cx, cy, r, size)[..., None]
    image = (1.0 - mask) * background + mask * _style_fill(style, rng, size)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def sample_seed(base_seed: int, index: int) -> int:
    """The seed of image ``index`` of a set seeded ``base_seed`` (distinct sets never share image seeds)."""
    return int(np.random.SeedSequence([base_seed, index]).generate_state(1)[0])


def render_set(pairs: list[tuple[str, str]], base_seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Render ``pairs`` of (shape, style), image i seeded by ``sample_seed(base_seed, i)``: (N, size, size, 3) uint8."""
    return np.stack([render(shape, style, sample_seed(base_seed, i), size) for i, (shape, style) in enumerate(pairs)])


def balanced_pairs(shapes, styles, per_pair: int) -> list[tuple[str, str]]:
    """Every (shape, style) combination ``per_pair`` times, interleaved (combination-major order repeated)."""
    return [(shape, style) for _ in range(per_pair) for shape in shapes for style in styles]


def to_tensor(images: np.ndarray):
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1], the diffusers pixel convention."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
