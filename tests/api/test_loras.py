"""LoRA adapters per request, end to end on real parts: a tiny random Stable Diffusion pipeline and a
tiny random LoRA for its UNet (saved with diffusers' save_lora_weights), served by Kiln's workers.
The adapter changes the image for the same seed, the same choice draws the same image twice, and
callers with different adapter sets never share a pipeline call."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from image_fakes import png
from PIL import Image

from kiln.config import ModelSpec
from kiln.engine import Started

sqlite_only = pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)


@pytest.fixture(scope="module")
def tiny_with_lora(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tiny_sd import save_tiny_lora, save_tiny_sd

    root = tmp_path_factory.mktemp("tiny-lora")
    model = save_tiny_sd(root / "model")
    return model, save_tiny_lora(model, root / "style")


def lora_settings(settings, tiny_with_lora, **overrides):
    model, lora = tiny_with_lora
    loras = {"style": lora, "file": lora / "pytorch_lora_weights.safetensors"}
    spec = ModelSpec(path=model, native_size=64, steps=2, loras=loras)
    return settings.model_copy(update={
        "models": {"tiny": spec}, "default_model": "tiny", "model_aliases": {"gpt-image-1": "tiny"},
        "max_batch_wait_s": 0.0, **overrides})


def pixels(item: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"))


@sqlite_only
def test_the_same_seed_with_and_without_the_adapter(start_server, settings, tiny_with_lora,
                                                    make_user) -> None:
    server = start_server(lora_settings(settings, tiny_with_lora))
    ann = make_user(plan="plus")
    body = {"prompt": "a red circle", "seed": 5, "size": "64x64"}
    with server.client(ann.key) as http:

        def draw(**extra: object) -> np.ndarray:
            response = http.post("/v1/images/generations", json={**body, **extra})
            assert response.status_code == 200, response.text
            return pixels(response.json()["data"][0])

        styled = draw(loras=[{"name": "style", "scale": 1.0}])
        plain = draw()
        styled_again = draw(loras=[{"name": "style", "scale": 1.0}])
        from_file = draw(loras=[{"name": "file", "scale": 1.0}])  # the same weights, named by file
        off = draw(loras=[{"name": "style", "scale": 0.0}])
        plain_again = draw()  # after batches with the adapter, the base model is back

        assert np.abs(styled.astype(int) - plain.astype(int)).mean() > 1.0
        assert np.array_equal(styled, styled_again)
        assert np.array_equal(styled, from_file)
        assert np.array_equal(off, plain)
        assert np.array_equal(plain, plain_again)

        edit = http.post("/v1/images/edits", files={"image": ("a.png", png((64, 64), colour=(200, 0, 0)),
                                                              "image/png")},
                         data={"prompt": "a blue square", "seed": "5",
                               "loras": json.dumps([{"name": "style", "scale": 0.7}])})
        assert edit.status_code == 200, edit.text  # the edit pipeline shares the loaded adapter


@sqlite_only
def test_callers_with_different_adapter_sets_are_not_batched_together(start_server, settings, tiny_with_lora,
                                                                      make_user) -> None:
    server = start_server(lora_settings(settings, tiny_with_lora, max_batch_wait_s=1.0))
    batch_of: dict[str, str] = {}
    server.scheduler.engine.add_listener(
        lambda e: batch_of.__setitem__(e.job_id, e.batch_id) if isinstance(e, Started) else None)
    ann, bob, cid = (make_user(plan="plus") for _ in range(3))
    style = [{"name": "style", "scale": 0.8}]
    submitted = {}
    for user, prompt, loras in ((ann, "a red circle", style), (bob, "a red circle", None),
                                (cid, "a blue square", style)):
        with server.client(user.key) as http:
            response = http.post("/v1/jobs", json={"prompt": prompt, "seed": 3,
                                                   **({"loras": loras} if loras else {})})
            assert response.status_code == 202, response.text
            submitted[user.name] = response.json()["id"]
    outcomes = {name: server.call(server.state.runner.wait(job_id, 120), 150)
                for name, job_id in submitted.items()}
    assert {o.status for o in outcomes.values()} == {"succeeded"}
    batches = {name: batch_of[job_id] for name, job_id in submitted.items()}
    assert batches[ann.name] == batches[cid.name]  # the same adapter set rides together
    assert batches[bob.name] != batches[ann.name]  # no adapters: a call of its own
