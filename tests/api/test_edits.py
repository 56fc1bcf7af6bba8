"""POST /v1/images/edits: img2img and inpainting through the openai SDK, and the uploads it refuses."""

from __future__ import annotations

import base64
import io
import socket
from urllib.parse import urlparse

import openai
import pytest
from image_fakes import bomb_png, png
from PIL import Image


def rgba_mask(size=(64, 64)) -> bytes:  # type: ignore[no-untyped-def]
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, size[0] // 2, size[1]))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


def test_sdk_edit_with_mask_is_inpainting(server, make_user) -> None:
    ann = make_user()
    result = server.openai(ann.key).images.edit(
        image=("photo.png", png((64, 64), colour=(200, 10, 10)), "image/png"),
        mask=("mask.png", rgba_mask(), "image/png"),
        prompt="a hat", size="64x64",
    )
    picture = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert picture.size == (64, 64)
    from kiln.service.jobs import get_job

    job = get_job(server.state.db, result.model_extra["id"])  # what the worker was handed
    mask = Image.open(io.BytesIO(server.state.store.read(job.params["inputs"]["mask"])))
    assert job.params["task"] == "inpaint" and job.prompt == "a hat" and mask.getpixel((0, 0)) == 255


def test_sdk_edit_without_mask_is_img2img_and_type_comes_from_content(server, make_user) -> None:
    ann = make_user()
    jpeg = io.BytesIO()
    Image.new("RGB", (48, 48), (0, 200, 0)).save(jpeg, format="JPEG")
    result = server.openai(ann.key).images.edit(image=("named.png", jpeg.getvalue(), "image/png"),
                                                prompt="a dog", output_format="webp")
    assert result.output_format == "webp"
    from kiln.service.jobs import get_job

    job = get_job(server.state.db, result.model_extra["id"])
    image = Image.open(io.BytesIO(server.state.store.read(job.params["inputs"]["image"])))
    assert job.params["task"] == "edit" and image.format == "PNG" and image.size == (48, 48)


def test_bad_uploads_are_clear_4xx_and_cost_nothing(server, make_user) -> None:
    ann = make_user()
    client = server.openai(ann.key)
    with pytest.raises(openai.BadRequestError) as wrong_mask:
        client.images.edit(image=("a.png", png((64, 64)), "image/png"),
                           mask=("m.png", rgba_mask((32, 32)), "image/png"), prompt="x")
    assert wrong_mask.value.param == "mask"
    with pytest.raises(openai.BadRequestError) as bomb:
        client.images.edit(image=("bomb.png", bomb_png(), "image/png"), prompt="x")
    assert bomb.value.param == "image" and "pixels" in bomb.value.message
    with pytest.raises(openai.BadRequestError) as gif:
        client.images.edit(image=("a.png", b"GIF89a" + b"\0" * 100, "image/png"), prompt="x")
    assert gif.value.param == "image"
    with server.client(ann.key) as http:
        url_only = http.post("/v1/images/edits", data={"prompt": "x", "image": "http://example.com/a.png"},
                             files={"unused": ("x.txt", b"x")})
        assert url_only.status_code == 400
        bad_n = http.post("/v1/images/edits", data={"prompt": "x", "n": "zero"},
                          files={"image": ("a.png", png(), "image/png")})
        assert bad_n.status_code == 400 and bad_n.json()["error"]["param"] == "n"
        assert http.get("/v1/usage").json()["used"] == 0


def test_fifty_megabytes_declared_is_refused_before_reading(server, make_user) -> None:
    ann = make_user()
    address = urlparse(server.base_url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as conn:
        conn.sendall(
            b"POST /v1/images/edits HTTP/1.1\r\nHost: kiln\r\n"
            + f"Authorization: Bearer {ann.key}\r\n".encode()
            + b"Content-Type: multipart/form-data; boundary=x\r\n"
            + b"Content-Length: 52428800\r\n\r\n"
        )  # and not one byte of the body
        reply = b""
        while chunk := conn.recv(65536):  # the server answers and closes
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413")
    assert b"payload_too_large" in reply


async def test_fifty_megabytes_streamed_is_cut_off_at_the_limit(server, make_user) -> None:
    ann = make_user()
    limit = server.state.settings.max_upload_bytes
    chunk = b"\0" * (1 << 20)
    pulled = 0
    sent: list[dict] = []

    head = (b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")

    async def receive() -> dict:  # one 50 MB file part, streamed in 1 MB chunks
        nonlocal pulled
        body = head if pulled == 0 else chunk
        pulled += len(body)
        return {"type": "http.request", "body": body, "more_body": pulled < 50 * len(chunk)}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/images/edits", "raw_path": b"/v1/images/edits", "query_string": b"",
        "root_path": "", "server": ("kiln", 80), "client": ("127.0.0.1", 1), "app": server.app,
        "headers": [(b"authorization", f"Bearer {ann.key}".encode()), (b"transfer-encoding", b"chunked"),
                    (b"content-type", b"multipart/form-data; boundary=x")],
    }
    await server.app(scope, receive, send)
    assert sent[0]["status"] == 413
    assert pulled <= limit + len(chunk)  # stopped reading at the limit: memory stays bounded
