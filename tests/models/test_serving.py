"""Every family served end to end through Kiln (HTTP, admission, the engine, a worker process): n > 1
with seeds that reproduce alone and batched with another caller, job events with progress and
previews, img2img and inpainting where the family has them and a 400 naming the model where not.
"""

from __future__ import annotations

import base64
import io
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from engine_server import events_until_end
from PIL import Image

from models.conftest import FAMILIES, STEPS, model_name

INPAINT = {"sd", "sd2", "sdxl", "sd3", "flux", "qwen-image", "z-image"}
EDIT = {*INPAINT, "chroma", "sana-sprint"}
"""Families with img2img / inpainting pipelines in diffusers (the rest are refused at admission)."""
SIZE = 32


def _pixels(b64: str) -> bytes:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB").tobytes()


def _same(a: bytes, b: bytes) -> bool:
    """Equal up to float rounding: a batch of another size may sum in another order (a pixel level or two)."""
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 2


def _batched_images(http: httpx.Client, at_least: float = 0.0) -> float:
    """Images counted in batches, from /metrics, once settled: the scheduler's series come with its
    heartbeat (a new exposition every 0.5 s), so wait for `at_least` and then for no change over a
    full interval (at most 10 s)."""
    deadline = time.monotonic() + 10
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        match = re.search(r"^kiln_batch_images_sum (\S+)$", http.get("/metrics").text, re.MULTILINE)
        value = float(match[1]) if match else 0.0
        if value != last:
            last, since = value, time.monotonic()
        elif value >= at_least and time.monotonic() - since > 0.75:
            return value
        time.sleep(0.05)
    return last or 0.0


def _generate(http: httpx.Client, model: str, prompt: str, n: int, seed: int) -> list[bytes]:
    response = http.post(
        "/v1/images/generations",
        json={"model": model, "prompt": prompt, "n": n, "seed": seed, "size": "auto"},
    )
    assert response.status_code == 200, response.text
    return [_pixels(item["b64_json"]) for item in response.json()["data"]]


@pytest.mark.parametrize("family", FAMILIES)
def test_n_images_with_seeds_that_reproduce_alone_and_batched(family_server, family_key, family) -> None:
    model = model_name(family)
    sdk = family_server.openai(family_key)
    alone = sdk.images.generate(model=model, prompt="a red circle", n=2, size="auto", extra_body={"seed": 7})
    first = [_pixels(item.b64_json) for item in alone.data]
    assert len(first) == 2 and not _same(first[0], first[1])  # seeds 7 and 8
    assert Image.open(io.BytesIO(base64.b64decode(alone.data[0].b64_json))).size == (SIZE, SIZE)
    with family_server.client(family_key) as http:
        batched_before = _batched_images(http)
        with ThreadPoolExecutor(2) as pool:  # a second caller, same batch key, within the batch wait
            again = pool.submit(_generate, http, model, "a red circle", 2, 7)
            other = pool.submit(_generate, http, model, "a blue square", 1, 11)
            again_images, other_images = again.result(), other.result()
        # the same seeds draw the same images, batched or not
        assert all(_same(a, b) for a, b in zip(again_images, first, strict=True))
        assert not any(_same(other_images[0], image) for image in first)
        assert _batched_images(http, batched_before + 3) - batched_before == 3
        assert 'kiln_batch_images_bucket{le="3.0"}' in http.get("/metrics").text


@pytest.mark.parametrize("family", FAMILIES)
def test_job_events_carry_progress_and_previews(family_server, family_key, family) -> None:
    with family_server.client(family_key) as http:
        submitted = http.post("/v1/jobs", json={"model": model_name(family), "prompt": "a green star"})
        assert submitted.status_code == 202, submitted.text
        events = events_until_end(http, submitted.json()["id"])
    progress = [e["data"] for e in events if e["event"] == "progress"]
    assert [p["step"] for p in progress] == list(range(1, STEPS + 1))
    previews = [Image.open(io.BytesIO(base64.b64decode(p["preview"]))) for p in progress if p.get("preview")]
    assert len(previews) == STEPS and all(p.format == "PNG" for p in previews)
    assert events[-1]["event"] == "completed"


def _png(size: tuple[int, int], colour: tuple[int, ...], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", ["edit", "inpaint"])
def test_edits_where_the_family_has_them_and_a_400_naming_the_model_where_not(
    family_server, family_key, family, task
) -> None:
    model = model_name(family)
    files = {"image": ("in.png", _png((SIZE, SIZE), (200, 30, 30)), "image/png")}
    if task == "inpaint":  # transparent = repaint the left half
        mask = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 255))
        mask.paste((0, 0, 0, 0), (0, 0, SIZE // 2, SIZE))
        buffer = io.BytesIO()
        mask.save(buffer, "PNG")
        files["mask"] = ("mask.png", buffer.getvalue(), "image/png")
    with family_server.client(family_key) as http:
        response = http.post(
            "/v1/images/edits",
            files=files,
            data={"model": model, "prompt": "make it blue", "n": "2", "seed": "3"},
        )
    if family in (INPAINT if task == "inpaint" else EDIT):
        assert response.status_code == 200, response.text
        images = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in response.json()["data"]]
        assert [i.size for i in images] == [(SIZE, SIZE)] * 2
        return
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert model in error["message"] and error["param"] == ("mask" if task == "inpaint" else "image")


def test_a_size_the_model_cannot_draw_is_a_400_naming_it_and_extra_sizes_are_drawn(
    family_server, family_key
) -> None:
    with family_server.client(family_key) as http:
        refused = http.post(
            "/v1/images/generations", json={"model": model_name("sd"), "prompt": "p", "size": "48x32"}
        )
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert error["param"] == "size" and "tiny-sd" in error["message"]
        drawn = http.post(
            "/v1/images/generations", json={"model": model_name("sdxl"), "prompt": "p", "size": "48x32"}
        )  # the operator allowed it
        assert drawn.status_code == 200, drawn.text
        image = Image.open(io.BytesIO(base64.b64decode(drawn.json()["data"][0]["b64_json"])))
        assert image.size == (48, 32)
        openai_size = http.post(
            "/v1/images/generations",
            json={"model": model_name("flux"), "prompt": "p", "size": "1536x1024", "quality": "low"},
        )
        assert openai_size.status_code == 200, openai_size.text
