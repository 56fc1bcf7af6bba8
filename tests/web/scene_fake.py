"""A fake pipeline for the README's screenshots: it draws the shape and colours a prompt names
("a large orange circle on a purple background"), the kind of picture Kiln's embedded model makes,
on top of the ordinary FakePipeline's timing, progress and cancel.
"""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageDraw

from kiln.testing import FakePipeline, prompt_colour

COLOURS = {
    "red": (214, 54, 48),
    "orange": (240, 140, 40),
    "yellow": (240, 204, 60),
    "green": (60, 156, 90),
    "blue": (46, 94, 196),
    "purple": (124, 74, 170),
    "white": (240, 236, 228),
    "black": (34, 30, 28),
    "pink": (232, 128, 160),
    "teal": (40, 150, 150),
}


def _words(prompt: str) -> list[str]:
    return prompt.lower().replace(",", " ").split()


def draw(prompt: str, seed: int, width: int, height: int, base: Image.Image | None) -> Image.Image:
    words = _words(prompt)
    named = [w for w in words if w in COLOURS]
    background_word = words[words.index("background") - 1] if "background" in words else None
    shape_colour = next((COLOURS[w] for w in named if w != background_word), prompt_colour(prompt, seed))
    if base is not None:
        background = base.convert("RGB").getpixel((1, 1))
    else:
        background = COLOURS.get(background_word or "", (238, 232, 222))
    image = Image.new("RGB", (width * 4, height * 4), background)
    pen = ImageDraw.Draw(image)
    side = min(width, height) * 4
    radius = side * (0.32 if "large" in words else 0.2) * (1 + (seed % 7) / 40)
    cx = width * 4 * (0.3 if "left" in words else 0.7 if "right" in words else 0.5)
    cy = height * 4 * (0.32 if "top" in words else 0.68 if "bottom" in words else 0.5)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if "square" in words:
        pen.rounded_rectangle(box, radius=radius * 0.08, fill=shape_colour)
    elif "triangle" in words:
        pen.polygon(
            [(cx, cy - radius), (cx + radius, cy + radius * 0.8), (cx - radius, cy + radius * 0.8)],
            fill=shape_colour,
        )
    else:
        pen.ellipse(box, fill=shape_colour)
    return image.resize((width, height), Image.Resampling.LANCZOS)


class SceneFake(FakePipeline):
    def __call__(
        self,
        prompt: list[str],
        num_inference_steps: int,
        generator: list[Any],
        callback_on_step_end: Any = None,
        height: int = 64,
        width: int = 64,
        image: list[Image.Image] | None = None,
        **kwargs: Any,
    ) -> Any:
        out = super().__call__(
            prompt, num_inference_steps, generator, callback_on_step_end, height, width, image, **kwargs
        )
        out.images = [
            draw(text, gen.initial_seed(), *made.size, image[i] if image else None)
            for i, (text, gen, made) in enumerate(zip(prompt, generator, out.images, strict=True))
        ]
        return out


def load_scene_fake(info: Any, step_s: float = 0.0) -> SceneFake:
    return SceneFake(step_s=float(step_s))
