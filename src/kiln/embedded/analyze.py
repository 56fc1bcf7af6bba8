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
LARGE_EXTENT = 0.31
"""Bounding-box side, as a fraction of the image, that separates small objects from large."""
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


def read_image(image) -> Reading:
    """Analyse one RGB image (PIL image or HxWx3 uint8 array) of a single-object scene."""
    pixels = np.asarray(image, dtype=np.float32)[..., :3]
    side = pixels.shape[0]
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    bg_rgb = np.median(border, axis=0)
    background = nearest_color(bg_rgb)
    mask = np.sqrt(((pixels - bg_rgb) ** 2).sum(axis=-1)) > OBJECT_DISTANCE
    if mask.sum() < 4:
        return Reading(background, None, None, None, None)
    color = nearest_color(np.median(pixels[mask], axis=0))
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() / side, ys.mean() / side
    if abs(cx - 0.5) < CENTRE_BOX and abs(cy - 0.5) < CENTRE_BOX:
        position = "centre"
    else:
        position = min(POSITION_CENTRES, key=lambda p: (POSITION_CENTRES[p][0] - cx) ** 2
                       + (POSITION_CENTRES[p][1] - cy) ** 2)
    width = (xs.max() - xs.min() + 1) / side
    height = (ys.max() - ys.min() + 1) / side
    size = "large" if max(width, height) > LARGE_EXTENT else "small"
    fill = mask.sum() / ((width * side) * (height * side))
    # A circle fills pi/4 of its box, a square all of it, an upright triangle half.
    shape = "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"
    return Reading(background, color, shape, position, size)


def score(reading: Reading, scene: Scene) -> dict[str, bool]:
    """Which attributes of `scene` the reading got right."""
    return {name: getattr(reading, name) == getattr(scene, name) for name in ATTRIBUTES}
