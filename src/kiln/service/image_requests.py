"""From an Images API request to a `JobSpec`: sizes, quality → steps, seeds, and checked uploads.

Sizes are OpenAI's (1024x1024, 1536x1024, 1024x1536, auto) plus 256x256, 512x512, the model's
native square and the extra sizes its operator allowed; `auto` is the native size. Which tasks a model
serves (edits, inpainting) is known from its facts, so a refusal needs no worker. Quality is a fraction
of the model's default steps.
Uploads are identified by their bytes, never their names, and measured from the header before decoding.
"""

from __future__ import annotations

import io
import math
import secrets
import warnings
from typing import Any

from PIL import Image

from kiln.errors import InvalidRequest
from kiln.worker.registry import ModelInfo

OPENAI_SIZES = ("1024x1024", "1536x1024", "1024x1536", "256x256", "512x512")
QUALITY_STEP_FRACTION = {"low": 0.25, "medium": 0.5, "high": 1.0, "auto": 1.0, "standard": 1.0, "hd": 1.0}
"""Share of the model's default steps per quality (`standard`/`hd` are DALL·E's names)."""
QUALITY_NAME = {"standard": "high", "hd": "high", "auto": "high"}
MAX_SEED = 2**31 - 1 - 10  # seeds seed … seed+n-1 must fit a 32-bit column
MAX_LORAS = 8
"""Most LoRA adapters one request may combine."""
MAX_LORA_SCALE = 4.0
"""Largest adapter scale (either sign) a request may ask for; beyond it images break down."""
_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}


TASK_NAMES = {"edit": "image edits (img2img)", "inpaint": "masked edits (inpainting)"}


def allowed_sizes(info: ModelInfo) -> list[str]:
    native = f"{info.native_size}x{info.native_size}"
    return list(dict.fromkeys(["auto", *OPENAI_SIZES, native, *info.sizes]))


def resolve_size(size: str | None, info: ModelInfo) -> tuple[int, int]:
    if size is None or size == "auto":
        return info.native_size, info.native_size
    if size not in allowed_sizes(info):
        raise InvalidRequest(
            f"Invalid size '{size}': model '{info.name}' cannot draw it. Supported sizes: "
            f"{', '.join(allowed_sizes(info))}.", param="size"
        )
    width, height = size.split("x")
    return int(width), int(height)


def resolve_loras(choices: list[Any] | None, info: ModelInfo) -> list[list[Any]]:
    """A request's adapters as sorted [name, scale] pairs (the batch key's order), each one checked
    against the model's registered adapters; 400 (`loras`) for an unknown name, a repeated one, or a
    scale out of bounds. Reads the configuration only: no torch, no files."""
    picked: dict[str, float] = {}
    for choice in choices or ():
        name, scale = choice.name, float(choice.scale)
        if info.lora_path(name) is None:
            known = ", ".join(n for n, _ in info.loras) or "none"
            raise InvalidRequest(
                f"Unknown LoRA adapter '{name}' for model '{info.name}' (registered: {known}).", param="loras"
            )
        if name in picked:
            raise InvalidRequest(f"LoRA adapter '{name}' is named twice.", param="loras")
        if not -MAX_LORA_SCALE <= scale <= MAX_LORA_SCALE:
            raise InvalidRequest(
                f"LoRA scale {scale} for '{name}' is out of bounds (-{MAX_LORA_SCALE}..{MAX_LORA_SCALE}).",
                param="loras",
            )
        picked[name] = scale
    return [[name, picked[name]] for name in sorted(picked)]


def check_task(task: str, info: ModelInfo) -> None:
    """Refuse (400) an edit or inpaint the model has no pipeline for, before anything is admitted."""
    if task not in info.tasks:
        param = "mask" if task == "inpaint" else "image"
        what = TASK_NAMES.get(task, task)
        raise InvalidRequest(f"Model '{info.name}' does not support {what}.", param=param)


def steps_for(quality: str | None, info: ModelInfo) -> int:
    return max(1, math.ceil(info.steps * QUALITY_STEP_FRACTION[quality or "auto"]))


def quality_name(quality: str | None) -> str:
    quality = quality or "auto"
    return QUALITY_NAME.get(quality, quality)


def pick_seed(seed: int | None) -> int:
    return secrets.randbelow(MAX_SEED) if seed is None else seed


def token_usage(prompt: str, n: int, width: int, height: int, input_images: int = 0) -> dict:
    """OpenAI-shaped usage: ~4 characters a text token, one image token per 32×32 pixels."""
    text_tokens = max(1, math.ceil(len(prompt) / 4))
    image_tokens = input_images * math.ceil(width * height / 1024)
    output = n * math.ceil(width * height / 1024)
    return {
        "input_tokens": text_tokens + image_tokens,
        "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": image_tokens},
        "output_tokens": output,
        "total_tokens": text_tokens + image_tokens + output,
    }


def _sniff(content: bytes) -> str | None:
    for magic, fmt in _MAGIC.items():
        if content.startswith(magic):
            return fmt
    if content[:4] == b"RIFF" and content[8:12] == b"WEBP":
        return "WEBP"
    return None


def open_upload(content: bytes, *, param: str, max_pixels: int) -> Image.Image:
    """A decoded PNG/JPEG/WebP upload, refused (400, `param`) if it is anything else, unreadable, or
    larger than `max_pixels` by its header — checked before a single pixel is decoded."""
    fmt = _sniff(content)
    if fmt is None:
        raise InvalidRequest(f"'{param}' must be a PNG, JPEG or WEBP image.", param=param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(content), formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidRequest(
            f"'{param}' has too many pixels (at most {max_pixels} are accepted).", param=param
        ) from None
    except Exception:  # noqa: BLE001 - any parser error is the upload's fault
        raise InvalidRequest(f"'{param}' is not a readable {fmt} image.", param=param) from None
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidRequest(
            f"'{param}' is {width}x{height} pixels; at most {max_pixels} pixels are accepted.", param=param
        )
    try:
        image.load()
    except Exception:  # noqa: BLE001
        raise InvalidRequest(f"'{param}' is not a readable {fmt} image.", param=param) from None
    return image


def edit_inputs(image: bytes, mask: bytes | None, max_pixels: int) -> dict[str, bytes]:
    """PNG bytes of the image (RGB) and of the mask (L, white = repaint), checked and normalised.

    OpenAI's masks mark the area to edit with transparency; a mask without alpha is read as
    grayscale, white meaning edit.
    """
    picture = open_upload(image, param="image", max_pixels=max_pixels)
    out = {"image": _png(picture.convert("RGB"))}
    if mask is not None:
        shape = open_upload(mask, param="mask", max_pixels=max_pixels)
        if shape.size != picture.size:
            raise InvalidRequest(
                f"The mask is {shape.width}x{shape.height} but the image is "
                f"{picture.width}x{picture.height}; they must be the same size.",
                param="mask",
            )
        if "A" in shape.getbands():
            grey = shape.getchannel("A").point(lambda a: 255 - a)
        else:
            grey = shape.convert("L")
        out["mask"] = _png(grey)
    return out


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
