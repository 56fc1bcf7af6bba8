"""Uploads are judged by their bytes and their header, before any pixel is decoded."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from kiln.errors import InvalidRequest
from kiln.service.image_requests import edit_inputs, open_upload


def png(size=(32, 32), mode="RGB", colour=0) -> bytes:  # type: ignore[no-untyped-def]
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 60000, height: int = 60000) -> bytes:
    """A valid 1-bit PNG of width×height white... made of a few hundred kB of compressed zeros."""
    row = b"\0" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row) for _ in range(min(height, 2000))]
    parts.append(compressor.flush())  # truncated: a header check must refuse it before decoding
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


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
