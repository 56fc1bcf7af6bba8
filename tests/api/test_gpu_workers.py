"""GPU-ready workers through the HTTP API, with the fake pipeline standing in for a GPU that runs out
of memory above 2 images: a request for 8 still gets 8, the batcher learns the limit for that key,
and /metrics shows each worker's model load time and memory. LoRA choices are checked at admission.
Nothing here ran on a real GPU."""

from __future__ import annotations

import json

import pytest
from image_fakes import png

from kiln.config import ModelSpec
from kiln.engine import Started

sqlite_only = pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)
FAKE_LOADER = "kiln.testing:load_fake_pipeline"


def oom_settings(settings, tmp_path, **spec):
    model = ModelSpec(path=tmp_path / "model", loader=FAKE_LOADER, native_size=64, steps=4,
                      options={"oom_above": 2}, **spec)
    return settings.model_copy(update={"models": {"fake": model}, "max_batch_wait_s": 0.3})


@sqlite_only
def test_a_batch_that_runs_out_of_memory_completes_and_caps_the_next(start_server, settings, tmp_path,
                                                                      make_user) -> None:
    server = start_server(oom_settings(settings, tmp_path))
    started: list[Started] = []
    server.scheduler.engine.add_listener(lambda e: started.append(e) if isinstance(e, Started) else None)
    ann = make_user(plan="enterprise")
    with server.client(ann.key) as http:
        response = http.post("/v1/images/generations", json={"prompt": "eight owls", "n": 8, "seed": 1})
        assert response.status_code == 200, response.text
        assert len(response.json()["data"]) == 8
        [(key, fit)] = server.scheduler.engine.core.limits.learned().items()
        assert (key.model, key.width, fit) == ("fake", 64, 2)

        started.clear()
        ids = [http.post("/v1/jobs", json={"prompt": f"owl {i}", "seed": i}).json()["id"] for i in range(8)]
        outcomes = [server.call(server.state.runner.wait(job_id, 60), 90) for job_id in ids]
        assert {o.status for o in outcomes} == {"succeeded"}
        sizes = {e.batch_id: e.batch_images for e in started}
        assert max(sizes.values()) <= 2 and len(sizes) >= 4  # formed at the size that fits

        metrics = http.get("/metrics").text
    loads = [line for line in metrics.splitlines() if line.startswith("kiln_model_load_seconds{")]
    memory = [line for line in metrics.splitlines() if line.startswith("kiln_worker_memory_bytes{")]
    assert len(loads) == len(memory) == 1
    assert 'model="fake"' in loads[0] and 'worker="local-0.' in loads[0] and 'device="cpu"' in loads[0]
    assert float(loads[0].rsplit(" ", 1)[1]) > 0 and float(memory[0].rsplit(" ", 1)[1]) > 10 * 2**20


@sqlite_only
def test_unknown_adapters_and_bad_scales_are_refused_at_admission(start_server, settings, tmp_path,
                                                                  make_user) -> None:
    server = start_server(oom_settings(settings, tmp_path, loras={"style": tmp_path / "style"}))
    ann = make_user(plan="plus")
    with server.client(ann.key) as http:
        refused = http.post("/v1/images/generations", json={"prompt": "p", "loras": [{"name": "nope"}]})
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert error["param"] == "loras" and "'nope'" in error["message"] and "style" in error["message"]

        job = http.post("/v1/jobs", json={"prompt": "p", "loras": [{"name": "nope", "scale": 1}]})
        assert job.status_code == 400 and job.json()["error"]["param"] == "loras"

        twice = http.post("/v1/jobs", json={"prompt": "p", "loras": [{"name": "style"}, {"name": "style"}]})
        assert twice.status_code == 400 and "twice" in twice.json()["error"]["message"]

        too_strong = http.post("/v1/jobs", json={"prompt": "p", "loras": [{"name": "style", "scale": 9}]})
        assert too_strong.status_code == 400 and too_strong.json()["error"]["param"].startswith("loras")

        edit = http.post("/v1/images/edits", data={"prompt": "p", "loras": json.dumps([{"name": "nope"}])},
                         files={"image": ("a.png", png((64, 64)), "image/png")})
        assert edit.status_code == 400 and edit.json()["error"]["param"] == "loras"

        not_json = http.post("/v1/images/edits", data={"prompt": "p", "loras": "style"},
                             files={"image": ("a.png", png((64, 64)), "image/png")})
        assert not_json.status_code == 400 and not_json.json()["error"]["param"].startswith("loras")

        assert http.get("/v1/usage").json()["used"] == 0  # refusals reserve nothing
