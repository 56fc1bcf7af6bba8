"""Kiln served through Ray, end to end over HTTP: the embedded model drawing on a worker actor, and a
worker actor killed mid-batch — its job runs again on an actor and is charged once."""

from __future__ import annotations

import base64
import io
import os
import signal

import pytest
from engine_server import engine_settings, follow
from PIL import Image

from kiln.config import EMBEDDED_MODEL_NAME, EMBEDDED_MODEL_PATH, ModelSpec

sqlite_only = pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)


def on_ray(settings, ray_cluster, actors: int):  # type: ignore[no-untyped-def]
    return settings.model_copy(update={
        "executor": "ray", "ray_address": ray_cluster.address, "ray_actor_resources": {"CPU": 1},
        "ray_max_actors": actors, "torch_threads": 1,
    })


@sqlite_only
def test_the_embedded_model_draws_an_image_on_a_ray_actor(start_server, settings, ray_cluster, make_user) -> None:
    embedded = settings.model_copy(update={
        "models": {EMBEDDED_MODEL_NAME: ModelSpec(path=EMBEDDED_MODEL_PATH)}, "default_model": EMBEDDED_MODEL_NAME,
        "model_aliases": {"gpt-image-1": EMBEDDED_MODEL_NAME},
    })
    server = start_server(on_ray(embedded, ray_cluster, actors=1))
    executor = server.scheduler.executor
    assert type(executor).__name__ == "RayExecutor"
    ann = make_user(plan="plus")
    result = server.openai(ann.key).images.generate(
        model="gpt-image-1", prompt="a red circle on a white background", size="64x64",
        response_format="b64_json")
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.size == (64, 64)
    assert len(set(image.convert("RGB").getdata())) > 1  # drawn, not a blank
    [load] = executor.model_loads()
    assert load.model == EMBEDDED_MODEL_NAME and load.worker_id.startswith("ray-")
    with server.client(ann.key) as http:
        assert http.get("/v1/usage").json()["used"] == 1


@sqlite_only
def test_an_actor_killed_mid_batch_reruns_the_job_and_charges_once(start_server, settings, tmp_path,
                                                                    ray_cluster, make_user) -> None:
    server = start_server(on_ray(engine_settings(settings, tmp_path, steps=50, step_s=0.02), ray_cluster, actors=2))
    executor = server.scheduler.executor
    assert executor.wait_ready(timeout_s=60) and executor.total_slots() == 2
    ann = make_user(plan="plus")
    with server.client(ann.key) as http:
        job = http.post("/v1/jobs", json={"prompt": "a survivor"}).json()
        seen, killed = [], None
        for event in follow(http, job["id"]):
            seen.append(event["event"])
            if event["event"] == "progress" and killed is None:
                [killed] = executor.busy_pids()
                os.kill(killed, signal.SIGKILL)  # mid-batch, as a segfaulting kernel would
        assert seen.count("started") == 2 and "requeued" in seen and seen[-1] == "completed", seen
        done = http.get(f"/v1/jobs/{job['id']}").json()
        assert done["status"] == "succeeded" and done["attempts"] == 2 and len(done["image_ids"]) == 1
        assert http.get(f"/v1/images/{done['image_ids'][0]}/content").status_code == 200
        assert http.get("/v1/usage").json()["used"] == 1
    assert executor.total_slots() == 2  # Ray restarted the killed actor's process
