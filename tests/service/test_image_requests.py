"""Uploads are judged by their bytes and their header, before any pixel is decoded."""

from __future__ import annotations

import io

import pytest
from image_fakes import bomb_png, png
from PIL import Image

from kiln.errors import InvalidRequest
from kiln.service.image_requests import edit_inputs, open_upload


def test_decompression_bomb_refused_from_its_header() -> None:
    with pytest.raises(InvalidRequest) as refused:
        open_upload(bomb_png(), param="image", max_pixels=4096 * 4096)
    assert refused.value.param == "image" and "pixels" in refused.value.message
    with pytest.raises(InvalidRequest):  # below PIL's own bomb limit, above Kiln's
        open_upload(bomb_png(1, 60000), param="image", max_pixels=4096)


def test_type_is_read_from_the_content() -> None:
    with pytest.raises(InvalidRequest) as refused:
        open_upload(b"GIF89a" + b"\0" * 64, param="image", max_pixels=10**6)
    assert "PNG, JPEG or WEBP" in refused.value.message
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    assert open_upload(jpeg.getvalue(), param="image", max_pixels=10**6).format == "JPEG"
    with pytest.raises(InvalidRequest):
        open_upload(b"\x89PNG\r\n\x1a\n" + b"garbage", param="image", max_pixels=10**6)


def test_mask_must_match_and_transparency_means_edit() -> None:
    with pytest.raises(InvalidRequest) as refused:
        edit_inputs(png((32, 32)), png((16, 16), "RGBA"), 10**6)
    assert refused.value.param == "mask"
    mask = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 16, 32))  # left half transparent: edit there
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    out = edit_inputs(png((32, 32)), buffer.getvalue(), 10**6)
    grey = Image.open(io.BytesIO(out["mask"]))
    assert grey.mode == "L" and grey.getpixel((0, 0)) == 255 and grey.getpixel((31, 0)) == 0
