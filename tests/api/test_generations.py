"""POST /v1/images/generations through the official openai SDK and plain HTTP."""

from __future__ import annotations

import base64
import io

import openai
import pytest
from PIL import Image

from kiln.service.provenance import prompt_hash
from kiln.testing import prompt_colour


def test_sdk_b64_json_then_metadata_and_provenance(server, make_user) -> None:
    ann = make_user("ann", plan="plus")
    client = server.openai(ann.key)
    result = client.images.generate(model="gpt-image-1", prompt="a red circle", n=2, size="64x64",
                                     extra_body={"seed": 7})
    assert len(result.data) == 2 and result.created > 0
    assert result.usage.total_tokens == result.usage.input_tokens + result.usage.output_tokens
    assert result.size == "64x64" and result.output_format == "png"
    first = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert first.size == (64, 64)
    assert first.getpixel((0, 0)) == prompt_colour("a red circle", 7)
    second = Image.open(io.BytesIO(base64.b64decode(result.data[1].b64_json)))
    assert second.getpixel((0, 0)) == prompt_colour("a red circle", 8)

    image_id = result.data[1].model_extra["id"]
    with server.client(ann.key) as http:
        info = http.get(f"/v1/images/{image_id}").json()
    prov = info["provenance"]
    assert prov["generator"].startswith("kiln/") and prov["model"] == "fake"
    assert prov["seed"] == 8 and prov["job_id"] == result.model_extra["id"]
    assert prov["prompt_sha256"] == prompt_hash("a red circle")
    credentials = info["content_credentials"]  # C2PA, signed by Kiln's own (untrusted) certificate
    assert credentials["validation_state"] == "Valid"
    assert "c2pa.actions.v2" in credentials["assertions"] and credentials["kiln"]["seed"] == 8


def test_sdk_url_serves_the_file_to_its_owner(server, make_user) -> None:
    ann = make_user()
    result = server.openai(ann.key).images.generate(prompt="a blue square", response_format="url",
                                                    output_format="jpeg", output_compression=80)
    url = result.data[0].url
    assert url.startswith(server.base_url) and result.data[0].b64_json is None
    with server.client(ann.key) as http:
        response = http.get(url)
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    picture = Image.open(io.BytesIO(response.content))
    assert picture.format == "JPEG" and picture.size == (64, 64)


@pytest.mark.parametrize("fmt", ["webp", "jpeg"])
def test_lossy_formats_carry_exif_and_xmp_provenance(server, make_user, fmt: str) -> None:
    ann = make_user()
    result = server.openai(ann.key).images.generate(prompt="a tree", output_format=fmt,
                                                    extra_body={"seed": 3})
    raw = base64.b64decode(result.data[0].b64_json)
    picture = Image.open(io.BytesIO(raw))
    assert picture.format == fmt.upper()
    assert b"kiln:job_id" in picture.info["xmp"]
    assert result.model_extra["id"] in picture.getexif()[0x010E]
    with server.client(ann.key) as http:
        info = http.get(f"/v1/images/{result.data[0].model_extra['id']}").json()
    assert info["provenance"]["seed"] == 3
    assert info["content_credentials"]["kiln"]["job_id"] == result.model_extra["id"]


def test_sizes_quality_and_aliases(server, make_user) -> None:
    ann = make_user(plan="plus")
    client = server.openai(ann.key)
    big = client.images.generate(model="dall-e-3", prompt="x", size="256x256", quality="low")
    assert Image.open(io.BytesIO(base64.b64decode(big.data[0].b64_json))).size == (256, 256)
    assert big.quality == "low"
    job = server.state.db  # steps: a quarter of the model's 4
    from kiln.service.jobs import get_job

    assert get_job(job, big.model_extra["id"]).steps == 1
    auto = client.images.generate(model="fake", prompt="x", size="auto")
    assert auto.size == "64x64"


def test_openai_refusals_through_the_sdk(server, make_user) -> None:
    ann = make_user()
    client = server.openai(ann.key)
    with pytest.raises(openai.NotFoundError) as missing:
        client.images.generate(model="no-such-model", prompt="x")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as size:
        client.images.generate(prompt="x", size="999x999")
    assert size.value.param == "size"
    with pytest.raises(openai.BadRequestError) as n:
        client.images.generate(prompt="x", n=2)  # the free plan's max_n is 1
    assert n.value.param == "n"
    with pytest.raises(openai.BadRequestError) as blocked:
        client.images.generate(prompt="some gore please")
    assert blocked.value.code == "moderation_blocked"
    assert blocked.value.body["type"] == "image_generation_user_error"
    with pytest.raises(openai.AuthenticationError):
        server.openai("kiln-not-a-key").images.generate(prompt="x")
    with server.client(ann.key) as http:
        assert http.get("/v1/usage").json()["used"] == 0  # nothing refused was charged


def test_unknown_fields_are_refused_and_change_nothing(server, make_user) -> None:
    ann = make_user()
    with server.client(ann.key) as http:
        for extra in ({"plan": "enterprise"}, {"user_id": "usr_someone"}):
            response = http.post("/v1/images/generations", json={"prompt": "x", **extra})
            assert response.status_code == 400
            assert response.json()["error"]["param"] == next(iter(extra))
        usage = http.get("/v1/usage").json()
    assert usage["plan"] == "free" and usage["used"] == 0


def test_bad_values_name_their_param(server, make_user) -> None:
    ann = make_user()
    with server.client(ann.key) as http:
        for body, param in [
            ({"prompt": ""}, "prompt"), ({"prompt": "x", "n": 11}, "n"),
            ({"prompt": "x", "output_format": "gif"}, "output_format"),
            ({"prompt": "x", "output_compression": 101}, "output_compression"),
            ({"prompt": "x", "response_format": "binary"}, "response_format"),
            ({"prompt": "x", "quality": "ultra"}, "quality"),
            ({"prompt": "x", "background": "transparent", "output_format": "jpeg"}, "background"),
        ]:
            error = http.post("/v1/images/generations", json=body).json()["error"]
            assert error["param"] == param, (body, error)
            assert error["type"] == "invalid_request_error"
        accepted = http.post("/v1/images/generations", json={
            "prompt": "x", "background": "opaque", "moderation": "low", "user": "end-user-1"})
        assert accepted.status_code == 200, accepted.text
        assert set(accepted.headers) >= {"x-ratelimit-limit-images", "x-ratelimit-remaining-images",
                                         "x-ratelimit-reset-images"}


def test_openapi_schema_describes_the_images_api(server) -> None:
    with server.client() as http:
        schema = http.get("/openapi.json").json()
    paths = schema["paths"]
    assert {"/v1/images/generations", "/v1/images/edits", "/v1/images/{image_id}", "/v1/usage"} <= set(paths)
    edit_body = paths["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"image", "mask", "prompt", "n", "size"} <= set(edit_body["properties"])
    generation = schema["components"]["schemas"]["GenerationRequest"]
    assert generation.get("additionalProperties") is False


def test_every_other_error_class_through_the_sdk(server, start_server, settings, make_user) -> None:
    from image_fakes import png

    ann = make_user()
    client = server.openai(ann.key)
    client.images.generate(prompt="a cat", extra_headers={"Idempotency-Key": "same"})
    with pytest.raises(openai.UnprocessableEntityError) as reused:
        client.images.generate(prompt="a dog", extra_headers={"Idempotency-Key": "same"})
    assert reused.value.code == "idempotency_key_reused"
    with pytest.raises(openai.InternalServerError) as failed:
        client.images.generate(prompt="a cat [[oom]]")
    assert failed.value.code == "generation_failed"
    small = start_server(settings.model_copy(update={"max_upload_bytes": 4096}))
    with pytest.raises(openai.APIStatusError) as too_large:  # a 16 kB body where 4 kB are accepted
        small.openai(ann.key).images.edit(image=("a.png", png() + b"\0" * 16384, "image/png"), prompt="x")
    assert too_large.value.status_code == 413 and too_large.value.code == "payload_too_large"


def test_sdk_streaming_sends_a_completed_event_per_image(server, make_user) -> None:
    ann = make_user(plan="plus")
    stream = server.openai(ann.key).images.generate(prompt="a boat", n=2, stream=True,
                                                    extra_body={"seed": 11})
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.completed"] * 2
    second = Image.open(io.BytesIO(base64.b64decode(events[1].b64_json)))
    assert second.getpixel((0, 0)) == prompt_colour("a boat", 12)
