"""What crosses into a worker and back: small frozen dataclasses, no torch, no database rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class GenerationRequest:
    """One request's share of a batch: `n` images from one prompt, seeds `seed`, `seed+1`, …"""

    request_id: str
    prompt: str
    seed: int
    n: int = 1
    negative_prompt: str = ""
    init_image: bytes | None = None
    """PNG bytes of the image to edit (img2img), already validated."""
    mask_image: bytes | None = None
    """PNG bytes of the mask (white = repaint), same size as `init_image`."""
    strength: float = 0.75


@dataclass(frozen=True)
class BatchSpec:
    """What every request in one pipeline call shares (the batch key's values)."""

    model: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    task: str = "generate"
    """generate · edit · inpaint"""
    loras: tuple[tuple[str, float], ...] = ()
    """LoRA adapters (name, scale), sorted by name; empty: the base model."""


@dataclass(frozen=True)
class StepProgress:
    step: int
    total: int
    previews: dict[str, bytes] = field(default_factory=dict)
    """Small PNG previews by request id, only on steps where one was asked for."""


@dataclass(frozen=True)
class Pixels:
    """A finished image as raw pixels: the worker never encodes it, so storage encodes it once (with
    its provenance) instead of decoding a PNG only to encode it again."""

    width: int
    height: int
    mode: str
    data: bytes

    @classmethod
    def of(cls, image: Any) -> Pixels:
        """From a PIL image (converted to RGB or RGBA)."""
        if image.mode not in ("RGB", "RGBA"):
            image = image.convert("RGB")
        return cls(image.width, image.height, image.mode, image.tobytes())

    def image(self) -> Any:
        from PIL import Image

        return Image.frombytes(self.mode, (self.width, self.height), self.data)
