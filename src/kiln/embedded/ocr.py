"""Read a scene's word back out of an image with Tesseract, for the scorecard and the training
loop's progress checks. Like analyze.py it never looks at the caption: it is told only the colour
the letters should have and the colours they may lie on, binarises by them and reads one line of
capitals.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from kiln.embedded.scenes import LETTERS, PALETTE, Scene

UPSCALE = 6
TESSERACT_CONFIG = f"--psm 7 --oem 1 -c tessedit_char_whitelist={LETTERS}"


def text_mask(image, text_color: str, under: list[str]) -> np.ndarray:
    """Pixels nearer the letter colour than any colour the letters lie on, as a boolean array of
    the image upscaled UPSCALE times (bicubic, so strokes keep their shape)."""
    image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    side = image.size[0] * UPSCALE
    big = np.asarray(image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32)
    def dist(name):
        return ((big - np.array(PALETTE[name], dtype=np.float32)) ** 2).sum(axis=-1)
    return dist(text_color) < np.min([dist(c) for c in under], axis=0)


def under_colors(scene: Scene) -> list[str]:
    """The colours a scene's letters may lie on."""
    colors = {scene.background}
    if scene.kind in ("shape_word", "sign"):
        colors.add(scene.color)
    colors.discard(scene.text_color)
    return sorted(colors)


def read_word(image, scene: Scene) -> str:
    """The capitals Tesseract reads in `image`, where `scene` says the letters are."""
    import pytesseract

    mask = text_mask(image, scene.text_color, under_colors(scene))
    page = Image.fromarray(np.where(mask, 0, 255).astype(np.uint8))
    pad = Image.new("L", (page.width + 64, page.height + 64), 255)
    pad.paste(page, (32, 32))
    text = pytesseract.image_to_string(pad, config=TESSERACT_CONFIG)
    return "".join(ch for ch in text if ch in LETTERS)


def letter_accuracy(read: str, truth: str) -> float:
    """1 - edit distance / length of the true word, floored at 0."""
    prev = list(range(len(read) + 1))
    for i, a in enumerate(truth, 1):
        cur = [i]
        for j, b in enumerate(read, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a != b)))
        prev = cur
    return max(0.0, 1.0 - prev[-1] / len(truth))
