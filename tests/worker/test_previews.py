"""Step previews: one linear map per latent space, packed and video-shaped latents unpacked first, a
fit from the VAE's encoder where nothing published fits, and a preview that cannot be made skipped."""

from __future__ import annotations

import io
import logging
from types import SimpleNamespace

import pytest
from PIL import Image

from kiln.worker.previews import (
    LATENT_FORMATS,
    Projection,
    fit_projection,
    preview_pngs,
    project,
    projection_for,
)

torch = pytest.importorskip("torch")


def _pack(latents):  # type: ignore[no-untyped-def]
    """diffusers' FLUX / Qwen-Image packing: 2×2 patches become tokens of 4C channels."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def _patchify(latents):  # type: ignore[no-untyped-def]
    """FLUX.2's patchified latents: (B, 4C, H/2, W/2)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def test_packed_tokens_project_like_the_unpacked_latents() -> None:
    latents = torch.randn(2, 16, 8, 12)
    flux = LATENT_FORMATS["flux"]
    expected = project(latents, flux, 96, 64)
    assert expected.shape == (2, 8, 12, 3)
    assert (project(_pack(latents), flux, 96, 64) == expected).all()


def test_flux2_patch_channels_and_video_shaped_latents_are_unpacked() -> None:
    latents = torch.randn(1, 32, 8, 8)
    flux2 = LATENT_FORMATS["flux2"]
    expected = project(latents, flux2, 128, 128)
    assert (project(_patchify(latents), flux2, 128, 128) == expected).all()
    tokens = _patchify(latents).flatten(2).transpose(1, 2)  # FLUX.2's packing: one token per patch
    assert (project(tokens, flux2, 128, 128) == expected).all()
    wan = torch.randn(1, 16, 1, 4, 4)  # Qwen-Image's VAE works on (B, C, F, H, W)
    assert project(wan, LATENT_FORMATS["wan21"], 32, 32).shape == (1, 4, 4, 3)


def test_a_preview_that_cannot_be_made_is_skipped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    pipeline = SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(scaling_factor=0.18215)))
    info = SimpleNamespace(name="odd", latent_format="sd1", preview_factors=())
    with caplog.at_level(logging.WARNING, logger="kiln.worker.previews"):
        assert preview_pngs(pipeline, info, torch.randn(1, 7, 4, 4), {"a": 0}, 32, 32) == {}
    assert "no step preview for model odd" in caplog.text


def test_the_fake_pipelines_latents_are_rgb_already() -> None:
    from kiln.testing import FakePipeline

    info = SimpleNamespace(name="fake", preview_factors=())
    red = torch.tensor([1.0, -1.0, -1.0])[None, :, None, None].expand(1, 3, 8, 8)
    pngs = preview_pngs(FakePipeline(), info, red, {"a": 0}, 64, 64)
    image = Image.open(io.BytesIO(pngs["a"])).convert("RGB")
    assert image.size == (64, 64) and image.getpixel((10, 10)) == (255, 0, 0)


def test_a_vae_unlike_the_published_one_gets_a_fitted_projection_once() -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[8, 8],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=4,
        scaling_factor=0.5,
    )
    pipeline = SimpleNamespace(vae=vae)
    info = SimpleNamespace(name="m", latent_format="sd1", preview_factors=())
    fitted = projection_for(pipeline, info)
    assert fitted is projection_for(pipeline, info)  # fitted once per loaded VAE
    assert len(fitted.factors) == 4 and fitted != LATENT_FORMATS["sd1"]
    vae.register_to_config(scaling_factor=0.18215)
    assert projection_for(SimpleNamespace(vae=vae), info) is LATENT_FORMATS["sd1"]
    assert isinstance(fit_projection(vae, images=1, side=32, cell=8), Projection)
