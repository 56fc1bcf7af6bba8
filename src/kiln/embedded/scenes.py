"""Procedural scenes: one flat-coloured shape on a flat background, drawn anti-aliased.

A scene is the ground truth that captions describe and the scorecard checks against.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

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

# Centre of the object for each position, as a fraction of the image side.
POSITION_CENTRES: dict[str, tuple[float, float]] = {
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
    "centre": (0.5, 0.5),
}
# Half the object's extent, as a fraction of the image side. Objects are big enough to stay
# several latent pixels wide after the autoencoder's 4x downsampling, so shape survives.
SIZE_RADII: dict[str, float] = {"small": 0.12, "large": 0.22}
POSITION_JITTER = 0.03
RADIUS_JITTER = (0.9, 1.1)


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    position: str
    size: str
    background: str


def sample_scene(rng: random.Random) -> Scene:
    color = rng.choice(COLORS)
    background = rng.choice([c for c in COLORS if c != color])
    return Scene(
        color=color,
        shape=rng.choice(SHAPES),
        position=rng.choice(POSITIONS),
        size=rng.choice(SIZES),
        background=background,
    )


def draw_scene(scene: Scene, rng: random.Random | None = None, size: int = NATIVE_SIZE) -> Image.Image:
    """Draw a scene; with `rng`, jitter the position and size a little so no two draws are equal."""
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), PALETTE[scene.background])
    draw = ImageDraw.Draw(image)
    cx, cy = POSITION_CENTRES[scene.position]
    radius = SIZE_RADII[scene.size]
    if rng is not None:
        cx += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
        cy += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
        radius *= rng.uniform(*RADIUS_JITTER)
    cx, cy, r = cx * big, cy * big, radius * big
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
    return image.resize((size, size), Image.Resampling.LANCZOS)


def all_scenes() -> list[Scene]:
    """Every distinct scene (8 x 7 x 3 x 5 x 2 = 1,680), in a fixed order."""
    return [
        Scene(color, shape, position, size, background)
        for color in COLORS
        for background in COLORS
        if background != color
        for shape in SHAPES
        for position in POSITIONS
        for size in SIZES
    ]


def scene_batch(scenes: list[Scene], rng: random.Random) -> np.ndarray:
    """Draw scenes into a float array in [-1, 1], shaped (N, 3, H, W)."""
    arrays = [np.asarray(draw_scene(s, rng), dtype=np.float32) for s in scenes]
    batch = np.stack(arrays).transpose(0, 3, 1, 2)
    return batch / 127.5 - 1.0
