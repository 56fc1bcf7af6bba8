"""Read a scene back out of an image by pixel analysis: background and object colour, position,
size and shape. The scorecard and the training loop's progress checks use it; it must never look
at the caption.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kiln.embedded.scenes import PALETTE, POSITION_CENTRES, Scene

ATTRIBUTES = ("color", "background", "shape", "position", "size")
_PALETTE_RGB = np.array(list(PALETTE.values()), dtype=np.float32)
_PALETTE_NAMES = list(PALETTE)
OBJECT_DISTANCE = 70.0
"""RGB distance from the background above which a pixel counts as part of the object."""
CENTRE_BOX = 0.1
"""How far (fraction of the image) the object may sit from the middle and still be "centre"."""


@dataclass(frozen=True)
class Reading:
    """What the pixels say; a field is None when the image has no readable object."""

    background: str
    color: str | None
    shape: str | None
    position: str | None
    size: str | None


def nearest_color(rgb: np.ndarray) -> str:
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE_RGB - rgb) ** 2).sum(axis=1)))]


def _template(shape: str, cx: float, cy: float, r: float, side: int) -> np.ndarray:
    """The ideal mask of `shape` (as scenes.py draws it) at centre (cx, cy), radius r (fractions)."""
    grid = (np.arange(side) + 0.5) / side
    x, y = grid[None, :] - cx, grid[:, None] - cy
    if shape == "circle":
        return (x**2 + y**2 <= r**2).astype(np.float32)
    if shape == "square":
        return ((np.abs(x) <= 0.9 * r) & (np.abs(y) <= 0.9 * r)).astype(np.float32)
    h = 1.15 * r  # circumradius of the upright triangle; its centroid is (cx, cy)
    slope = np.tan(np.pi / 6)
    inside = (y <= h / 2) & (y >= -h + np.abs(x) / slope)
    return inside.astype(np.float32)


# Area of each shape as a multiple of r^2, as drawn by scenes.py.
_AREA_PER_R2 = {"circle": np.pi, "square": 1.8**2, "triangle": 3 * np.sqrt(3) / 4 * 1.15**2}
SMALL_LARGE_RADIUS = 0.165
"""Fitted radius (fraction of the image) between small (0.12 +-10 %) and large (0.22 +-10 %)."""


def read_image(image) -> Reading:
    """Analyse one RGB image (PIL image or HxWx3 uint8 array) of a single-object scene.

    Background: median border colour. Object: pixels far from it; its colour is the nearest palette
    colour of their median. Then a soft mask (how far each pixel lies from the background towards
    the object colour) gives area and centroid, which blur does not shift, and the shape is the
    template (circle, square, triangle of that area at that centroid) that overlaps it best.
    """
    pixels = np.asarray(image, dtype=np.float32)[..., :3]
    side = pixels.shape[0]
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    bg_rgb = np.median(border, axis=0)
    background = nearest_color(bg_rgb)
    hard = np.sqrt(((pixels - bg_rgb) ** 2).sum(axis=-1)) > OBJECT_DISTANCE
    if hard.sum() < 4:
        return Reading(background, None, None, None, None)
    obj_rgb = np.median(pixels[hard], axis=0)
    color = nearest_color(obj_rgb)
    direction = obj_rgb - bg_rgb
    soft = np.clip(((pixels - bg_rgb) @ direction) / float(direction @ direction), 0.0, 1.0)
    soft[soft < 0.2] = 0.0  # ringing and noise far from the object
    area = soft.sum() / side**2
    ys, xs = np.mgrid[0:side, 0:side]
    cx = float((soft * (xs + 0.5)).sum() / soft.sum() / side)
    cy = float((soft * (ys + 0.5)).sum() / soft.sum() / side)
    if abs(cx - 0.5) < CENTRE_BOX and abs(cy - 0.5) < CENTRE_BOX:
        position = "centre"
    else:
        position = min(
            POSITION_CENTRES,
            key=lambda p: (POSITION_CENTRES[p][0] - cx) ** 2 + (POSITION_CENTRES[p][1] - cy) ** 2,
        )
    fits = {}
    for name, k in _AREA_PER_R2.items():
        r = float(np.sqrt(area / k))
        t = _template(name, cx, cy, r, side)
        fits[name] = (np.minimum(soft, t).sum() / np.maximum(soft, t).sum(), r)
    shape = max(fits, key=lambda n: fits[n][0])
    size = "large" if fits[shape][1] > SMALL_LARGE_RADIUS else "small"
    return Reading(background, color, shape, position, size)


def score(reading: Reading, scene: Scene) -> dict[str, bool]:
    """Which attributes of `scene` the reading got right."""
    return {name: getattr(reading, name) == getattr(scene, name) for name in ATTRIBUTES}
