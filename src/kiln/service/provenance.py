"""Provenance written into every stored image (PNG tEXt/iTXt, EXIF and XMP for JPEG/WebP) and read back.

The record says who made the image and how (generator, model, seed, job id, a hash of the prompt, never
the prompt itself), so the file still tells its origin once it leaves Kiln.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from typing import Any
from xml.sax.saxutils import quoteattr

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from kiln import __version__

PNG_KEY = "kiln:provenance"
_EXIF_SOFTWARE = 0x0131
_EXIF_DESCRIPTION = 0x010E
_IPTC_AI = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()


def record(*, model: str, seed: int, job_id: str, image_id: str, prompt: str) -> dict[str, Any]:
    return {
        "generator": f"kiln/{__version__}",
        "model": model,
        "seed": seed,
        "job_id": job_id,
        "image_id": image_id,
        "prompt_sha256": prompt_hash(prompt),
        "digital_source_type": _IPTC_AI,
    }


def _xmp(data: dict[str, Any]) -> bytes:
    attrs = " ".join(f"kiln:{k}={quoteattr(str(v))}" for k, v in data.items() if k != "digital_source_type")
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:kiln="https://kiln.invalid/ns/provenance/1.0/" '
        'xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
        f"Iptc4xmpExt:DigitalSourceType={quoteattr(_IPTC_AI)} {attrs}/>"
        '</rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    ).encode()


def encode(image: Image.Image, fmt: str, compression: int | None, data: dict[str, Any]) -> bytes:
    """The image in `fmt` (png · jpeg · webp) with the provenance record embedded.

    `compression` (0–100, OpenAI's output_compression) is the JPEG/WebP quality; PNG is lossless.
    """
    buffer = io.BytesIO()
    text = json.dumps(data, sort_keys=True)
    if fmt == "png":
        info = PngInfo()
        info.add_text(PNG_KEY, text)
        info.add_text("Software", data["generator"])
        info.add_itxt("XML:com.adobe.xmp", _xmp(data).decode())
        image.save(buffer, format="PNG", pnginfo=info)
    else:
        exif = Image.Exif()
        exif[_EXIF_SOFTWARE] = data["generator"]
        exif[_EXIF_DESCRIPTION] = text
        quality = 95 if compression is None else max(1, compression)
        image.convert("RGB").save(
            buffer, format=PIL_FORMATS[fmt], quality=quality, exif=exif.tobytes(), xmp=_xmp(data)
        )
    return buffer.getvalue()


def read(content: bytes) -> dict[str, Any] | None:
    """The provenance record embedded in an image file, or None."""
    with Image.open(io.BytesIO(content)) as image:
        if image.format == "PNG":
            raw = getattr(image, "text", {}).get(PNG_KEY)
            return json.loads(raw) if raw else None
        raw_exif = image.getexif().get(_EXIF_DESCRIPTION)
        if raw_exif:
            try:
                return json.loads(raw_exif)
            except ValueError:
                pass
        xmp = image.info.get("xmp")
        if xmp:
            text = xmp.decode(errors="replace") if isinstance(xmp, bytes) else str(xmp)
            return {k: v for k, v in re.findall(r'kiln:(\w+)="([^"]*)"', text)} or None
    return None
