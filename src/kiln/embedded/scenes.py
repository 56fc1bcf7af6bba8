"""Procedural scenes: one flat-coloured shape on a flat background, a sign, or a word, drawn
anti-aliased.

A scene is the ground truth that captions describe and the scorecard checks against. Words are
2–6 capital letters in the font that ships with Pillow, drawn one letter to an 8-pixel cell, the
word's box on an 8-pixel grid: every letter lands exactly on one cell of the UNet's 8x8 level, on
2x2 of its 16x16 level and on 4x4 latent cells, always in the same phase.
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

NATIVE_SIZE = 64
_SUPERSAMPLE = 4

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "centre")
SIZES = ("small", "large")
KINDS = ("shape", "shape_word", "sign", "word")
"""A plain shape; a shape with a word on it; a sign that says a word; a word on the background."""
KIND_WEIGHTS = (0.3, 0.25, 0.2, 0.25)
LETTERS = string.ascii_uppercase
WORD_LENGTHS = (2, 6)
SIGN_PAD = 4
"""Native pixels of sign around its word."""
WORD_GRID = 8
"""Words start on this grid of native pixels: the UNet's 8x8 level (64 / 8)."""
LETTER_PITCH = 8
"""Native pixels per letter cell: one cell of the UNet's 8x8 level, so each letter's latent patch
is drawn in one phase only (a 9-pixel pitch put each letter of a word in a different phase of the
grid, four versions of every glyph for the networks to learn)."""
FONT_SIZE = 11
"""Pillow's default font at this size: capitals about 8 native pixels tall."""
STROKE = 0.5
"""Extra stroke width in native pixels, so letters stay bold enough for the autoencoder."""
DARK_COLORS = frozenset({"red", "green", "blue", "purple", "black"})

# Centre of the object for each position, as a fraction of the image side.
POSITION_CENTRES: dict[str, tuple[float, float]] = {
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
    "centre": (0.5, 0.5),
}
# Half the object's extent, as a fraction of the image side. Objects are big enough to stay
# several latent pixels wide after the autoencoder's downsampling, so shape survives.
SIZE_RADII: dict[str, float] = {"small": 0.12, "large": 0.22}
POSITION_JITTER = 0.03
RADIUS_JITTER = (0.9, 1.1)


@dataclass(frozen=True)
class Scene:
    """What a picture shows. For a sign, `color` is the sign's colour; for a word alone, the
    letters' colour. `word` and `text_color` are set for every kind but "shape"."""

    color: str
    shape: str
    position: str
    size: str
    background: str
    word: str | None = None
    text_color: str | None = None
    kind: str = "shape"


def contrast_color(color: str) -> str:
    """The letter colour on a sign or shape of `color`: white on dark colours, black on light."""
    return "white" if color in DARK_COLORS else "black"


def sample_scene(rng: random.Random) -> Scene:
    """A plain shape scene (today's attributes only)."""
    color = rng.choice(COLORS)
    background = rng.choice([c for c in COLORS if c != color])
    return Scene(
        color=color,
        shape=rng.choice(SHAPES),
        position=rng.choice(POSITIONS),
        size=rng.choice(SIZES),
        background=background,
    )


def random_word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(*WORD_LENGTHS)))


def sample_text_scene(rng: random.Random, word: str, kind: str | None = None) -> Scene:
    """A scene of kind "shape_word", "sign" or "word" (random when `kind` is None) showing `word`."""
    kind = kind or rng.choice(KINDS[1:])
    if kind == "shape_word":
        base = sample_scene(rng)
        text = contrast_color(base.color)
        background = rng.choice([c for c in COLORS if c not in (base.color, text)])
        return Scene(base.color, base.shape, base.position, base.size, background, word, text, kind)
    color = rng.choice(COLORS)
    if kind == "sign":
        text = contrast_color(color)
        background = rng.choice([c for c in COLORS if c not in (color, text)])
        return Scene(color, "sign", "centre", "large", background, word, text, kind)
    background = rng.choice([c for c in COLORS if c != color])
    if kind == "word":
        return Scene(color, "text", "centre", "large", background, word, color, kind)
    raise ValueError(f"unknown scene kind {kind!r}")


def sample_any_scene(rng: random.Random, word_source) -> Scene:
    """A scene of any kind, by KIND_WEIGHTS; `word_source(rng)` picks the word for text kinds."""
    kind = rng.choices(KINDS, weights=KIND_WEIGHTS)[0]
    if kind == "shape":
        return sample_scene(rng)
    return sample_text_scene(rng, word_source(rng), kind)


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def text_box(word: str, centre: tuple[float, float], size: int = NATIVE_SIZE) -> tuple[int, int, int, int]:
    """The word's box (x0, y0, x1, y1) in native pixels: one LETTER_PITCH cell a letter, centred
    near `centre` (fractions), snapped to WORD_GRID and kept inside the picture."""
    grid = WORD_GRID * size // NATIVE_SIZE
    pitch = LETTER_PITCH * size // NATIVE_SIZE
    width = len(word) * pitch
    x0 = round((centre[0] * size - width / 2) / grid) * grid
    y0 = round((centre[1] * size - pitch / 2) / grid) * grid
    x0 = min(max(x0, grid), (size - grid - width) // grid * grid)
    y0 = min(max(y0, grid), (size - grid - pitch) // grid * grid)
    return x0, y0, x0 + width, y0 + pitch


def _draw_word(draw: ImageDraw.ImageDraw, word: str, box, scale: int, fill) -> None:
    font = _font(FONT_SIZE * scale * NATIVE_SIZE // NATIVE_SIZE)
    pitch = (box[2] - box[0]) // len(word)
    _, cap_top, _, baseline = font.getbbox("H", anchor="ls")
    cap_height = baseline - cap_top
    y = (box[1] + box[3]) / 2 + cap_height / 2
    for i, letter in enumerate(word):
        left, _, right, _ = font.getbbox(letter, anchor="ls")
        x = box[0] + i * pitch + pitch / 2 - (left + right) / 2
        draw.text(
            (x, y), letter, fill=fill, font=font, anchor="ls",
            stroke_width=round(STROKE * scale), stroke_fill=fill,
        )


def _draw_shape(draw, scene: Scene, cx: float, cy: float, r: float) -> None:
    fill = PALETTE[scene.color]
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "square":
        s = r * 0.9  # a square of the same area feel as the circle
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    else:
        h = r * 1.15  # a little taller than the circle so its bounding box reads as the same size
        top = (cx, cy - h)
        left = (cx - h * math.sin(math.pi / 3), cy + h / 2)
        right = (cx + h * math.sin(math.pi / 3), cy + h / 2)
        draw.polygon([top, left, right], fill=fill)


@dataclass(frozen=True)
class Layout:
    """Where a scene's parts land: the shape's centre and radius (fractions of the side), the
    word's box in pixels (None without a word)."""

    cx: float
    cy: float
    radius: float
    word_box: tuple[int, int, int, int] | None


def layout(scene: Scene, rng: random.Random | None = None, size: int = NATIVE_SIZE) -> Layout:
    """Lay a scene out; with `rng`, jitter the shape's position and size a little so no two draws
    are equal (words and signs stay on the grid)."""
    cx, cy = POSITION_CENTRES[scene.position]
    radius = SIZE_RADII[scene.size]
    if scene.kind in ("shape", "shape_word") and rng is not None:
        cx += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
        cy += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
        radius *= rng.uniform(*RADIUS_JITTER)
    box = text_box(scene.word, (cx, cy), size) if scene.word else None
    return Layout(cx, cy, radius, box)


def letter_boxes(word_box: tuple[int, int, int, int], length: int) -> list[tuple[int, int, int, int]]:
    """Each letter's cell (x0, y0, x1, y1) inside a word's box: one LETTER_PITCH a letter."""
    x0, y0, x1, y1 = word_box
    pitch = (x1 - x0) // length
    return [(x0 + i * pitch, y0, x0 + (i + 1) * pitch, y1) for i in range(length)]


def draw_scene(scene: Scene, rng: random.Random | None = None, size: int = NATIVE_SIZE) -> Image.Image:
    """Draw a scene (laid out by `layout`, jittered with `rng`)."""
    return render(scene, layout(scene, rng, size), size)


def render(scene: Scene, where: Layout, size: int = NATIVE_SIZE) -> Image.Image:
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), PALETTE[scene.background])
    draw = ImageDraw.Draw(image)
    if scene.kind in ("shape", "shape_word"):
        _draw_shape(draw, scene, where.cx * big, where.cy * big, where.radius * big)
    if where.word_box is not None:
        x0, y0, x1, y1 = (v * _SUPERSAMPLE for v in where.word_box)
        if scene.kind == "sign":
            pad = SIGN_PAD * size // NATIVE_SIZE * _SUPERSAMPLE
            draw.rectangle((x0 - pad, y0 - pad, x1 + pad - 1, y1 + pad - 1), fill=PALETTE[scene.color])
        _draw_word(draw, scene.word, (x0, y0, x1, y1), _SUPERSAMPLE * size // NATIVE_SIZE, PALETTE[scene.text_color])
    return image.resize((size, size), Image.Resampling.LANCZOS)


def all_scenes() -> list[Scene]:
    """Every distinct plain-shape scene (8 x 7 x 3 x 5 x 2 = 1,680), in a fixed order."""
    return [
        Scene(color, shape, position, size, background)
        for color in COLORS
        for background in COLORS
        if background != color
        for shape in SHAPES
        for position in POSITIONS
        for size in SIZES
    ]


def scene_batch(scenes: list[Scene], rng: random.Random, size: int = NATIVE_SIZE) -> np.ndarray:
    """Draw scenes into a float array in [-1, 1], shaped (N, 3, H, W)."""
    return scene_batch_with_layouts(scenes, rng, size)[0]


def scene_batch_with_layouts(
    scenes: list[Scene], rng: random.Random, size: int = NATIVE_SIZE
) -> tuple[np.ndarray, list[Layout]]:
    """`scene_batch`, and where each scene's parts were drawn (its word's box, for one)."""
    layouts = [layout(s, rng, size) for s in scenes]
    arrays = [np.asarray(render(s, where, size), dtype=np.float32) for s, where in zip(scenes, layouts)]
    batch = np.stack(arrays).transpose(0, 3, 1, 2)
    return batch / 127.5 - 1.0, layouts
