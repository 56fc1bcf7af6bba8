"""Images for upload tests: small PNGs and a decompression bomb built from its header up."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def png(size=(32, 32), mode="RGB", colour=0) -> bytes:  # type: ignore[no-untyped-def]
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 60000, height: int = 60000) -> bytes:
    """A 1-bit PNG that claims width×height pixels in a few hundred kB of compressed zeros."""
    row = b"\0" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row) for _ in range(min(height, 2000))]
    parts.append(compressor.flush())  # truncated: a header check must refuse it before decoding
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")
