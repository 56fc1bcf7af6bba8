"""What Kiln knows about each text-to-image family in diffusers, and the serving facts of a saved
pipeline read from its own JSON files (model_index.json + each component's config.json).

Reading facts never imports torch or diffusers: the API process validates sizes and tasks from them.
`tests/models/test_families.py` checks this table against diffusers' own pipelines and auto-mappings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DISTILLED_HINTS = ("turbo", "schnell", "lightning", "hyper", "lcm", "sprint", "distill")
"""Words in a model's directory name that mark a few-step distilled checkpoint (SD-Turbo, …)."""


@dataclass(frozen=True)
class Family:
    """One family of pipelines sharing a latent space, a denoiser shape and serving defaults."""

    name: str
    classes: tuple[str, ...]
    """Text-to-image pipeline classes (model_index.json `_class_name`) of this family."""
    steps: int
    guidance: float
    denoiser: str = "transformer"
    patch: int = 1
    """Latent pixels per token side for packed-latent families (sizes are multiples of vae × patch)."""
    sample_size: int | None = None
    """Latent side the pipeline draws at by default when the denoiser's config does not say."""
    fixed_native: int | None = None
    """Native pixel side for pipelines that hard-code it (Z-Image: 1024)."""
    vae_scale: int | None = None
    """VAE scale factor for pipelines that hard-code it (Lumina 2: 8)."""
    multiple: int = 1
    """The size multiple the pipeline's own check_inputs insists on, whatever its VAE (SD: 8, Sana: 32)."""
    edit: str | None = None
    """diffusers class built with `from_pipe` for img2img; None: the family has none."""
    inpaint: str | None = None
    latent: str = ""
    """Latent format (kiln.worker.previews) its step previews are projected from."""
    distilled_steps: int = 4
    distilled_guidance: float = 0.0


FAMILIES: tuple[Family, ...] = (
    Family("sd", ("StableDiffusionPipeline",), 30, 7.5, denoiser="unet", multiple=8,
           edit="StableDiffusionImg2ImgPipeline", inpaint="StableDiffusionInpaintPipeline", latent="sd1"),
    Family("sdxl", ("StableDiffusionXLPipeline",), 30, 5.0, denoiser="unet", multiple=8,
           edit="StableDiffusionXLImg2ImgPipeline", inpaint="StableDiffusionXLInpaintPipeline", latent="sdxl"),
    Family("sd3", ("StableDiffusion3Pipeline",), 28, 7.0, edit="StableDiffusion3Img2ImgPipeline",
           inpaint="StableDiffusion3InpaintPipeline", latent="sd3"),
    Family("flux", ("FluxPipeline",), 28, 3.5, patch=2, sample_size=128, edit="FluxImg2ImgPipeline",
           inpaint="FluxInpaintPipeline", latent="flux"),
    Family("flux2", ("Flux2Pipeline", "Flux2KleinPipeline"), 28, 4.0, patch=2, sample_size=128,
           latent="flux2"),
    # diffusers 0.42.1's ChromaInpaintPipeline reads `guidance_embeds`, which Chroma's transformer lacks
    Family("chroma", ("ChromaPipeline",), 26, 4.0, patch=2, sample_size=128, edit="ChromaImg2ImgPipeline",
           latent="flux"),
    Family("qwen-image", ("QwenImagePipeline",), 30, 4.0, patch=2, sample_size=128,
           edit="QwenImageImg2ImgPipeline", inpaint="QwenImageInpaintPipeline", latent="wan21",
           distilled_steps=8, distilled_guidance=1.0),
    Family("z-image", ("ZImagePipeline",), 28, 4.0, patch=2, fixed_native=1024,
           edit="ZImageImg2ImgPipeline", inpaint="ZImageInpaintPipeline", latent="flux",
           distilled_steps=9, distilled_guidance=0.0),
    Family("sana", ("SanaPipeline",), 20, 4.5, multiple=32, latent="fit"),
    Family("sana-sprint", ("SanaSprintPipeline",), 2, 4.5, multiple=32, edit="SanaSprintImg2ImgPipeline",
           latent="fit"),
    Family("pixart-sigma", ("PixArtSigmaPipeline",), 20, 4.5, multiple=8, latent="sdxl"),
    Family("lumina2", ("Lumina2Pipeline",), 30, 4.0, patch=2, vae_scale=8, latent="flux"),
    Family("cogview4", ("CogView4Pipeline",), 30, 5.0, patch=2, multiple=16, latent="fit"),
)
BY_CLASS = {cls: family for family in FAMILIES for cls in family.classes}
DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_NATIVE = 30, 7.5, 512
"""For pipelines Kiln does not know (and the embedded model without its kiln.json)."""


@dataclass(frozen=True)
class ModelFacts:
    """A saved pipeline's serving facts, as the pipeline itself would compute them."""

    pipeline_class: str
    family: str | None
    native_size: int | None
    """The side it draws at by default (vae scale × the denoiser's sample size); None if unknown."""
    latent_factor: int
    """Pixels per latent token side: every size it draws is a multiple of this."""
    steps: int
    guidance_scale: float
    edit_pipeline: str | None
    inpaint_pipeline: str | None
    latent_format: str
    distilled: bool


def family_of(pipeline_class: str) -> Family | None:
    return BY_CLASS.get(pipeline_class)


def read_facts(path: Path) -> ModelFacts:
    """Facts of the diffusers pipeline saved at `path` (its model_index.json must exist)."""
    index = _json(path / "model_index.json")
    cls = str(index.get("_class_name", ""))
    family = family_of(cls)
    vae_scale = (family.vae_scale if family and family.vae_scale else None) or _vae_scale(path / "vae")
    denoiser = _json(path / (family.denoiser if family else "unet") / "config.json") or _json(
        path / "transformer" / "config.json")
    patch = family.patch if family else 1
    if family and family.name == "sd3":
        patch = int(denoiser.get("patch_size", 2))
    latent_factor = max((vae_scale or 8) * patch, family.multiple if family else 8)
    native = _native(family, denoiser, vae_scale)
    distilled = _is_distilled(path, family, denoiser, index)
    if family is None:
        steps, guidance = DEFAULT_STEPS, DEFAULT_GUIDANCE
    elif distilled:
        steps, guidance = family.distilled_steps, family.distilled_guidance
    else:
        steps, guidance = family.steps, family.guidance
    return ModelFacts(
        pipeline_class=cls, family=family.name if family else None, native_size=native,
        latent_factor=latent_factor, steps=steps, guidance_scale=guidance,
        edit_pipeline=family.edit if family else None, inpaint_pipeline=family.inpaint if family else None,
        latent_format=family.latent if family else "fit", distilled=distilled,
    )


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _vae_scale(vae_dir: Path) -> int | None:
    """Spatial downsampling of the VAE, computed as each diffusers pipeline computes it."""
    config = _json(vae_dir / "config.json")
    if "temperal_downsample" in config:  # AutoencoderKLQwenImage / Wan
        return 2 ** len(config["temperal_downsample"])
    if "encoder_block_out_channels" in config:  # AutoencoderDC (Sana)
        return 2 ** (len(config["encoder_block_out_channels"]) - 1)
    if "block_out_channels" in config:  # AutoencoderKL and its relatives
        return 2 ** (len(config["block_out_channels"]) - 1)
    return None


def _native(family: Family | None, denoiser: dict[str, Any], vae_scale: int | None) -> int | None:
    if family and family.fixed_native:
        return family.fixed_native
    sample = denoiser.get("sample_size")
    if isinstance(sample, list):
        sample = sample[0]
    if family and family.sample_size:
        sample = family.sample_size
    if not isinstance(sample, int) or vae_scale is None:
        return None
    return sample * vae_scale


def _is_distilled(path: Path, family: Family | None, denoiser: dict[str, Any], index: dict[str, Any]) -> bool:
    if family is None:
        return False
    if family.name == "flux":  # FLUX.1-schnell is the one without a guidance embedding
        return denoiser.get("guidance_embeds") is False
    if family.name == "flux2":
        return bool(index.get("is_distilled", False))
    name = path.resolve().name.lower()
    return any(hint in name for hint in DISTILLED_HINTS)
