"""Step previews at negligible cost: the current latents projected to RGB by one linear map per latent
space (as ComfyUI's `latent_rgb_factors`), never a VAE decode per preview.

Packed latents (FLUX, Qwen-Image: tokens of 2×2 patches) are unpacked first, video-shaped ones (B, C,
F, H, W) lose their frame axis. Where no published projection fits the model's VAE, one is fitted once
from its own encoder on flat colours. A preview that cannot be made is logged and skipped, never fails
the batch.
"""

from __future__ import annotations

import io
import logging
import weakref
from dataclasses import dataclass
from typing import Any

from PIL import Image

log = logging.getLogger(__name__)
PREVIEW_MIN_SIDE = 64
"""Previews smaller than this (tiny latents) are scaled up so a UI can show them."""


@dataclass(frozen=True)
class Projection:
    factors: tuple[tuple[float, ...], ...]
    """One row (R, G, B) per latent channel."""
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scaling_factor: float | None = None
    """The VAE `scaling_factor` these factors were measured for; a VAE with another one gets a fit."""


# Published by ComfyUI (comfy/latent_formats.py), for latents in the denoiser's space, as diffusers'
# pipelines hand them to `callback_on_step_end`.
LATENT_FORMATS: dict[str, Projection] = {
    "sd1": Projection((
        (0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721),
        (-0.2120, -0.2616, -0.7177),
    ), scaling_factor=0.18215),
    "sdxl": Projection((
        (0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    ), (0.1084, -0.0175, -0.0011), scaling_factor=0.13025),
    "sd3": Projection((
        (-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458),
        (0.0856, 0.0339, 0.0902), (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309),
        (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358), (-0.0194, 0.0020, 0.0669),
        (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
        (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293),
        (-0.1448, -0.1463, -0.1189),
    ), (0.2394, 0.2135, 0.1925), scaling_factor=1.5305),
    "flux": Projection((
        (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433),
        (-0.0174, 0.0160, 0.0617), (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115),
        (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259), (-0.0245, 0.0250, 0.1180),
        (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
        (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499),
        (-0.1262, -0.0982, -0.0778),
    ), (-0.0329, -0.0718, -0.0851), scaling_factor=0.3611),
    # FLUX.2: 32 VAE channels; its 128-channel tokens are these in 2×2 patches.
    "flux2": Projection((
        (0.0058, 0.0113, 0.0073), (0.0495, 0.0443, 0.0836), (-0.0099, 0.0096, 0.0644),
        (0.2144, 0.3009, 0.3652), (0.0166, -0.0039, -0.0054), (0.0157, 0.0103, -0.0160),
        (-0.0398, 0.0902, -0.0235), (-0.0052, 0.0095, 0.0109), (-0.3527, -0.2712, -0.1666),
        (-0.0301, -0.0356, -0.0180), (-0.0107, 0.0078, 0.0013), (0.0746, 0.0090, -0.0941),
        (0.0156, 0.0169, 0.0070), (-0.0034, -0.0040, -0.0114), (0.0032, 0.0181, 0.0080),
        (-0.0939, -0.0008, 0.0186), (0.0018, 0.0043, 0.0104), (0.0284, 0.0056, -0.0127),
        (-0.0024, -0.0022, -0.0030), (0.1207, -0.0026, 0.0065), (0.0128, 0.0101, 0.0142),
        (0.0137, -0.0072, -0.0007), (0.0095, 0.0092, -0.0059), (0.0000, -0.0077, -0.0049),
        (-0.0465, -0.0204, -0.0312), (0.0095, 0.0012, -0.0066), (0.0290, -0.0034, 0.0025),
        (0.0220, 0.0169, -0.0048), (-0.0332, -0.0457, -0.0468), (-0.0085, 0.0389, 0.0609),
        (-0.0076, 0.0003, -0.0043), (-0.0111, -0.0460, -0.0614),
    ), (-0.0329, -0.0718, -0.0851)),
    # Qwen-Image's VAE is Wan 2.1's (16 channels, latents normalised by its per-channel mean and std).
    "wan21": Projection((
        (-0.1299, -0.1692, 0.2932), (0.0671, 0.0406, 0.0442), (0.3568, 0.2548, 0.1747),
        (0.0372, 0.2344, 0.1420), (0.0313, 0.0189, -0.0328), (0.0296, -0.0956, -0.0665),
        (-0.3477, -0.4059, -0.2925), (0.0166, 0.1902, 0.1975), (-0.0412, 0.0267, -0.1364),
        (-0.1293, 0.0740, 0.1636), (0.0680, 0.3019, 0.1128), (0.0032, 0.0581, 0.0639),
        (-0.1251, 0.0927, 0.1699), (0.0060, -0.0633, 0.0005), (0.3477, 0.2275, 0.2950),
        (0.1984, 0.0913, 0.1861),
    ), (-0.1835, -0.0868, -0.3360)),
}
_FITTED: weakref.WeakKeyDictionary[Any, Projection] = weakref.WeakKeyDictionary()


def preview_pngs(pipeline: Any, info: Any, latents: Any, first: dict[str, int], width: int, height: int
                 ) -> dict[str, bytes]:
    """A small PNG per request (of its first image) from this step's latents; {} if none can be made."""
    try:
        projection = projection_for(pipeline, info)
        rgb = project(latents[list(first.values())], projection, width, height)
        return {owner: _png(rgb[i]) for i, owner in enumerate(first)}
    except Exception:
        log.warning("no step preview for model %s", getattr(info, "name", "?"), exc_info=True)
        return {}


def projection_for(pipeline: Any, info: Any) -> Projection:
    """The model's own (kiln.json, or the pipeline's `latent_rgb_factors`), else its family's published
    one when its VAE is the one that was measured, else a fit from its VAE (once per loaded VAE)."""
    if getattr(info, "preview_factors", ()):
        bias = info.preview_bias or (0.0, 0.0, 0.0)
        return Projection(info.preview_factors, tuple(bias))
    own = getattr(pipeline, "latent_rgb_factors", None)
    if own is not None:
        bias = tuple(getattr(pipeline, "latent_rgb_bias", (0.0, 0.0, 0.0)))
        return Projection(tuple(map(tuple, own)), bias)  # type: ignore[arg-type]
    vae = pipeline.vae
    published = LATENT_FORMATS.get(getattr(info, "latent_format", ""))
    scaling = getattr(vae.config, "scaling_factor", None)
    if published is not None and (published.scaling_factor is None or scaling is None
                                  or abs(scaling - published.scaling_factor) < 1e-3):
        return published
    if vae not in _FITTED:
        _FITTED[vae] = fit_projection(vae)
    return _FITTED[vae]


def project(latents: Any, projection: Projection, width: int, height: int) -> Any:
    """(B, H, W, 3) uint8 from latents as a pipeline holds them: (B, C, H, W), (B, C, F, H, W), or
    packed tokens (B, (H/2)(W/2), 4C) for an image of `width` × `height`."""
    import torch

    channels = len(projection.factors)
    x = latents.detach().float()
    if x.ndim == 5:  # video-shaped (B, C, F, H, W): one frame
        x = x[:, :, 0]
    if x.ndim == 3:
        x = _unpack_tokens(x, width, height, channels)
    if x.ndim == 4 and x.shape[1] == channels * 4:  # 2×2 patches as channels (FLUX.2)
        b, _, h, w = x.shape
        x = x.reshape(b, channels, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, channels, h * 2, w * 2)
    if x.ndim != 4 or x.shape[1] != channels:
        shape = tuple(latents.shape)
        raise ValueError(f"latents of shape {shape} do not fit a {channels}-channel projection")
    factors = torch.tensor(projection.factors, dtype=x.dtype, device=x.device)
    bias = torch.tensor(projection.bias, dtype=x.dtype, device=x.device)
    rgb = torch.einsum("bchw,cr->bhwr", x, factors) + bias
    return ((rgb.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).cpu().numpy()


def _unpack_tokens(x: Any, width: int, height: int, channels: int) -> Any:
    b, tokens, dim = x.shape
    ratio = height / width
    w2 = max(1, round((tokens / ratio) ** 0.5))
    h2 = tokens // w2
    if h2 * w2 != tokens:
        raise ValueError(f"{tokens} latent tokens do not tile a {width}x{height} image")
    x = x.reshape(b, h2, w2, dim)
    if dim == channels * 4:  # FLUX-style packing: each token is a 2×2 patch, channel-major
        x = x.reshape(b, h2, w2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, channels, h2 * 2, w2 * 2)
    return x.permute(0, 3, 1, 2)


def fit_projection(vae: Any, images: int = 4, side: int = 256, cell: int = 32) -> Projection:
    """A least-squares latent → RGB map from the VAE's own encoder (one small encoder pass, once per
    loaded VAE) on images of random flat-colour cells, in the space the pipeline's latents live in."""
    import torch

    generator = torch.Generator().manual_seed(0)
    cells = side // cell
    colours = torch.rand(images, 3, cells, cells, generator=generator) * 1.6 - 0.8
    pixels = colours.repeat_interleave(cell, 2).repeat_interleave(cell, 3)
    param = next(vae.parameters())
    with torch.inference_mode():
        encoded = vae.encode(pixels.to(param.device, param.dtype))
        dist = getattr(encoded, "latent_dist", None)
        latents = (dist.mean if dist is not None else encoded.latent).float().cpu()
    if latents.ndim == 5:
        latents = latents[:, :, 0]
    config = vae.config
    shift = getattr(config, "shift_factor", None) or 0.0
    latents = (latents - shift) * (getattr(config, "scaling_factor", None) or 1.0)
    target = torch.nn.functional.adaptive_avg_pool2d(pixels, latents.shape[-2:])
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    y = target.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1)], dim=1), y).solution
    factors = tuple(tuple(round(float(v), 5) for v in row) for row in solution[:-1])
    bias = tuple(round(float(v), 5) for v in solution[-1])
    return Projection(factors, bias)  # type: ignore[arg-type]


def _png(rgb: Any) -> bytes:
    image = Image.fromarray(rgb)
    if max(image.size) < PREVIEW_MIN_SIDE:
        scale = PREVIEW_MIN_SIDE / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
